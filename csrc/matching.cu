// Matching: for every src token, its most similar dst (cosine) without the [S x D] score matrix.
//
// A block owns a tile of src rows and walks a slice of the dst tiles; each dst tile's dot products
// live only in registers / shared memory and are folded into a running (max, argmax) per src row.
// Tokens are read by index (src_idx / dst_idx), cosine uses precomputed fp32 inverse norms, and
// accumulation is fp32. fp16/bf16 on sm_80+ use tensor cores (WMMA 16x16x16); fp32 and older GPUs
// use a CUDA-core tile. When there are too few src tiles to fill the device, the dst range is cut
// into slices whose partial (max, argmax) are combined by a second kernel (ties: lowest dst).
// Ranking is torch.max's (rules.h): a NaN score (from a NaN or Inf token, as in the PyTorch path)
// beats every number, so a row of NaN scores still gets a valid dst position.
// Grid: x = batch row x src tile (folded, so any batch size fits; y and z are limited to 65,535),
// y = dst slice. Token indices outside [0, N) read as missing rows (token_at): never out of bounds.
#include <mma.h>

#include <cfloat>

#include "common.cuh"
#include "rules.h"

namespace tomesd {
namespace {

constexpr float kMinNorm = 1e-12f;

template <typename T>
__global__ void inv_norms_kernel(const T* __restrict__ x, int64_t rows, int C, float* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows; row += warps) {
    const T* p = x + row * C;
    float s = 0.f;
    for (int c = lane; c < C; c += 32) {
      const float v = to_float(p[c]);
      s += v * v;
    }
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) out[row] = 1.f / fmaxf(sqrtf(s), kMinNorm);
  }
}

// Writes the (max, argmax) of one block's rows for its dst slice.
__device__ __forceinline__ void store_best(float v, int i, int b, int split, int splits, int S, int s, float* part_val,
                                           int* part_idx) {
  const int64_t o = (static_cast<int64_t>(b) * splits + split) * S + s;
  part_val[o] = v;
  part_idx[o] = i;
}

// ---- CUDA-core tile: 64 src x 64 dst per step, 256 threads, 4 x 4 outputs per thread. ----
constexpr int kSimtK = 16, kSimtPad = 4;  // kSimtS, kSimtD: rules.h

template <typename T>
__global__ void __launch_bounds__(256) best_dst_simt(MatchArgs a, const float* __restrict__ inv_norm,
                                                     int per_split, float* __restrict__ part_val,
                                                     int* __restrict__ part_idx) {
  __shared__ __align__(16) float As[kSimtK][kSimtS + kSimtPad];
  __shared__ __align__(16) float Bs[kSimtK][kSimtD + kSimtPad];
  __shared__ int64_t arow[kSimtS], bcol[kSimtD];
  __shared__ float ia[kSimtS], ib[kSimtD];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int stiles = (a.S + kSimtS - 1) / kSimtS;
  const int b = blockIdx.x / stiles, split = blockIdx.y, s0 = (blockIdx.x % stiles) * kSimtS;
  const T* xb = static_cast<const T*>(a.metric) + static_cast<int64_t>(b) * a.N * a.C;
  const float* nb = inv_norm + static_cast<int64_t>(b) * a.N;
  for (int i = tid; i < kSimtS; i += blockDim.x) {
    arow[i] = token_at(a.src_idx, s0 + i, a.S, a.N);
    ia[i] = arow[i] >= 0 ? nb[arow[i]] : 0.f;
  }
  float best_v[4];
  int best_i[4];
  for (int i = 0; i < 4; ++i) {
    best_v[i] = -FLT_MAX;
    best_i[i] = kNoDst;
  }
  const int dtiles = (a.D + kSimtD - 1) / kSimtD;
  const int t1 = min(dtiles, (split + 1) * per_split);
  for (int t = split * per_split; t < t1; ++t) {
    __syncthreads();  // the previous tile is done with bcol / ib
    for (int j = tid; j < kSimtD; j += blockDim.x) {
      bcol[j] = token_at(a.dst_idx, t * kSimtD + j, a.D, a.N);
      ib[j] = bcol[j] >= 0 ? nb[bcol[j]] : 0.f;
    }
    __syncthreads();  // ib is read below even when C = 0 (no k step, so no barrier there)
    float acc[4][4] = {};
    for (int k0 = 0; k0 < a.C; k0 += kSimtK) {
      __syncthreads();
      for (int e = tid; e < kSimtS * kSimtK; e += blockDim.x) {
        const int r = e / kSimtK, k = e % kSimtK;
        const int64_t tok = arow[r];
        As[k][r] = (tok >= 0 && k0 + k < a.C) ? to_float(xb[tok * a.C + k0 + k]) : 0.f;
      }
      for (int e = tid; e < kSimtD * kSimtK; e += blockDim.x) {
        const int r = e / kSimtK, k = e % kSimtK;
        const int64_t tok = bcol[r];
        Bs[k][r] = (tok >= 0 && k0 + k < a.C) ? to_float(xb[tok * a.C + k0 + k]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kSimtK; ++k) {
        const float4 av = *reinterpret_cast<const float4*>(&As[k][ty * 4]);
        const float4 bv = *reinterpret_cast<const float4*>(&Bs[k][tx * 4]);
        const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int d = t * kSimtD + tx * 4 + j;
        const float v = acc[i][j] * ia[ty * 4 + i] * ib[tx * 4 + j];
        if (d < a.D && better(v, d, best_v[i], best_i[i])) {
          best_v[i] = v;
          best_i[i] = d;
        }
      }
  }
  // The 16 threads sharing a row (same ty) are 16 consecutive lanes of one warp.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    for (int o = 8; o > 0; o /= 2) {
      const float v = __shfl_xor_sync(0xffffffffu, best_v[i], o);
      const int d = __shfl_xor_sync(0xffffffffu, best_i[i], o);
      if (better(v, d, best_v[i], best_i[i])) {
        best_v[i] = v;
        best_i[i] = d;
      }
    }
    const int s = s0 + ty * 4 + i;
    if (tx == 0 && s < a.S) store_best(best_v[i], best_i[i], b, split, gridDim.y, a.S, s, part_val, part_idx);
  }
}

// ---- Tensor-core tile (fp16 / bf16, sm_80+): 128 src x 64 dst per step, 8 warps of 32 x 32. ----
constexpr int kTcK = 32, kTcLdk = kTcK + 8, kTcLdc = kTcD + 4;

template <typename T>
struct TcSmem {
  union {
    struct {
      T A[kTcS][kTcLdk];  // src rows, k contiguous (row-major A)
      T B[kTcD][kTcLdk];  // dst rows, k contiguous (column-major B)
    } ab;
    float C[kTcS][kTcLdc];  // dot products of one dst tile
  } u;
  int64_t arow[kTcS], bcol[kTcD];
  float ia[kTcS], ib[kTcD];
};

// Copies rows tok[0..R) x k in [k0, k0 + kTcK) of xb into dst[R][kTcLdk], zero-filling.
template <typename T, int R, bool Vec>
__device__ __forceinline__ void load_tile(const T* __restrict__ xb, int C, int k0, const int64_t* tok,
                                          T (*dst)[kTcLdk]) {
  if (Vec) {  // C % 8 == 0 and 16-byte aligned rows: 8 elements per load, all in or all out of range
    for (int e = threadIdx.x; e < R * (kTcK / 8); e += blockDim.x) {
      const int r = e / (kTcK / 8), k = (e % (kTcK / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (tok[r] >= 0 && k0 + k < C) v = *reinterpret_cast<const uint4*>(xb + tok[r] * C + k0 + k);
      *reinterpret_cast<uint4*>(&dst[r][k]) = v;
    }
  } else {
    for (int e = threadIdx.x; e < R * kTcK; e += blockDim.x) {
      const int r = e / kTcK, k = e % kTcK;
      dst[r][k] = (tok[r] >= 0 && k0 + k < C) ? xb[tok[r] * C + k0 + k] : from_float<T>(0.f);
    }
  }
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(256) best_dst_wmma(MatchArgs a, const float* __restrict__ inv_norm,
                                                     int per_split, float* __restrict__ part_val,
                                                     int* __restrict__ part_idx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) TcSmem<T> sm;
  const int tid = threadIdx.x, warp = tid / 32, wr = warp / 2, wc = warp % 2;
  const int stiles = (a.S + kTcS - 1) / kTcS;
  const int b = blockIdx.x / stiles, split = blockIdx.y, s0 = (blockIdx.x % stiles) * kTcS;
  const T* xb = static_cast<const T*>(a.metric) + static_cast<int64_t>(b) * a.N * a.C;
  const float* nb = inv_norm + static_cast<int64_t>(b) * a.N;
  for (int i = tid; i < kTcS; i += blockDim.x) {
    sm.arow[i] = token_at(a.src_idx, s0 + i, a.S, a.N);
    sm.ia[i] = sm.arow[i] >= 0 ? nb[sm.arow[i]] : 0.f;
  }
  // Reduction phase: thread tid scans half (tid % 2) of row tid / 2's 64 columns.
  const int row = tid / 2, half = tid % 2;
  float best_v = -FLT_MAX;
  int best_i = kNoDst;
  const int dtiles = (a.D + kTcD - 1) / kTcD;
  const int t1 = min(dtiles, (split + 1) * per_split);
  for (int t = split * per_split; t < t1; ++t) {
    __syncthreads();  // the previous tile is done with C, bcol and ib
    for (int j = tid; j < kTcD; j += blockDim.x) {
      sm.bcol[j] = token_at(a.dst_idx, t * kTcD + j, a.D, a.N);
      sm.ib[j] = sm.bcol[j] >= 0 ? nb[sm.bcol[j]] : 0.f;
    }
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int k0 = 0; k0 < a.C; k0 += kTcK) {
      __syncthreads();
      load_tile<T, kTcS, Vec>(xb, a.C, k0, sm.arow, sm.u.ab.A);
      load_tile<T, kTcD, Vec>(xb, a.C, k0, sm.bcol, sm.u.ab.B);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTcK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.u.ab.A[wr * 32 + i * 16][kk], kTcLdk);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sm.u.ab.B[wc * 32 + j * 16][kk], kTcLdk);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    __syncthreads();  // every warp is done reading A / B, which C overlays
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&sm.u.C[wr * 32 + i * 16][wc * 32 + j * 16], acc[i][j], kTcLdc,
                                wmma::mem_row_major);
    __syncthreads();
    const float ir = sm.ia[row];
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const int d = t * kTcD + c;
      const float v = sm.u.C[row][c] * ir * sm.ib[c];
      if (d < a.D && better(v, d, best_v, best_i)) {
        best_v = v;
        best_i = d;
      }
    }
  }
  const float v = __shfl_xor_sync(0xffffffffu, best_v, 1);
  const int d = __shfl_xor_sync(0xffffffffu, best_i, 1);
  if (better(v, d, best_v, best_i)) {
    best_v = v;
    best_i = d;
  }
  const int s = s0 + row;
  if (half == 0 && s < a.S) store_best(best_v, best_i, b, split, gridDim.y, a.S, s, part_val, part_idx);
#elif defined(__CUDA_ARCH__)
  // Compiled for an arch without bf16 WMMA (or from older PTX): the host never launches this
  // (tensor_cores_usable checks the kernel's PTX and binary versions); if it ever runs, fail loudly
  // instead of leaving score / dst_pos unwritten.
  __trap();
#endif
}

__global__ void combine_splits(const float* __restrict__ part_val, const int* __restrict__ part_idx, int B, int splits,
                               int S, float* __restrict__ score, int* __restrict__ dst_pos) {
  const int64_t total = static_cast<int64_t>(B) * S;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / S, s = i % S;
    float bv = -FLT_MAX;
    int bi = kNoDst;
    for (int k = 0; k < splits; ++k) {
      const int64_t o = (b * splits + k) * S + s;
      if (better(part_val[o], part_idx[o], bv, bi)) {
        bv = part_val[o];
        bi = part_idx[o];
      }
    }
    score[i] = bv;
    dst_pos[i] = bi;
  }
}

struct DeviceInfo {
  int sms = 0, major = 0;
  bool tensor_cores = false;  // the WMMA kernel has a body on this device (see tensor_cores_usable)
};

// The PTX and binary versions of the WMMA kernel as loaded on the current device (0 if it has none).
void kernel_versions(int* ptx_version, int* binary_version) {
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, best_dst_wmma<__half, true>);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // no image for this device: clear the error, use the CUDA-core tile
    *ptx_version = *binary_version = 0;
    return;
  }
  *ptx_version = attr.ptxVersion;
  *binary_version = attr.binaryVersion;
}

DeviceInfo device_info(int device) {
  static DeviceInfo cache[64];
  if (device < 0 || device >= 64) device = 0;
  DeviceInfo& info = cache[device];
  if (info.sms == 0) {
    int sms = 0, major = 0, ptx = 0, binary = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    kernel_versions(&ptx, &binary);
    info.major = major;
    info.tensor_cores = tensor_cores_usable(true, major, ptx, binary);
    info.sms = sms;
  }
  return info;
}

bool use_tensor_cores(const MatchArgs& a, int device) {
  return a.dtype != DType::f32 && device_info(device).tensor_cores;
}

}  // namespace

void launch_inv_norms(const MatchArgs& a, float* inv_norm, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(a.B) * a.N;
  if (rows == 0) return;
  dispatch_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    inv_norms_kernel<T><<<blocks_for(rows * 32, 256), 256, 0, stream>>>(static_cast<const T*>(a.metric), rows, a.C,
                                                                       inv_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

int match_splits(const MatchArgs& a, int device) {
  const bool tc = use_tensor_cores(a, device);
  const int tile_s = tc ? kTcS : kSimtS, tile_d = tc ? kTcD : kSimtD;
  const int64_t blocks = static_cast<int64_t>(a.B) * ((a.S + tile_s - 1) / tile_s);
  const int dtiles = (a.D + tile_d - 1) / tile_d;
  return split_count(blocks, dtiles, 2 * static_cast<int64_t>(device_info(device).sms));
}

void launch_best_dst(const MatchArgs& a, const float* inv_norm, int splits, float* part_val, int* part_idx,
                     float* score, int* dst_pos, int device, cudaStream_t stream) {
  if (a.B == 0 || a.S == 0 || a.D == 0) return;  // nothing to match (and no zero-sized grid)
  float* val = splits > 1 ? part_val : score;
  int* idx = splits > 1 ? part_idx : dst_pos;
  if (use_tensor_cores(a, device)) {
    const int dtiles = (a.D + kTcD - 1) / kTcD;
    const dim3 grid(static_cast<unsigned>(a.B) * ((a.S + kTcS - 1) / kTcS), splits);
    const int per = tiles_per_split(dtiles, splits);
    const bool vec = vector_loads(a.C, reinterpret_cast<uintptr_t>(a.metric));
    auto launch = [&](auto zero) {
      using T = decltype(zero);
      if (vec) {
        best_dst_wmma<T, true><<<grid, 256, 0, stream>>>(a, inv_norm, per, val, idx);
      } else {
        best_dst_wmma<T, false><<<grid, 256, 0, stream>>>(a, inv_norm, per, val, idx);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (a.dtype == DType::f16) {
      launch(__half{});
    } else {
      launch(__nv_bfloat16{});
    }
  } else {
    const int dtiles = (a.D + kSimtD - 1) / kSimtD;
    const dim3 grid(static_cast<unsigned>(a.B) * ((a.S + kSimtS - 1) / kSimtS), splits);
    const int per = tiles_per_split(dtiles, splits);
    dispatch_dtype(a.dtype, [&](auto zero) {
      using T = decltype(zero);
      best_dst_simt<T><<<grid, 256, 0, stream>>>(a, inv_norm, per, val, idx);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (splits > 1) {
    const int64_t total = static_cast<int64_t>(a.B) * a.S;
    combine_splits<<<blocks_for(total, 256), 256, 0, stream>>>(part_val, part_idx, a.B, splits, a.S, score, dst_pos);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace tomesd

// Local matching: for every src token, its most similar dst (cosine) among the dst of the k x k cells
// around its own cell (|cy' - cy| <= k / 2, |cx' - cx| <= k / 2, clipped at the grid's edges; tokens
// of the remainder rows / columns belong to the last cell), as tomesd.matching.best_dst_local.
//
// 1. cell_dst_kernel: dst position of each cell (the cell holding dst_idx[p] gets p), or kNoDst.
// 2. best_dst_local_kernel: one warp per (batch row, src): for each cell of the window, in raster
//    order, a warp-reduced fp32 dot product with that cell's dst, times both inverse norms; the
//    running (max, argmax) follows rules.h's `better` (NaN first, then the higher score, then the
//    lower dst position), so ties are broken as torch.max over dst positions (the global matching).
// O(B * S * k^2 * C) work, no score matrix. Token indices outside [0, N) and cells outside the grid
// are skipped: a malformed partition gives unspecified matches, never an access outside the buffers.
#include <cfloat>

#include "common.cuh"
#include "rules.h"

namespace tomesd {
namespace {

__device__ __forceinline__ int cell_of(int64_t tok, const LocalArgs& g) {
  const int hsy = g.h / g.sy, wsx = g.w / g.sx;
  const int cy = min(static_cast<int>(tok / g.w) / g.sy, hsy - 1);
  const int cx = min(static_cast<int>(tok % g.w) / g.sx, wsx - 1);
  return cy * wsx + cx;
}

__global__ void cell_dst_kernel(MatchArgs a, LocalArgs g, int* __restrict__ cell_dst) {
  const int cells = (g.h / g.sy) * (g.w / g.sx);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cells; i += gridDim.x * blockDim.x) cell_dst[i] = kNoDst;
  __syncthreads();  // one block (see launch_best_dst_local): every cell is reset before it is claimed
  for (int p = threadIdx.x; p < a.D; p += blockDim.x) {
    const int64_t tok = token_at(a.dst_idx, p, a.D, a.N);
    if (tok >= 0) atomicMin(&cell_dst[cell_of(tok, g)], p);
  }
}

template <typename T>
__global__ void __launch_bounds__(256) best_dst_local_kernel(MatchArgs a, LocalArgs g, const float* __restrict__ inv_norm,
                                                             const int* __restrict__ cell_dst, float* __restrict__ score,
                                                             int* __restrict__ dst_pos) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t total = static_cast<int64_t>(a.B) * a.S;
  const int hsy = g.h / g.sy, wsx = g.w / g.sx, half = g.k / 2;
  for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; item < total; item += warps) {
    const int b = static_cast<int>(item / a.S), s = static_cast<int>(item % a.S);
    const int64_t tok = token_at(a.src_idx, s, a.S, a.N);
    float best_v = -FLT_MAX;
    int best_i = kNoDst;
    if (tok >= 0) {
      const T* xb = static_cast<const T*>(a.metric) + static_cast<int64_t>(b) * a.N * a.C;
      const float* nb = inv_norm + static_cast<int64_t>(b) * a.N;
      const T* xs = xb + tok * a.C;
      const int cell = cell_of(tok, g), cy = cell / wsx, cx = cell % wsx;
      for (int y = max(0, cy - half); y <= min(hsy - 1, cy + half); ++y) {
        for (int x = max(0, cx - half); x <= min(wsx - 1, cx + half); ++x) {
          const int p = cell_dst[y * wsx + x];
          const int64_t d = p == kNoDst ? -1 : token_at(a.dst_idx, p, a.D, a.N);
          if (d < 0) continue;  // the same for every lane: no divergence around the shuffles
          const T* xd = xb + d * a.C;
          float dot = 0.f;
          // Channels a lane keeps in flight: 2 in fp32 (unrolled 4 times, sm_80 spilled registers to local
          // memory; tests/test_cuda_compile.py fails on any spill), 4 in fp16 / bf16.
          constexpr int kUnroll = sizeof(T) == 4 ? 2 : 4;
#pragma unroll kUnroll
          for (int c = lane; c < a.C; c += 32) dot = fmaf(to_float(xs[c]), to_float(xd[c]), dot);
          for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
          const float v = dot * nb[tok] * nb[d];
          if (better(v, p, best_v, best_i)) {
            best_v = v;
            best_i = p;
          }
        }
      }
    }
    if (lane == 0) {
      score[item] = best_v;
      dst_pos[item] = best_i == kNoDst ? 0 : best_i;
    }
  }
}

}  // namespace

void launch_best_dst_local(const MatchArgs& a, const LocalArgs& g, const float* inv_norm, int* cell_dst, float* score,
                           int* dst_pos, cudaStream_t stream) {
  if (a.B == 0 || a.S == 0 || a.D == 0) return;  // nothing to match (and no zero-sized grid)
  cell_dst_kernel<<<1, 1024, 0, stream>>>(a, g, cell_dst);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t threads = static_cast<int64_t>(a.B) * a.S * 32;
  dispatch_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    best_dst_local_kernel<T><<<blocks_for(threads, 256), 256, 0, stream>>>(a, g, inv_norm, cell_dst, score, dst_pos);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace tomesd

// Merge (segment mean / sum over the CSR rows) and unmerge (gather by slot).
//
// One thread per (row, pack of W channels): merge reads its row's members in raster order and
// accumulates in fp32 (deterministic, no atomics), each x row read once; unmerge copies one pack
// from y[b, slot[b, n]]. Packs are 16 bytes whenever C and the pointers allow it. Plans that are not
// a CSR of N tokens into M rows give unspecified outputs, never an access outside the buffers:
// offsets are clamped to [0, N], members outside [0, N) are skipped, a slot outside [0, M) gives 0.
#include "common.cuh"
#include "rules.h"

namespace tomesd {
namespace {

template <typename T, int W>
__global__ void merge_kernel(const T* __restrict__ x, const int* __restrict__ offsets, const int* __restrict__ members,
                             T* __restrict__ out, int B, int N, int M, int C, bool mean) {
  using P = Pack<T, W>;
  const int V = C / W;
  const int64_t total = static_cast<int64_t>(B) * M * V;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int v = static_cast<int>(i % V);
    const int64_t bm = i / V, b = bm / M, m = bm % M;
    const int o0 = min(max(offsets[b * (M + 1) + m], 0), N);
    const int o1 = min(max(offsets[b * (M + 1) + m + 1], o0), N);
    const int* mem = members + b * N;
    const T* xb = x + b * N * C + static_cast<int64_t>(v) * W;
    float acc[W] = {};
    for (int p = o0; p < o1; ++p) {
      const int n = mem[p];
      if (n < 0 || n >= N) continue;
      const P pk = *reinterpret_cast<const P*>(xb + static_cast<int64_t>(n) * C);
#pragma unroll
      for (int w = 0; w < W; ++w) acc[w] += to_float(pk.v[w]);
    }
    P res;
    const float count = static_cast<float>(o1 - o0);
#pragma unroll
    for (int w = 0; w < W; ++w) res.v[w] = from_float<T>(mean ? acc[w] / count : acc[w]);
    *reinterpret_cast<P*>(out + bm * C + static_cast<int64_t>(v) * W) = res;
  }
}

template <typename T, int W>
__global__ void unmerge_kernel(const T* __restrict__ y, const int64_t* __restrict__ slot, T* __restrict__ out, int B,
                               int N, int M, int C) {
  using P = Pack<T, W>;
  const int V = C / W;
  const int64_t total = static_cast<int64_t>(B) * N * V;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int v = static_cast<int>(i % V);
    const int64_t bn = i / V, b = bn / N, m = slot[bn];
    P pk;
    if (m >= 0 && m < M) {
      pk = *reinterpret_cast<const P*>(y + (b * M + m) * C + static_cast<int64_t>(v) * W);
    } else {
#pragma unroll
      for (int w = 0; w < W; ++w) pk.v[w] = from_float<T>(0.f);
    }
    *reinterpret_cast<P*>(out + bn * C + static_cast<int64_t>(v) * W) = pk;
  }
}

// Calls f(std::integral_constant<int, W>) for the pack width chosen at run time.
template <typename T, typename F>
void dispatch_width(int w, F&& f) {
  switch (w) {
    case 8:
      if constexpr (sizeof(T) <= 2) {
        f(std::integral_constant<int, 8>{});
      } else {
        f(std::integral_constant<int, 4>{});
      }
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    default:
      f(std::integral_constant<int, 1>{});
  }
}

}  // namespace

void launch_merge(DType dtype, const void* x, const int* offsets, const int* members, void* out, int B, int N, int M,
                  int C, bool mean, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    dispatch_width<T>(pack_width(C, sizeof(T), reinterpret_cast<uintptr_t>(x), reinterpret_cast<uintptr_t>(out)), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const int64_t items = static_cast<int64_t>(B) * M * (C / W);
      merge_kernel<T, W><<<blocks_for(items, 256), 256, 0, stream>>>(static_cast<const T*>(x), offsets, members,
                                                                     static_cast<T*>(out), B, N, M, C, mean);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_unmerge(DType dtype, const void* y, const int64_t* slot, void* out, int B, int N, int M, int C,
                    cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    dispatch_width<T>(pack_width(C, sizeof(T), reinterpret_cast<uintptr_t>(y), reinterpret_cast<uintptr_t>(out)), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const int64_t items = static_cast<int64_t>(B) * N * (C / W);
      unmerge_kernel<T, W><<<blocks_for(items, 256), 256, 0, stream>>>(static_cast<const T*>(y), slot,
                                                                       static_cast<T*>(out), B, N, M, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace tomesd

// Device helpers shared by the kernels: conversions, vector packs, dtype dispatch.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "tomesd.h"

namespace tomesd {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// W elements of T moved as one aligned load/store (16 bytes when W * sizeof(T) == 16).
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

// Largest W in {16 / sizeof(T), ..., 1} with C % W == 0 and every base pointer aligned to W elements.
template <typename T>
inline int pack_width(int C, const void* p0, const void* p1) {
  int w = 16 / static_cast<int>(sizeof(T));
  while (w > 1 && (C % w != 0 || reinterpret_cast<uintptr_t>(p0) % (w * sizeof(T)) != 0 ||
                   reinterpret_cast<uintptr_t>(p1) % (w * sizeof(T)) != 0)) {
    w /= 2;
  }
  return w;
}

template <typename F>
inline void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32:
      f(float{});
      break;
    case DType::f16:
      f(__half{});
      break;
    case DType::bf16:
      f(__nv_bfloat16{});
      break;
  }
}

inline unsigned blocks_for(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(blocks < (int64_t{1} << 30) ? (blocks > 0 ? blocks : 1) : (int64_t{1} << 30));
}

}  // namespace tomesd

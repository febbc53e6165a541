// The ranking, selection and sizing rules of the kernels, callable on the host and the device.
//
// Plain C++ outside nvcc, so tests/test_cuda_rules.py compiles this header with the host compiler
// and checks the rules against torch on a CPU. Ranking follows torch.max / torch.topk: every NaN
// (either sign) ranks above every number, and among equals the lower position wins.
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TOMESD_HD __host__ __device__ __forceinline__
#else
#define TOMESD_HD inline
#endif

namespace tomesd {

// Position of "no candidate yet" in a running (max, argmax): loses to every real candidate. Every
// dst slice holds at least one dst, so it never reaches an output.
constexpr int kNoDst = INT_MAX;

TOMESD_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// NaN test on the bits: immune to fast-math folding of `v != v`.
TOMESD_HD bool is_nan(float f) { return (float_bits(f) & 0x7fffffffu) > 0x7f800000u; }

// Candidate (v, dst position i) beats the running best (bv, bi): NaN above numbers, then the higher
// score, then the lower position (torch.max's argmax on a CPU: the first NaN, else the first max).
TOMESD_HD bool better(float v, int i, float bv, int bi) {
  if (i == kNoDst) return false;
  if (bi == kNoDst) return true;
  const bool vn = is_nan(v), bn = is_nan(bv);
  if (vn || bn) return vn && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}

// Unsigned key with the order of the floats, every NaN mapped above +inf (torch.topk's order).
TOMESD_HD uint32_t orderable(float f) {
  if (is_nan(f)) return 0xffffffffu;
  const uint32_t u = float_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Radix-select key of src position s: score order first, then the lower position; unique per s.
TOMESD_HD uint64_t select_key(float score, int s) {
  return (static_cast<uint64_t>(orderable(score)) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(s));
}

// Grid geometry (tests/test_cuda_rules.py reads these to check that the load-time self-check's cases
// reach the paths real workloads take): src x dst tile of the CUDA-core and tensor-core matching
// kernels, threads of the plan kernel (its block scans take ceil(L / kPlanThreads) items per thread).
constexpr int kSimtS = 64, kSimtD = 64;
constexpr int kTcS = 128, kTcD = 64;
constexpr int kPlanThreads = 1024;

// Slices the dst tiles are cut into so that `blocks` src blocks still fill `want` (2 x SMs) slots;
// every slice gets at least one tile. blocks = B x src tiles, 0 for an empty batch or S = 0.
inline int split_count(int64_t blocks, int dtiles, int64_t want) {
  if (blocks <= 0 || blocks >= want || dtiles <= 1) return 1;
  const int64_t splits = (want + blocks - 1) / blocks < dtiles ? (want + blocks - 1) / blocks : dtiles;
  const int64_t per = (dtiles + splits - 1) / splits;
  return static_cast<int>((dtiles + per - 1) / per);
}

// Dst tiles a block walks (the first slices; the last may get fewer).
inline int tiles_per_split(int dtiles, int splits) { return (dtiles + splits - 1) / splits; }

// Whether the tensor-core kernel loads 8 elements at once: C % 8 == 0 and a 16-byte aligned metric.
inline bool vector_loads(int C, uintptr_t metric) { return C % 8 == 0 && metric % 16 == 0; }

// Elements per pack in merge / unmerge: the largest W in {16 / elem_bytes, ..., 1} with C % W == 0
// and both base addresses aligned to W elements.
inline int pack_width(int C, int elem_bytes, uintptr_t p0, uintptr_t p1) {
  int w = 16 / elem_bytes;
  while (w > 1 && (C % w != 0 || p0 % (static_cast<uintptr_t>(w) * elem_bytes) != 0 ||
                   p1 % (static_cast<uintptr_t>(w) * elem_bytes) != 0)) {
    w /= 2;
  }
  return w;
}

// Whether dst[0..D) holds exactly one token of each sy x sx cell of the top-left (h / sy * sy) x
// (w / sx * sx) region of an h x w grid, as local matching takes it (the CPU ops' rule:
// tomesd.ops.torch_ops.check_window). Host only; seen: (h / sy) * (w / sx) bytes of scratch.
inline bool one_dst_per_cell(const int64_t* dst, int64_t D, int64_t h, int64_t w, int64_t sx, int64_t sy,
                             unsigned char* seen) {
  if (h < 1 || w < 1 || sx < 1 || sy < 1) return false;
  const int64_t hsy = h / sy, wsx = w / sx;
  if (D != hsy * wsx) return false;
  for (int64_t c = 0; c < D; ++c) seen[c] = 0;
  for (int64_t i = 0; i < D; ++i) {
    const int64_t t = dst[i];
    if (t < 0 || t >= h * w || t / w >= hsy * sy || t % w >= wsx * sx) return false;
    const int64_t cell = (t / w / sy) * wsx + t % w / sx;
    if (seen[cell]) return false;
    seen[cell] = 1;
  }
  return true;
}

// Whether the tensor-core matching kernel has a body on this device: fp16/bf16, an sm_80+ device,
// and the kernel's code generated from compute_80+ PTX. A build with only older PTX (JIT-compiled
// by the driver for a newer GPU) or only older SASS has the trap stub instead.
// ptx_version / binary_version: cudaFuncAttributes of that kernel (major * 10 + minor), 0 if unknown.
inline bool tensor_cores_usable(bool half_dtype, int device_major, int ptx_version, int binary_version) {
  return half_dtype && device_major >= 8 && ptx_version >= 80 && binary_version >= 80;
}

}  // namespace tomesd

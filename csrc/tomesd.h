// Launchers of the tomesd CUDA kernels: raw pointers and a stream, no torch types, so the .cu files
// compile without torch/extension.h. ops.cpp validates tensors, allocates every buffer through
// PyTorch's caching allocator and calls these on the current stream.
//
// Layouts (b: batch row, n: token, m: output row, s/d: position in src_idx/dst_idx):
//   metric, x: [B, N, C]   y: [B, M, C]   M = N - r
//   slot [B, N] int64: output row of token n        counts [B, M] int32: tokens in row m
//   offsets [B, M + 1] int32, members [B, N] int32: CSR of slot (row m holds
//   members[offsets[m] : offsets[m + 1]], in raster order)
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tomesd {

enum class DType { f32, f16, bf16 };

struct MatchArgs {
  DType dtype;
  const void* metric;      // [B, N, C]
  const int64_t* dst_idx;  // [D] token index of each dst
  const int64_t* src_idx;  // [S] token index of each src
  int B, N, C, S, D;
};

// 1 / max(||x[b, n]||, 1e-12) in fp32 for every token: out [B, N].
void launch_inv_norms(const MatchArgs& a, float* inv_norm, cudaStream_t stream);

// How many slices the dst range is cut into so that small problems still fill the device (1 when
// there is nothing to match).
int match_splits(const MatchArgs& a, int device);

// score [B, S] (best cosine) and dst_pos [B, S] (its position in dst_idx, lowest on ties).
// part_val / part_idx: [B, splits, S] scratch, used when splits > 1.
void launch_best_dst(const MatchArgs& a, const float* inv_norm, int splits, float* part_val, int* part_idx,
                     float* score, int* dst_pos, int device, cudaStream_t stream);

// Local matching on an h x w grid (N = h * w) of sy x sx cells, window k (odd): see local.cu.
struct LocalArgs {
  int h, w, sx, sy, k;
};

// score [B, S] and dst_pos [B, S] of local matching (lowest dst position on ties). cell_dst:
// [(h / sy) * (w / sx)] int32 scratch (dst position of each cell).
void launch_best_dst_local(const MatchArgs& a, const LocalArgs& g, const float* inv_norm, int* cell_dst, float* score,
                           int* dst_pos, cudaStream_t stream);

// Selection of the r best src rows (ties: lower src position; NaN first) and the slot map, one
// block per batch row. Writes slot, counts, offsets and the sort keys/values (b * M + slot, n) of
// every token; target [B, N] is scratch. D: entries of dst_idx (dst_pos is bound-checked).
void launch_plan(const float* score, const int* dst_pos, const int64_t* dst_idx, const int64_t* src_idx, int B,
                 int N, int S, int D, int r, int* target, int64_t* slot, int* counts, int* offsets, uint32_t* keys,
                 int* values, cudaStream_t stream);

// Stable sort of (keys, values) by the low end_bit bits of the key: values_out is the CSR members.
size_t sort_temp_bytes(int items, int end_bit);
void launch_sort(void* temp, size_t temp_bytes, const uint32_t* keys_in, uint32_t* keys_out, const int* values_in,
                 int* values_out, int items, int end_bit, cudaStream_t stream);

// Segment mean (mean) or sum of x [B, N, C] over the CSR rows: out [B, M, C]; fp32 accumulation.
void launch_merge(DType dtype, const void* x, const int* offsets, const int* members, void* out, int B, int N, int M,
                  int C, bool mean, cudaStream_t stream);

// out[b, n] = y[b, slot[b, n]]: y [B, M, C] -> out [B, N, C].
void launch_unmerge(DType dtype, const void* y, const int64_t* slot, void* out, int B, int N, int M, int C,
                    cudaStream_t stream);

}  // namespace tomesd

// Selection of the r best src rows and the MergePlan, without a host synchronization.
//
// One block per batch row:
//   1. radix select of the r largest 64-bit keys (orderable score bits << 32 | ~src position), 8 bits
//      per pass from the top, stopping as soon as the chosen bucket is taken whole; the keys are
//      unique, so exactly r src rows are chosen (on equal scores, the lower src position wins; NaN
//      scores rank first, as in torch.topk: see rules.h);
//   2. target[n]: dst token of each merging src, -1 for kept tokens;
//   3. slot of kept tokens = exclusive scan of the kept mask (raster order, as matching.plan_from_matches);
//      slot of a merging src = slot of its dst; counts by integer atomics (order-free, deterministic);
//   4. offsets = exclusive scan of counts; sort keys (b * M + slot) and values (n) for the CSR.
// A stable radix sort of (key, n) then lists each row's members in raster order (launch_sort).
// Malformed partitions (tokens outside [0, N), repeated, or both dst and src) give unspecified plans
// but no access outside the buffers: out-of-range tokens are skipped, a merging src whose dst is not
// kept gets slot -1, and counts are only written for rows in [0, M).
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"
#include "rules.h"

namespace tomesd {
namespace {

// Exclusive scan over [0, L) of get(i), each thread owning one contiguous range; put(i, prefix) is
// called in order. Returns the total. scratch: at least kPlanThreads / 32 + 1 ints.
template <typename Get, typename Put>
__device__ int block_scan(int L, Get get, Put put, int* scratch) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
  const int per = (L + blockDim.x - 1) / blockDim.x;
  const int lo = min(L, tid * per), hi = min(L, lo + per);
  int local = 0;
  for (int i = lo; i < hi; ++i) local += get(i);
  int incl = local;
  for (int o = 1; o < 32; o *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? scratch[lane] : 0;
    for (int o = 1; o < 32; o *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += v;
    }
    if (lane < warps) scratch[lane] = w;  // inclusive prefix of warp totals
    if (lane == 31) scratch[32] = w;
  }
  __syncthreads();
  int run = (warp > 0 ? scratch[warp - 1] : 0) + incl - local;
  for (int i = lo; i < hi; ++i) {
    const int v = get(i);
    put(i, run);
    run += v;
  }
  const int total = scratch[32];
  __syncthreads();  // scratch is free again
  return total;
}

__global__ void __launch_bounds__(kPlanThreads) plan_kernel(const float* __restrict__ score_all,
                                                            const int* __restrict__ dst_pos_all,
                                                            const int64_t* __restrict__ dst_idx,
                                                            const int64_t* __restrict__ src_idx, int N, int S, int D,
                                                            int r,
                                                            int* __restrict__ target_all, int64_t* __restrict__ slot_all,
                                                            int* __restrict__ counts_all, int* __restrict__ offsets_all,
                                                            uint32_t* __restrict__ keys_all, int* __restrict__ values_all) {
  __shared__ int hist[256];
  __shared__ int scratch[33];
  __shared__ uint64_t sel_prefix;
  __shared__ int sel_k, sel_done, sel_shift;
  const int b = blockIdx.x, tid = threadIdx.x, M = N - r;
  const float* score = score_all + static_cast<int64_t>(b) * S;
  const int* dst_pos = dst_pos_all + static_cast<int64_t>(b) * S;
  int* target = target_all + static_cast<int64_t>(b) * N;
  int64_t* slot = slot_all + static_cast<int64_t>(b) * N;
  int* counts = counts_all + static_cast<int64_t>(b) * M;
  int* offsets = offsets_all + static_cast<int64_t>(b) * (M + 1);

  for (int n = tid; n < N; n += blockDim.x) target[n] = -1;
  if (tid == 0) {
    sel_prefix = 0;
    sel_k = r;
    sel_done = r == 0;
    sel_shift = 64;
  }
  __syncthreads();

  // 1. radix select: after the loop, src s merges iff (key(s) >> sel_shift) >= (sel_prefix >> sel_shift).
  for (int shift = 56; shift >= 0 && !sel_done; shift -= 8) {
    for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const uint64_t prefix = sel_prefix;
    const uint64_t mask = shift == 56 ? 0 : (~uint64_t{0} << (shift + 8));
    for (int s = tid; s < S; s += blockDim.x) {
      const uint64_t key = select_key(score[s], s);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (tid < 32) {  // lane l owns digits 255 - 8l down to 248 - 8l
      const int lane = tid;
      const int k = sel_k;  // every lane reads it before the one that finds the digit rewrites it
      __syncwarp();
      int own = 0;
      for (int j = 0; j < 8; ++j) own += hist[255 - 8 * lane - j];
      int incl = own;
      for (int o = 1; o < 32; o *= 2) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      int above = incl - own;
      if (above < k && k <= incl) {
        for (int j = 0; j < 8; ++j) {
          const int digit = 255 - 8 * lane - j, h = hist[digit];
          if (above + h >= k) {
            sel_prefix = prefix | (static_cast<uint64_t>(digit) << shift);
            sel_k = k - above;
            sel_done = h == k - above;
            sel_shift = shift;
            break;
          }
          above += h;
        }
      }
    }
    __syncthreads();
  }

  // 2. target of each merging src.
  if (r > 0) {
    const int shift = sel_shift;
    const uint64_t threshold = sel_prefix >> shift;
    for (int s = tid; s < S; s += blockDim.x) {
      if ((select_key(score[s], s) >> shift) >= threshold) {
        // best_dst always writes a position in [0, D); the clamp keeps a broken one from reading
        // outside dst_idx (an illegal address would kill the CUDA context).
        const int p = min(max(dst_pos[s], 0), D - 1);
        const int64_t src = src_idx[s], dst = dst_idx[p];
        if (src >= 0 && src < N && dst >= 0 && dst < N) target[src] = static_cast<int>(dst);
      }
    }
  }
  __syncthreads();

  // 3. slot of kept tokens (and counts = 1), then of merging src.
  block_scan(
      N, [&](int n) { return target[n] < 0 ? 1 : 0; },
      [&](int n, int rank) {
        if (target[n] < 0) {
          slot[n] = rank;
          if (rank < M) counts[rank] = 1;  // rank >= M only when a malformed partition repeats a src
        }
      },
      scratch);
  __syncthreads();  // slot of every dst is visible to the whole block
  for (int n = tid; n < N; n += blockDim.x) {
    const int t = target[n];
    if (t >= 0) {
      const int64_t m = target[t] < 0 ? slot[t] : -1;  // a dst that is also a merging src has no slot
      slot[n] = m;
      if (m >= 0 && m < M) atomicAdd(&counts[m], 1);
    }
  }
  __syncthreads();

  // 4. offsets and the CSR sort input.
  block_scan(
      M, [&](int m) { return counts[m]; }, [&](int m, int o) { offsets[m] = o; }, scratch);
  if (tid == 0) offsets[M] = N;
  for (int n = tid; n < N; n += blockDim.x) {
    const int64_t i = static_cast<int64_t>(b) * N + n;
    keys_all[i] = static_cast<uint32_t>(static_cast<int64_t>(b) * M + slot[n]);
    values_all[i] = n;
  }
}

}  // namespace

void launch_plan(const float* score, const int* dst_pos, const int64_t* dst_idx, const int64_t* src_idx, int B,
                 int N, int S, int D, int r, int* target, int64_t* slot, int* counts, int* offsets, uint32_t* keys,
                 int* values, cudaStream_t stream) {
  if (B == 0 || N == 0) return;  // no rows: a zero-sized grid is a launch error
  plan_kernel<<<B, kPlanThreads, 0, stream>>>(score, dst_pos, dst_idx, src_idx, N, S, D, r, target, slot, counts,
                                              offsets, keys, values);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

size_t sort_temp_bytes(int items, int end_bit) {
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr),
                                                 static_cast<uint32_t*>(nullptr), static_cast<const int*>(nullptr),
                                                 static_cast<int*>(nullptr), items, 0, end_bit));
  return bytes;
}

void launch_sort(void* temp, size_t temp_bytes, const uint32_t* keys_in, uint32_t* keys_out, const int* values_in,
                 int* values_out, int items, int end_bit, cudaStream_t stream) {
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, values_in, values_out, items, 0,
                                                 end_bit, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace tomesd

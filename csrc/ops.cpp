// CUDA implementations of the tomesd ops. The schemas are defined once, in Python (tomesd/ops/torch_ops.py),
// so they exist (with CPU and fake impls) on machines without this extension; this file only adds
// the CUDA kernels with TORCH_LIBRARY_IMPL. Every buffer comes from PyTorch's caching allocator and
// every kernel runs on the current stream, so the ops can be captured in a CUDA graph.
//
// Index inputs (dst_idx / src_idx, a plan's slot / offsets / members) are not validated by default:
// that would need a host synchronization per call (and break CUDA-graph capture). The kernels bound
// every access instead, so malformed indices give unspecified outputs but never touch memory outside
// their buffers. TOMESD_CHECK_INDICES=1 (a debug switch, read per call) validates them and raises the
// ValueError of the CPU impls (tomesd/ops/torch_ops.py check_partition / check_window / check_plan).
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "rules.h"
#include "tomesd.h"

namespace tomesd {
namespace {

using at::Tensor;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    default:
      TORCH_CHECK(false, "tomesd: dtype ", t.scalar_type(), " is not fp16, bf16 or fp32");
  }
}

void check_cuda(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "tomesd: ", name, " must be on ", like.device(), ", got ",
              t.device());
}

void check_int_range(int64_t v, const char* what) {
  TORCH_CHECK(v < (int64_t{1} << 31), "tomesd: ", what, " = ", v, " does not fit the kernels' 32-bit indices");
}

bool check_indices() {
  const char* v = std::getenv("TOMESD_CHECK_INDICES");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// TOMESD_CHECK_INDICES=1: dst_idx and src_idx are distinct tokens in [0, N) (one host sync).
void check_partition(const Tensor& dst_idx, const Tensor& src_idx, int64_t N) {
  const Tensor all = at::cat({dst_idx, src_idx});
  if (all.numel() == 0) return;
  const Tensor sorted = std::get<0>(all.sort());
  const bool ok = sorted.select(0, 0).item<int64_t>() >= 0 && sorted.select(0, -1).item<int64_t>() < N &&
                  (all.numel() < 2 || !sorted.slice(0, 1).eq(sorted.slice(0, 0, -1)).any().item<bool>());
  TORCH_CHECK_VALUE(ok, "tomesd: dst_idx and src_idx must be distinct token indices in [0, ", N, ")");
}

// TOMESD_CHECK_INDICES=1: slot in [0, M), offsets rising from 0 to N, members in [0, N) (host syncs).
void check_plan_values(const Tensor& slot, const Tensor& offsets, const Tensor& members) {
  const int64_t N = slot.size(1), M = offsets.size(1) - 1;
  TORCH_CHECK_VALUE(slot.numel() == 0 || (slot.min().item<int64_t>() >= 0 && slot.max().item<int64_t>() < M),
                    "tomesd: slot must be in [0, ", M, ") (the plan's output rows)");
  const bool rising = offsets.select(1, 0).eq(0).all().item<bool>() && offsets.select(1, M).eq(N).all().item<bool>() &&
                      offsets.slice(1, 1).ge(offsets.slice(1, 0, M)).all().item<bool>();
  TORCH_CHECK_VALUE(offsets.numel() == 0 || rising, "tomesd: offsets must rise from 0 to N = ", N, " along each row");
  TORCH_CHECK_VALUE(members.numel() == 0 || (members.min().item<int>() >= 0 && members.max().item<int>() < N),
                    "tomesd: members must be token indices in [0, ", N, ")");
}

MatchArgs match_args(const Tensor& metric, const Tensor& dst_idx, const Tensor& src_idx) {
  TORCH_CHECK(metric.dim() == 3, "tomesd: metric must be [B, N, C], got ", metric.sizes());
  TORCH_CHECK(dst_idx.dim() == 1 && src_idx.dim() == 1, "tomesd: dst_idx and src_idx must be 1-d");
  TORCH_CHECK(dst_idx.scalar_type() == at::kLong && src_idx.scalar_type() == at::kLong,
              "tomesd: dst_idx and src_idx must be int64");
  check_cuda(dst_idx, metric, "dst_idx");
  check_cuda(src_idx, metric, "src_idx");
  check_int_range(metric.size(0) * metric.size(1), "B * N");
  check_int_range(metric.size(0) * std::max<int64_t>(src_idx.numel(), dst_idx.numel()), "B * max(S, D)");
  check_int_range(metric.size(2), "C");
  if (check_indices()) check_partition(dst_idx, src_idx, metric.size(1));
  return MatchArgs{dtype_of(metric), nullptr, nullptr, nullptr, static_cast<int>(metric.size(0)),
                   static_cast<int>(metric.size(1)), static_cast<int>(metric.size(2)),
                   static_cast<int>(src_idx.numel()), static_cast<int>(dst_idx.numel())};
}

// score [B, S] fp32 and dst_pos [B, S] int32, on the current stream.
std::tuple<Tensor, Tensor> run_best_dst(const Tensor& metric, const Tensor& dst_idx, const Tensor& src_idx,
                                        MatchArgs a) {
  a.metric = metric.data_ptr();
  a.dst_idx = dst_idx.data_ptr<int64_t>();
  a.src_idx = src_idx.data_ptr<int64_t>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int device = metric.get_device();
  const auto f32 = metric.options().dtype(at::kFloat);
  const auto i32 = metric.options().dtype(at::kInt);
  Tensor inv_norm = at::empty({a.B, a.N}, f32);
  launch_inv_norms(a, inv_norm.data_ptr<float>(), stream);
  Tensor score = at::empty({a.B, a.S}, f32);
  Tensor dst_pos = at::empty({a.B, a.S}, i32);
  const int splits = match_splits(a, device);
  Tensor part_val, part_idx;
  if (splits > 1) {
    part_val = at::empty({a.B, splits, a.S}, f32);
    part_idx = at::empty({a.B, splits, a.S}, i32);
  }
  launch_best_dst(a, inv_norm.data_ptr<float>(), splits, splits > 1 ? part_val.data_ptr<float>() : nullptr,
                  splits > 1 ? part_idx.data_ptr<int>() : nullptr, score.data_ptr<float>(), dst_pos.data_ptr<int>(),
                  device, stream);
  return {score, dst_pos};
}

// C = 0: every token has norm 0, so every cosine is 0 and the first dst wins (as the PyTorch path);
// no kernel runs (a k-loop of zero steps would skip the barriers the tiles rely on).
std::tuple<Tensor, Tensor> zero_channel_matches(const Tensor& metric, const MatchArgs& a) {
  return {at::zeros({a.B, a.S}, metric.options().dtype(at::kFloat)), at::zeros({a.B, a.S}, metric.options().dtype(at::kLong))};
}

std::tuple<Tensor, Tensor> best_dst_cuda(const Tensor& metric_in, const Tensor& dst_idx_in, const Tensor& src_idx_in) {
  const c10::cuda::CUDAGuard guard(metric_in.device());
  const Tensor metric = metric_in.contiguous(), dst_idx = dst_idx_in.contiguous(), src_idx = src_idx_in.contiguous();
  const MatchArgs a = match_args(metric, dst_idx, src_idx);
  if (a.B == 0 || a.S == 0) {  // nothing to match: empty outputs, no launch (as the PyTorch path)
    return {at::empty({a.B, a.S}, metric.options().dtype(at::kFloat)),
            at::empty({a.B, a.S}, metric.options().dtype(at::kLong))};
  }
  TORCH_CHECK(a.D > 0, "tomesd: dst_idx is empty but ", a.S, " src tokens need a match");
  if (a.C == 0) return zero_channel_matches(metric, a);
  auto [score, dst_pos] = run_best_dst(metric, dst_idx, src_idx, a);
  return {score, dst_pos.to(at::kLong)};
}

// TOMESD_CHECK_INDICES=1: dst_idx holds one token per sy x sx cell of the grid, as local matching
// takes it (one host copy of dst_idx; the CPU ops' check_window).
void check_cells(const Tensor& dst_idx, int64_t h, int64_t w, int64_t sx, int64_t sy) {
  const Tensor host = dst_idx.cpu().contiguous();
  std::vector<unsigned char> seen(static_cast<size_t>(std::max<int64_t>(0, (h / sy) * (w / sx))));
  TORCH_CHECK_VALUE(one_dst_per_cell(host.data_ptr<int64_t>(), host.numel(), h, w, sx, sy, seen.data()),
                    "tomesd: local matching needs one dst token per ", sy, " x ", sx, " cell of the ", h, " x ", w,
                    " grid");
}

// The window's geometry, checked against the metric (host integers only: no synchronization, unless
// TOMESD_CHECK_INDICES=1 asks for the one-dst-per-cell check).
LocalArgs local_args(const MatchArgs& a, const Tensor& dst_idx, int64_t h, int64_t w, int64_t sx, int64_t sy,
                     int64_t k) {
  TORCH_CHECK(h >= 1 && w >= 1 && sx >= 1 && sy >= 1 && h * w == a.N, "tomesd: grid ", h, " x ", w,
              " with cells ", sy, " x ", sx, " does not fit N = ", a.N, " tokens");
  TORCH_CHECK(k >= 1 && k % 2 == 1, "tomesd: match_window must be an odd int >= 1, got ", k);
  TORCH_CHECK(a.D == 0 || (h >= sy && w >= sx), "tomesd: a ", h, " x ", w, " grid has no ", sy, " x ", sx, " cell");
  if (check_indices()) check_cells(dst_idx, h, w, sx, sy);
  return LocalArgs{static_cast<int>(h), static_cast<int>(w), static_cast<int>(sx), static_cast<int>(sy),
                   static_cast<int>(std::min<int64_t>(k, int64_t{1} << 30))};
}

// Local matching: score [B, S] fp32 and dst_pos [B, S] int32, on the current stream.
std::tuple<Tensor, Tensor> run_best_dst_local(const Tensor& metric, const Tensor& dst_idx, const Tensor& src_idx,
                                              MatchArgs a, const LocalArgs& g) {
  a.metric = metric.data_ptr();
  a.dst_idx = dst_idx.data_ptr<int64_t>();
  a.src_idx = src_idx.data_ptr<int64_t>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = metric.options().dtype(at::kFloat);
  const auto i32 = metric.options().dtype(at::kInt);
  Tensor inv_norm = at::empty({a.B, a.N}, f32);
  launch_inv_norms(a, inv_norm.data_ptr<float>(), stream);
  Tensor cell_dst = at::empty({std::max<int64_t>(1, static_cast<int64_t>(g.h / g.sy) * (g.w / g.sx))}, i32);
  Tensor score = at::empty({a.B, a.S}, f32);
  Tensor dst_pos = at::empty({a.B, a.S}, i32);
  launch_best_dst_local(a, g, inv_norm.data_ptr<float>(), cell_dst.data_ptr<int>(), score.data_ptr<float>(),
                        dst_pos.data_ptr<int>(), stream);
  return {score, dst_pos};
}

std::tuple<Tensor, Tensor> best_dst_local_cuda(const Tensor& metric_in, const Tensor& dst_idx_in,
                                               const Tensor& src_idx_in, int64_t h, int64_t w, int64_t sx, int64_t sy,
                                               int64_t window) {
  const c10::cuda::CUDAGuard guard(metric_in.device());
  const Tensor metric = metric_in.contiguous(), dst_idx = dst_idx_in.contiguous(), src_idx = src_idx_in.contiguous();
  const MatchArgs a = match_args(metric, dst_idx, src_idx);
  const LocalArgs g = local_args(a, dst_idx, h, w, sx, sy, window);
  if (a.B == 0 || a.S == 0) {
    return {at::empty({a.B, a.S}, metric.options().dtype(at::kFloat)),
            at::empty({a.B, a.S}, metric.options().dtype(at::kLong))};
  }
  TORCH_CHECK(a.D > 0, "tomesd: dst_idx is empty but ", a.S, " src tokens need a match");
  // C = 0 runs the kernel too (it has no barriers): every cosine is 0 and the lowest dst position of
  // each window wins, as in the PyTorch path (not dst 0, which may lie outside the window).
  auto [score, dst_pos] = run_best_dst_local(metric, dst_idx, src_idx, a, g);
  return {score, dst_pos.to(at::kLong)};
}

// The plan of the r best matches (score [B, S] fp32, dst_pos [B, S] int32): slot, counts, CSR.
std::tuple<Tensor, Tensor, Tensor, Tensor> plan_of_matches(const Tensor& metric, const Tensor& dst_idx,
                                                           const Tensor& src_idx, const MatchArgs& a, int64_t r,
                                                           const Tensor& score, const Tensor& dst_pos) {
  const int B = a.B, N = a.N, M = N - static_cast<int>(r);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto i32 = metric.options().dtype(at::kInt);
  Tensor target = at::empty({B, N}, i32);
  Tensor slot = at::empty({B, N}, metric.options().dtype(at::kLong));
  Tensor counts = at::empty({B, M}, i32);
  Tensor offsets = at::empty({B, M + 1}, i32);
  Tensor keys = at::empty({2, B * static_cast<int64_t>(N)}, i32);
  Tensor values = at::empty({B, N}, i32);
  Tensor members = at::empty({B, N}, i32);
  auto* keys_in = reinterpret_cast<uint32_t*>(keys[0].data_ptr<int>());
  auto* keys_out = reinterpret_cast<uint32_t*>(keys[1].data_ptr<int>());
  launch_plan(score.data_ptr<float>(), dst_pos.data_ptr<int>(), dst_idx.data_ptr<int64_t>(),
              src_idx.data_ptr<int64_t>(), B, N, a.S, a.D, static_cast<int>(r), target.data_ptr<int>(),
              slot.data_ptr<int64_t>(), counts.data_ptr<int>(), offsets.data_ptr<int>(), keys_in,
              values.data_ptr<int>(), stream);
  int end_bit = 1;
  while (end_bit < 32 && (int64_t{1} << end_bit) < static_cast<int64_t>(B) * M) ++end_bit;
  const int items = B * N;
  const size_t temp_bytes = sort_temp_bytes(items, end_bit);
  Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, metric.options().dtype(at::kByte));
  launch_sort(temp.data_ptr(), temp_bytes, keys_in, keys_out, values.data_ptr<int>(), members.data_ptr<int>(), items,
              end_bit, stream);
  return {slot, counts, offsets, members};
}

// build_plan (window = nullptr: global matching) and build_plan_local.
std::tuple<Tensor, Tensor, Tensor, Tensor> build_plan_with(const Tensor& metric_in, const Tensor& dst_idx_in,
                                                           const Tensor& src_idx_in, int64_t r,
                                                           const int64_t* window) {
  const c10::cuda::CUDAGuard guard(metric_in.device());
  const Tensor metric = metric_in.contiguous(), dst_idx = dst_idx_in.contiguous(), src_idx = src_idx_in.contiguous();
  const MatchArgs a = match_args(metric, dst_idx, src_idx);
  LocalArgs g{};
  if (window != nullptr) g = local_args(a, dst_idx, window[0], window[1], window[2], window[3], window[4]);
  TORCH_CHECK(0 <= r && r <= a.S, "tomesd: r = ", r, " must be in [0, ", a.S, "] (the number of src tokens)");
  TORCH_CHECK(r == 0 || a.D > 0, "tomesd: dst_idx is empty but r = ", r, " src tokens must merge");
  const int B = a.B, N = a.N, M = N - static_cast<int>(r);
  const auto i32 = metric.options().dtype(at::kInt);
  if (B == 0 || N == 0) {  // empty plan, no launch: offsets are all N = 0 (the PyTorch path's shapes)
    return {at::empty({B, N}, metric.options().dtype(at::kLong)), at::empty({B, M}, i32), at::zeros({B, M + 1}, i32),
            at::empty({B, N}, i32)};
  }
  Tensor score, dst_pos;
  if (r > 0 && window != nullptr) {  // C = 0 included: see best_dst_local_cuda
    std::tie(score, dst_pos) = run_best_dst_local(metric, dst_idx, src_idx, a, g);
  } else if (r > 0 && a.C == 0) {
    std::tie(score, dst_pos) = zero_channel_matches(metric, a);
    dst_pos = dst_pos.to(at::kInt);
  } else if (r > 0) {
    std::tie(score, dst_pos) = run_best_dst(metric, dst_idx, src_idx, a);
  } else {
    score = at::empty({B, a.S}, metric.options().dtype(at::kFloat));
    dst_pos = at::empty({B, a.S}, i32);
  }
  return plan_of_matches(metric, dst_idx, src_idx, a, r, score, dst_pos);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> build_plan_cuda(const Tensor& metric, const Tensor& dst_idx,
                                                           const Tensor& src_idx, int64_t r) {
  return build_plan_with(metric, dst_idx, src_idx, r, nullptr);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> build_plan_local_cuda(const Tensor& metric, const Tensor& dst_idx,
                                                                 const Tensor& src_idx, int64_t h, int64_t w,
                                                                 int64_t sx, int64_t sy, int64_t window, int64_t r) {
  const int64_t geometry[5] = {h, w, sx, sy, window};
  return build_plan_with(metric, dst_idx, src_idx, r, geometry);
}

void check_plan(const Tensor& t, const Tensor& slot, const Tensor& offsets, const Tensor& members) {
  check_cuda(slot, t, "slot");
  check_cuda(offsets, t, "offsets");
  check_cuda(members, t, "members");
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.dim() == 2, "tomesd: slot must be [B, N] int64");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 2, "tomesd: offsets must be [B, M + 1] int32");
  TORCH_CHECK(members.scalar_type() == at::kInt && members.sizes() == slot.sizes(),
              "tomesd: members must be int32 shaped like slot");
  TORCH_CHECK(offsets.size(0) == slot.size(0) && offsets.size(1) >= 1, "tomesd: offsets must be [B, M + 1]");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == slot.size(0), "tomesd: expected [B, *, C] with B = ", slot.size(0),
              ", got ", t.sizes());
  check_int_range(t.numel() / std::max<int64_t>(t.size(2), 1), "rows");
  if (check_indices()) check_plan_values(slot, offsets, members);
}

Tensor merge_cuda(const Tensor& x_in, const Tensor& slot, const Tensor& offsets_in, const Tensor& members_in,
                  bool mean) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_plan(x_in, slot, offsets_in, members_in);
  TORCH_CHECK(x_in.size(1) == slot.size(1), "tomesd: x has ", x_in.size(1), " tokens, the plan ", slot.size(1));
  const Tensor x = x_in.contiguous(), offsets = offsets_in.contiguous(), members = members_in.contiguous();
  const int B = x.size(0), N = x.size(1), C = x.size(2), M = offsets.size(1) - 1;
  Tensor out = at::empty({B, M, C}, x.options());
  if (out.numel() > 0) {
    launch_merge(dtype_of(x), x.data_ptr(), offsets.data_ptr<int>(), members.data_ptr<int>(), out.data_ptr(), B, N, M,
                 C, mean, c10::cuda::getCurrentCUDAStream());
  }
  return out;
}

Tensor unmerge_cuda(const Tensor& y_in, const Tensor& slot_in, const Tensor& offsets, const Tensor& members) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  check_plan(y_in, slot_in, offsets, members);
  TORCH_CHECK(y_in.size(1) == offsets.size(1) - 1, "tomesd: y has ", y_in.size(1), " rows, the plan ",
              offsets.size(1) - 1);
  const Tensor y = y_in.contiguous(), slot = slot_in.contiguous();
  const int B = y.size(0), M = y.size(1), C = y.size(2), N = slot.size(1);
  Tensor out = at::empty({B, N, C}, y.options());
  if (out.numel() > 0) {
    launch_unmerge(dtype_of(y), y.data_ptr(), slot.data_ptr<int64_t>(), out.data_ptr(), B, N, M, C,
                   c10::cuda::getCurrentCUDAStream());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tomesd, CUDA, m) {
  m.impl("best_dst", &best_dst_cuda);
  m.impl("build_plan", &build_plan_cuda);
  m.impl("best_dst_local", &best_dst_local_cuda);
  m.impl("build_plan_local", &build_plan_local_cuda);
  m.impl("merge", &merge_cuda);
  m.impl("unmerge", &unmerge_cuda);
}

}  // namespace tomesd

// An empty Python module, so a prebuilt extension loads with `import tomesd._C` (the ops register
// themselves when the library is loaded).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

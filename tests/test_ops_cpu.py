"""The tomesd::* torch.library ops on CPU: schemas, fake impls, autograd, tracing, dispatch, and a
line-by-line emulation of the CUDA plan kernel's selection and slot-map logic (csrc/plan.cu)."""
from __future__ import annotations

import struct
import warnings

import pytest
import torch
from torch.library import opcheck

from loader_fakes import broken, fake_loader
from tomesd import info, matching, ops
from tomesd.ops import loader, selfcheck

OPS = torch.ops.tomesd


def _case(B=2, h=8, w=12, C=16, sx=2, sy=2, r=30, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    dst, src = matching.partition(h, w, sx, sy, None, "cpu")
    metric = torch.randn(B, h * w, C, generator=g).to(dtype)
    return metric, dst, src, r


def test_build_plan_op_matches_matching_and_csr():
    metric, dst, src, r = _case()
    slot, counts, offsets, members = OPS.build_plan(metric, dst, src, r)
    plan = matching.build_plan(metric, dst, src, r)
    assert torch.equal(slot, plan.slot) and torch.equal(counts, plan.counts)
    B, N = slot.shape
    assert offsets.dtype == members.dtype == torch.int32 and offsets.shape == (B, N - r + 1)
    for b in range(B):
        for m in range(N - r):
            row = members[b, offsets[b, m] : offsets[b, m + 1]].long()
            assert torch.equal(row, (slot[b] == m).nonzero().flatten())  # raster order inside a row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_all_ops(dtype):
    metric, dst, src, r = _case(dtype=dtype)
    slot, counts, offsets, members = OPS.build_plan(metric, dst, src, r)
    x = torch.randn(2, metric.shape[1], 16, dtype=dtype, requires_grad=True)
    y = torch.randn(2, metric.shape[1] - r, 16, dtype=dtype, requires_grad=True)
    opcheck(OPS.best_dst, (metric, dst, src))
    opcheck(OPS.build_plan, (metric, dst, src, r))
    opcheck(OPS.build_plan, (metric, dst, src, 0))
    opcheck(OPS.merge, (x, slot, offsets, members, True))
    opcheck(OPS.merge, (x, slot, offsets, members, False))
    opcheck(OPS.unmerge, (y, slot, offsets, members))


def test_merge_unmerge_gradients_are_adjoint():
    metric, dst, src, r = _case()
    _, _, offsets, members = plan = OPS.build_plan(metric, dst, src, r)
    slot = plan[0]
    x = torch.randn(2, metric.shape[1], 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, metric.shape[1] - r, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: OPS.merge(t, slot, offsets, members, True), (x,))
    assert torch.autograd.gradcheck(lambda t: OPS.merge(t, slot, offsets, members, False), (x,))
    assert torch.autograd.gradcheck(lambda t: OPS.unmerge(t, slot, offsets, members), (y,))
    assert torch.autograd.gradgradcheck(lambda t: OPS.merge(t, slot, offsets, members, True), (x,))
    assert torch.autograd.gradgradcheck(lambda t: OPS.unmerge(t, slot, offsets, members), (y,))
    # <merge_sum(x), y> == <x, unmerge(y)>
    lhs = (OPS.merge(x, slot, offsets, members, False) * y).sum()
    rhs = (x * OPS.unmerge(y, slot, offsets, members)).sum()
    assert torch.allclose(lhs, rhs)


def test_ops_trace_with_fullgraph():
    metric, dst, src, r = _case()

    def step(metric, x):
        slot, _, offsets, members = OPS.build_plan(metric, dst, src, r)
        return OPS.unmerge(OPS.merge(x, slot, offsets, members, True) * 2, slot, offsets, members)

    x = torch.randn(2, metric.shape[1], 16, requires_grad=True)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(metric, x)
    torch.testing.assert_close(out, step(metric, x))
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_public_ops_trace_with_fullgraph_on_cpu():
    metric, dst, src, r = _case()

    def step(metric, x):
        plan = ops.build_plan(metric, dst, src, r)
        return ops.unmerge(ops.merge(x, plan), plan)

    x = torch.randn(2, metric.shape[1], 16)
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="eager")(metric, x), step(metric, x))


def test_cuda_path_helpers_accept_plans_without_csr():
    metric, dst, src, r = _case()
    plan = matching.build_plan(metric, dst, src, r)
    offsets, members = ops.plan_csr(plan)
    x = torch.randn(2, metric.shape[1], 8)
    torch.testing.assert_close(OPS.merge(x, plan.slot, offsets, members, True), matching.merge(x, plan))


def test_dispatch_on_cpu(monkeypatch):
    t = torch.zeros(1, 4, 2)
    assert ops.choose_backend(t) == ("torch", {"cuda": "tensor is on cpu, not cuda"})
    monkeypatch.setenv("TOMESD_BACKEND", "torch")
    assert ops.choose_backend(t) == ("torch", {"cuda": "TOMESD_BACKEND=torch"})
    monkeypatch.setenv("TOMESD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="TOMESD_BACKEND=cuda"):
        ops.choose_backend(t)
    monkeypatch.setenv("TOMESD_BACKEND", "fast")
    with pytest.raises(ValueError):
        ops.choose_backend(t)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure path")
def test_failed_load_warns_once_and_keeps_reason(monkeypatch):
    monkeypatch.setattr(loader, "loader", loader.Loader(prebuilt_available=lambda: False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = loader.load_error(), loader.load_error()
    assert first == second and first and ("CPU-only" in first or "no CUDA device" in first)
    assert len([w for w in caught if "tomesd" in str(w.message)]) == 1
    assert "extension unavailable" in ops.cuda_refusal_for("cuda", torch.float16)
    loader.reset()
    assert not loader.loader.tried and loader.loaded_from() == "" and loader.self_check_status() == "not run"


# ---- Malformed indices: the CPU impls raise (the CUDA kernels stay in bounds; tests/test_cuda_kernels.py) ----

@pytest.mark.parametrize("bad", ["repeated src", "out of range", "negative", "dst also src"])
def test_ops_refuse_malformed_partitions(bad):
    metric, dst, src, r = _case()
    N = metric.shape[1]
    src = {"repeated src": torch.cat([src[:1], src]), "out of range": torch.cat([src[:-1], torch.tensor([N])]),
           "negative": torch.cat([torch.tensor([-1]), src[1:]]), "dst also src": torch.cat([src[:-1], dst[:1]])}[bad]
    message = rf"distinct token indices in \[0, {N}\)"
    with pytest.raises(ValueError, match=message):
        OPS.build_plan(metric, dst, src, r)
    with pytest.raises(ValueError, match=message):
        OPS.best_dst(metric, dst, src)


def test_ops_refuse_malformed_plans():
    metric, dst, src, r = _case()
    slot, _, offsets, members = OPS.build_plan(metric, dst, src, r)
    x = torch.randn(2, metric.shape[1], 4)
    y = torch.randn(2, metric.shape[1] - r, 4)
    bad_slot = slot.clone()
    bad_slot[0, 3] = metric.shape[1] - r
    with pytest.raises(ValueError, match="slot must be in"):
        OPS.unmerge(y, bad_slot, offsets, members)
    with pytest.raises(ValueError, match="slot must be in"):
        OPS.merge(x, bad_slot, offsets, members, True)
    with pytest.raises(ValueError, match="offsets must rise"):
        OPS.merge(x, slot, offsets.flip(1).contiguous(), members, True)
    with pytest.raises(ValueError, match="members must be"):
        OPS.merge(x, slot, offsets, members - 1, True)
    with pytest.raises(RuntimeError, match="r = 73 must be in"):
        OPS.build_plan(metric, dst, src, len(src) + 1)


# ---- The self-check the loaded kernels run before first use on a device (tomesd/ops/selfcheck.py) ----

def _sum_merge(x, slot, offsets, members, mean):
    return OPS.merge(x, slot, offsets, members, False)


def _mean_only_merge(x, slot, offsets, members, mean):  # mean=False (unmerge's backward) gives the mean
    return OPS.merge(x, slot, offsets, members, True)


def _shifted_best_dst(metric, dst, src):
    score, pos = OPS.best_dst(metric, dst, src)
    return score, (pos + 1) % len(dst)


def _stride_blind_best_dst(metric, dst, src):  # reads the storage as if the metric were contiguous
    dense = torch.as_strided(metric, metric.shape, torch.empty(metric.shape).stride(), metric.storage_offset())
    return OPS.best_dst(dense, dst, src)


def _tail_dropping_best_dst(metric, dst, src):  # the channels past the last whole 8-element vector are lost
    kept = metric.clone()
    kept[..., metric.shape[-1] // 8 * 8 :] = 0
    return OPS.best_dst(kept, dst, src)


def _swap_two_rows(slot):
    slot = slot.clone()
    slot[slot == 0], slot[slot == 1] = 1, 0  # two output rows trade places: a valid but different plan
    return slot


def _swapped_build_plan(metric, dst, src, r):
    slot, counts, offsets, members = OPS.build_plan(metric, dst, src, r)
    return _swap_two_rows(slot), counts, offsets, members


def _wrong_at_r_equals_s_build_plan(metric, dst, src, r):
    slot, counts, offsets, members = OPS.build_plan(metric, dst, src, r)
    return (_swap_two_rows(slot) if r == len(src) else slot), counts, offsets, members


def _shifted_unmerge(y, slot, offsets, members):
    return OPS.unmerge(y.roll(1, dims=1), slot, offsets, members)


def _raising_merge(*args):
    raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")


def test_self_check_accepts_the_reference_implementation():
    assert selfcheck.self_check(selfcheck.torch_kernels(), "cpu") == ""


def test_self_check_needs_no_default_device(monkeypatch):
    """Every tensor of the check's CPU side names its device: with torch.set_default_device("cuda") a
    CPU-only torch raises on any implicit one, a CUDA torch would mix devices."""
    torch.set_default_device("cuda")
    try:
        reason = selfcheck.self_check(selfcheck.torch_kernels(), "cpu")
    finally:
        torch.set_default_device(None)
    assert reason == ""


@pytest.mark.parametrize("fns, message", [
    (dict(merge=_sum_merge), "merge differs from the segment mean"),
    (dict(merge=_mean_only_merge), "merge differs from the segment sum (mean=False)"),
    (dict(best_dst=_shifted_best_dst), "best_dst picked a dst"),
    (dict(best_dst=_stride_blind_best_dst), "strided)"),
    (dict(best_dst=_tail_dropping_best_dst), "best_dst"),
    (dict(build_plan=_swapped_build_plan), "slot map differs"),
    (dict(build_plan=_wrong_at_r_equals_s_build_plan), "slot map differs"),
    (dict(unmerge=_shifted_unmerge), "unmerge differs"),
    (dict(merge=_raising_merge), "RuntimeError: CUDA error: an illegal memory access was encountered ("),
])
def test_self_check_refuses_wrong_kernels(fns, message):
    reason = selfcheck.self_check(broken(**fns), "cpu")
    assert message in reason and "metric [" in reason and "\n" not in reason


def test_first_load_announces_the_build_and_passes_the_self_check(monkeypatch, tmp_path, caplog):
    fake_loader(monkeypatch, tmp_path, selfcheck.torch_kernels)
    with caplog.at_level("WARNING", logger="tomesd"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loader.load_error("cuda:0") == "" and loader.load_error("cuda:0") == ""
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "building the CUDA kernels (one-time" in messages[0]
    assert "CUDA kernels built in" in messages[1]
    assert loader.loaded_from().startswith("JIT-built") and loader.self_check_status().startswith("passed")
    caplog.clear()
    loader.reset()
    assert loader.self_check_status() == "not run"
    assert loader.load_error("cuda:0") == "" and not caplog.records  # cached: loads silently


def test_self_check_failure_refuses_the_backend_with_its_reason(monkeypatch, tmp_path, capsys):
    fake_loader(monkeypatch, tmp_path, lambda: broken(merge=_sum_merge))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = loader.load_error("cuda:0"), loader.load_error("cuda:0")
    assert first == second and "self-check against the PyTorch path on cuda:0 failed: merge differs" in first
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning) and "tomesd" in str(w.message)]) == 1
    assert loader.loaded_from().startswith("JIT-built") and loader.self_check_status().startswith("failed: merge differs")
    assert "self-check" in ops.cuda_refusal_for("cuda:0", torch.float16)
    rows = dict(info.report(build=False))
    assert rows["kernel self-check"].startswith("failed: merge differs")


def test_self_check_runs_once_per_device_on_that_device(monkeypatch, tmp_path):
    """A model on cuda:1 is checked on cuda:1 (not the current device); a failure there refuses
    that device only."""
    kernels = iter([broken(merge=_sum_merge), selfcheck.torch_kernels()])
    checked = []
    fake_loader(monkeypatch, tmp_path, lambda: next(kernels), checked=checked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert "failed: merge differs" in ops.cuda_refusal_for("cuda:1", torch.float16)
    assert ops.cuda_refusal_for("cuda:0", torch.float32) == "" and ops.cuda_refusal_for("cuda:1", torch.float32)
    assert checked == [torch.device("cuda", 1), torch.device("cuda", 0)]  # once each
    status = loader.self_check_status()
    assert status.startswith("cuda:1: failed: merge differs") and "cuda:0: passed" in status


def test_csrc_is_found_and_info_runs(capsys):
    assert loader.csrc_dir() is not None and loader.sources()
    info.main(["--no-build"])
    out = capsys.readouterr().out
    assert "backend for" in out and "kernel sources" in out


# ---- Emulation of csrc/plan.cu (same integer logic, in Python) ----

def _orderable(f: float) -> int:
    """rules.h orderable (tests/test_cuda_rules.py checks this twin against the compiled one)."""
    u = struct.unpack("<I", struct.pack("<f", f))[0]
    if u & 0x7FFFFFFF > 0x7F800000:  # NaN of either sign: above +inf, as torch.topk ranks it
        return 0xFFFFFFFF
    return (~u & 0xFFFFFFFF) if u & 0x80000000 else (u | 0x80000000)


def _radix_select(score: list, r: int) -> list:
    """plan_kernel step 1: which src rows merge (the r largest (score, -position) keys)."""
    keys = [(_orderable(s) << 32) | (~i & 0xFFFFFFFF) for i, s in enumerate(score)]
    prefix, k, shift, done = 0, r, 64, r == 0
    for sh in range(56, -1, -8):
        if done:
            break
        mask = 0 if sh == 56 else ((1 << 64) - 1) & ~((1 << (sh + 8)) - 1)
        hist = [0] * 256
        for key in keys:
            if key & mask == prefix:
                hist[(key >> sh) & 255] += 1
        above = 0
        for digit in range(255, -1, -1):
            if above + hist[digit] >= k:
                prefix |= digit << sh
                k -= above
                done = hist[digit] == k
                shift = sh
                break
            above += hist[digit]
    return [r > 0 and (key >> shift) >= (prefix >> shift) for key in keys]


def _emulated_plan(score, dst_pos, dst_idx, src_idx, r, N):
    B = score.shape[0]
    slots, members_all = [], []
    for b in range(B):
        chosen = _radix_select(score[b].tolist(), r)
        target = [-1] * N
        for s, c in enumerate(chosen):
            if c:
                target[int(src_idx[s])] = int(dst_idx[dst_pos[b, s]])
        slot, rank = [0] * N, 0
        for n in range(N):  # exclusive scan of the kept mask
            if target[n] < 0:
                slot[n], rank = rank, rank + 1
        for n in range(N):
            if target[n] >= 0:
                slot[n] = slot[target[n]]
        slots.append(slot)
        members_all.append(sorted(range(N), key=lambda n: slot[n]))  # stable radix sort by (b*M + slot)
    return torch.tensor(slots), torch.tensor(members_all)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("r", [1, 17, 40, 72])
def test_emulated_kernel_plan_matches_torch_plan(ties, r):
    metric, dst, src, _ = _case(h=12, w=10, seed=r)
    score, dst_pos = matching.best_dst(metric, dst, src)
    if ties:  # few distinct values, and a negative one: ties must go to the lower src position
        score = (score * 3).round() / 3 - 0.5
    slot, members = _emulated_plan(score, dst_pos, dst, src, r, metric.shape[1])
    if ties:  # topk breaks ties arbitrarily; the kernel takes the lower src position
        order = torch.stack([torch.tensor(sorted(range(len(s)), key=lambda i: (-s[i].item(), i))) for s in score])
        chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order[:, :r], True)
        sel = torch.stack([torch.tensor(_radix_select(s.tolist(), r)) for s in score])
        assert torch.equal(sel, chosen)
        assert all(len(set(row.tolist())) == metric.shape[1] - r for row in slot)
    else:
        plan = matching.plan_from_matches(score, dst_pos, dst, src, r, metric.shape[1])
        assert torch.equal(slot, plan.slot)
        assert torch.equal(members.int(), ops.csr(plan.slot, plan.counts)[1])


@pytest.mark.parametrize("r", [3, 20])
def test_emulated_selection_takes_nan_scores_first_as_topk(r):
    """A NaN or Inf token gives NaN scores (both paths); topk ranks NaN above every number and the
    radix select must too, or the plan would differ from the PyTorch path's."""
    metric, dst, src, _ = _case(h=12, w=10, seed=r)
    score, dst_pos = matching.best_dst(metric, dst, src)
    score[0, [4, 9, 30]] = float("nan")
    score[1, 7] = -float("nan")
    score[1, 8] = float("inf")
    sel = torch.stack([torch.tensor(_radix_select(row.tolist(), r)) for row in score])
    chosen = torch.zeros_like(sel).scatter_(1, score.topk(r, dim=-1).indices, True)
    assert torch.equal(sel, chosen)
    slot, _ = _emulated_plan(score, dst_pos, dst, src, r, metric.shape[1])
    assert torch.equal(slot, matching.plan_from_matches(score, dst_pos, dst, src, r, metric.shape[1]).slot)


def test_empty_batch_and_empty_grid_give_empty_outputs():
    """B = 0 or N = 0: empty plans with the PyTorch path's shapes (the CUDA op returns the same
    without a launch; tests/test_cuda_kernels.py compares them on a GPU)."""
    metric, dst, src, r = _case(B=0)
    assert [t.shape for t in OPS.build_plan(metric, dst, src, r)] == [(0, 96), (0, 66), (0, 67), (0, 96)]
    assert [t.shape for t in OPS.best_dst(metric, dst, src)] == [(0, 72), (0, 72)]
    dst0, src0 = matching.partition(0, 0, 2, 2, None, "cpu")
    empty = torch.zeros(2, 0, 8)
    assert [t.shape for t in OPS.build_plan(empty, dst0, src0, 0)] == [(2, 0), (2, 0), (2, 1), (2, 0)]
    assert [t.shape for t in OPS.best_dst(empty, dst0, src0)] == [(2, 0), (2, 0)]


def test_bogus_backend_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setenv("TOMESD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TOMESD_BACKEND='bogus' is not one of auto, torch, cuda"):
        ops.choose_backend(torch.zeros(1))
    with pytest.raises(SystemExit) as exit_info:
        info.main(["--no-build"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("python -m tomesd.info: error: TOMESD_BACKEND='bogus' is not one of "
                                            "auto, torch, cuda (unset it for auto)")

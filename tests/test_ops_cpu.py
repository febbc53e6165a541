"""The tomesd::* torch.library ops on CPU: schemas, fake impls, autograd, tracing, dispatch, and a
line-by-line emulation of the CUDA plan kernel's selection and slot-map logic (csrc/plan.cu)."""
from __future__ import annotations

import struct
import warnings

import pytest
import torch
from torch.library import opcheck

from tomesd import _build, info, matching, ops

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
    offsets, members = ops._plan_csr(plan)
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
    monkeypatch.setattr(_build, "_state", {"tried": False, "error": "", "how": ""})
    monkeypatch.setattr(_build, "prebuilt_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = _build.load_error(), _build.load_error()
    assert first == second and first and ("CPU-only" in first or "no CUDA device" in first)
    assert len([w for w in caught if "tomesd" in str(w.message)]) == 1
    assert "extension unavailable" in ops._cuda_refusal("cuda", torch.float16)


def test_csrc_is_found_and_info_runs(capsys):
    assert _build.csrc_dir() is not None and _build.sources()
    info.main(["--no-build"])
    out = capsys.readouterr().out
    assert "backend for" in out and "kernel sources" in out


# ---- Emulation of csrc/plan.cu (same integer logic, in Python) ----

def _orderable(f: float) -> int:
    u = struct.unpack("<I", struct.pack("<f", f))[0]
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

"""The CUDA kernels against the PyTorch path (needs a GPU; skipped without one), on ordinary inputs and at
the edges: NaN / Inf tokens, empty batches and grids, malformed indices, 70,000 rows, zero channels, races.

Pairs: the kernel's plan equals matching.plan_from_matches applied to the kernel's own (score,
dst_pos) exactly, and the kernel's best_dst matches matching.best_dst except where two candidates
are within rounding of each other. Values: the error of each kernel against an fp64 evaluation of
the same plan is at most twice the PyTorch path's own error in that dtype (plus a tiny floor).
"""
from __future__ import annotations

import random

import pytest
import torch
from torch.library import opcheck

from cuda_cases import DTYPES, SCORE_TOL, case as _case, malformed as _malformed
from tomesd import matching, ops

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_kernels")]
OPS = torch.ops.tomesd


SHAPES = [  # B, h, w, C, sx, sy
    (1, 8, 8, 8, 2, 2), (2, 13, 21, 40, 2, 2), (3, 17, 9, 77, 3, 2), (2, 64, 64, 320, 2, 2),
    (8, 32, 48, 640, 2, 2), (2, 45, 31, 1280, 1, 2), (1, 128, 128, 320, 2, 2), (2, 256, 256, 320, 2, 2),
]


def _random_shapes(n=6, seed=0):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        sx, sy = rnd.choice([(2, 2), (1, 2), (2, 1), (3, 3), (4, 2)])
        out.append((rnd.randint(1, 8), rnd.randint(sy, 70), rnd.randint(sx, 70), rnd.choice([8, 24, 64, 100, 160, 1280]), sx, sy))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + _random_shapes())
def test_best_dst_matches_torch_path(shape, dtype):
    metric, dst, src, _ = _case(*shape, dtype=dtype, seed=sum(shape))
    score, pos = OPS.best_dst(metric, dst, src)
    ref_score, ref_pos = matching.best_dst(metric, dst, src)
    tol = SCORE_TOL[dtype]
    torch.testing.assert_close(score, ref_score, atol=tol, rtol=0)
    differ = pos != ref_pos
    if differ.any():  # only near-ties may pick another dst: its exact score must be within tolerance
        m = metric.double()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        b, s = differ.nonzero(as_tuple=True)
        a = m[b, src[s]]
        exact = (a * m[b, dst[pos[b, s]]]).sum(-1), (a * m[b, dst[ref_pos[b, s]]]).sum(-1)
        assert torch.all((exact[0] - exact[1]).abs() <= 2 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + _random_shapes(seed=1))
def test_plan_pairs_and_csr(shape, dtype):
    metric, dst, src, r = _case(*shape, dtype=dtype, seed=sum(shape) + 1)
    slot, counts, offsets, members = OPS.build_plan(metric, dst, src, r)
    score, pos = OPS.best_dst(metric, dst, src)
    ref = matching.plan_from_matches(score, pos, dst, src, r, metric.shape[1])
    assert torch.equal(slot, ref.slot), "selection or slot map differs from the PyTorch path"
    assert torch.equal(counts, ref.counts)
    exp_offsets, exp_members = ops.csr(ref.slot, ref.counts)
    assert torch.equal(offsets, exp_offsets) and torch.equal(members, exp_members)
    again = OPS.build_plan(metric, dst, src, r)
    assert all(torch.equal(u, v) for u, v in zip(again, (slot, counts, offsets, members)))


def test_zero_norm_tokens_and_r_zero():
    metric, dst, src, r = _case(2, 16, 16, 64, 2, 2, torch.float16, seed=5)
    metric[:, ::3] = 0
    score, pos = OPS.best_dst(metric, dst, src)
    assert torch.isfinite(score).all()
    ref = matching.plan_from_matches(score, pos, dst, src, r, metric.shape[1])
    assert torch.equal(OPS.build_plan(metric, dst, src, r)[0], ref.slot)
    slot, counts, _, _ = OPS.build_plan(metric, dst, src, 0)
    assert torch.equal(slot, torch.arange(256, device="cuda").expand(2, 256)) and bool((counts == 1).all())


def _value_error(fn, ref64):
    return (fn.double() - ref64).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 64, 64, 320, 2, 2), (3, 17, 9, 77, 3, 2), (8, 32, 48, 1280, 2, 2), (2, 256, 256, 320, 2, 2)])
def test_merge_unmerge_values(shape, dtype):
    metric, dst, src, r = _case(*shape, dtype=dtype, seed=3)
    plan = ops.build_plan(metric, dst, src, r)
    x = torch.randn_like(metric) * 4
    ref = matching.merge(x.double(), plan)
    floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
    merged = ops.merge(x, plan)
    bound = 2 * _value_error(matching.merge(x, plan), ref) + floor
    assert _value_error(merged, ref) <= bound
    assert torch.equal(ops.merge(x, plan), merged)  # deterministic
    y = torch.randn(x.shape[0], plan.num_out, x.shape[2], device="cuda").to(dtype)
    assert torch.equal(ops.unmerge(y, plan), matching.unmerge(y, plan))  # a gather is exact
    summed = OPS.merge(x, plan.slot, plan.offsets, plan.members, False)
    assert _value_error(summed, ref * plan.counts[..., None]) <= bound * plan.counts.max().item()


def test_opcheck_cuda():
    metric, dst, src, r = _case(2, 24, 20, 64, 2, 2, torch.float16, seed=9)
    slot, _, offsets, members = OPS.build_plan(metric, dst, src, r)
    x = torch.randn_like(metric, requires_grad=True)
    y = torch.randn(2, metric.shape[1] - r, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    opcheck(OPS.best_dst, (metric, dst, src))
    opcheck(OPS.build_plan, (metric, dst, src, r))
    opcheck(OPS.merge, (x, slot, offsets, members, True))
    opcheck(OPS.unmerge, (y, slot, offsets, members))


def test_gradients_match_cpu():
    metric, dst, src, r = _case(2, 24, 20, 48, 2, 2, torch.float32, seed=11)
    plan = [t for t in OPS.build_plan(metric, dst, src, r)]
    x = torch.randn_like(metric, requires_grad=True)
    w = torch.randn(2, metric.shape[1] - r, 48, device="cuda")
    out = OPS.unmerge(OPS.merge(x, plan[0], plan[2], plan[3], True) * w, plan[0], plan[2], plan[3])
    out.square().sum().backward()
    xc = x.detach().cpu().requires_grad_()
    cpu = [t.cpu() for t in plan]
    out_c = OPS.unmerge(OPS.merge(xc, cpu[0], cpu[2], cpu[3], True) * w.cpu(), cpu[0], cpu[2], cpu[3])
    out_c.square().sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xc.grad, rtol=1e-5, atol=1e-5)


def test_nan_and_inf_tokens_give_nan_like_the_torch_path():
    """A NaN or Inf token makes NaN scores on both paths; the kernels rank NaN as torch.max / topk
    do, so an all-NaN row still gets a valid dst (no read of dst_idx[INT_MAX]) and the context lives."""
    metric, dst, src, r = _case(3, 16, 12, 64, 2, 2, torch.float16, seed=13)
    metric[0, 5] = float("nan")
    metric[1, 17] = float("inf")
    metric[2] = float("nan")  # every score of this batch row is NaN
    score, pos = OPS.best_dst(metric, dst, src)
    ref_score, ref_pos = matching.best_dst(metric, dst, src)
    assert torch.equal(score.isnan(), ref_score.isnan()) and bool(score.isnan()[2].all())
    assert bool(((pos >= 0) & (pos < len(dst))).all())
    assert torch.equal(pos[2], ref_pos[2])  # all NaN: the first dst, as torch.max
    slot, counts, offsets, members = OPS.build_plan(metric, dst, src, r)
    torch.cuda.synchronize()
    assert bool(((slot >= 0) & (slot < metric.shape[1] - r)).all()) and int(counts.sum()) == 3 * metric.shape[1]
    ref = matching.plan_from_matches(score, pos, dst, src, r, metric.shape[1])
    assert torch.equal(slot[2], ref.slot[2])  # all-NaN row: the lowest src positions merge into dst 0
    merged = ops.merge(metric, ops.build_plan(metric, dst, src, r))
    ref_merged = matching.merge(metric, matching.build_plan(metric, dst, src, r))
    bad_rows = (~torch.isfinite(merged)).any(-1).sum(-1)  # output rows holding a NaN or Inf token
    assert torch.equal(bad_rows, (~torch.isfinite(ref_merged)).any(-1).sum(-1))
    assert bad_rows.tolist()[:2] == [1, 1] and bool(merged[2].isnan().all())
    healthy, hdst, hsrc, _ = _case(1, 8, 8, 8, 2, 2, torch.float32, seed=1)
    assert torch.isfinite(OPS.best_dst(healthy, hdst, hsrc)[0]).all()  # the context still works


@pytest.mark.parametrize("B, h, w", [(0, 16, 12), (2, 0, 0), (0, 0, 0)])
def test_empty_batch_or_grid_returns_empty_outputs(B, h, w):
    dst, src = matching.partition(h, w, 2, 2, None, "cuda")
    metric = torch.randn(B, h * w, 32, device="cuda", dtype=torch.float16)
    r = len(src) // 2
    outs = OPS.build_plan(metric, dst, src, r)
    cpu = OPS.build_plan(metric.cpu(), dst.cpu(), src.cpu(), r)
    assert [t.shape for t in outs] == [t.shape for t in cpu] and all(t.is_cuda for t in outs)
    assert [t.shape for t in OPS.best_dst(metric, dst, src)] == [(B, len(src))] * 2
    slot, _, offsets, members = outs
    x = torch.randn(B, h * w, 32, device="cuda", dtype=torch.float16)
    assert OPS.merge(x, slot, offsets, members, True).shape == (B, h * w - r, 32)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["repeated src", "out of range", "negative", "dst also src"])
def test_malformed_indices_never_corrupt_memory(kind, dtype, monkeypatch):
    """Without TOMESD_CHECK_INDICES the kernels stay inside their buffers (unspecified outputs, a
    live context); with it, the ops raise the CPU impls' ValueError."""
    metric, dst, src, _ = _case(2, 40, 36, 64, 2, 2, dtype, seed=21)
    N = metric.shape[1]
    bad_dst, bad_src = _malformed(kind, dst, src, N)
    r = len(bad_src)  # every src merges: the case that wrote out of bounds before
    monkeypatch.delenv("TOMESD_CHECK_INDICES", raising=False)
    OPS.best_dst(metric, bad_dst, bad_src)
    slot, counts, offsets, members = OPS.build_plan(metric, bad_dst, bad_src, r)
    x = torch.randn(2, N, 64, device="cuda", dtype=dtype)
    OPS.unmerge(OPS.merge(x, slot, offsets, members, True), slot, offsets, members)
    bad_slot = slot.clone()
    bad_slot[:, ::7] = 10**9
    OPS.unmerge(torch.randn(2, N - r, 64, device="cuda", dtype=dtype), bad_slot, offsets, members)
    OPS.merge(x, slot, offsets * 1000 - 7, members - 5, True)
    torch.cuda.synchronize()
    healthy, hdst, hsrc, hr = _case(1, 8, 8, 8, 2, 2, torch.float32, seed=1)
    assert torch.equal(OPS.build_plan(healthy, hdst, hsrc, hr)[0], OPS.build_plan(healthy.cpu(), hdst.cpu(), hsrc.cpu(), hr)[0].cuda())
    monkeypatch.setenv("TOMESD_CHECK_INDICES", "1")
    with pytest.raises(ValueError, match="distinct token indices"):
        OPS.build_plan(metric, bad_dst, bad_src, r)
    with pytest.raises(ValueError, match="slot must be in"):
        OPS.unmerge(torch.randn(2, N - r, 64, device="cuda", dtype=dtype), bad_slot, offsets, members)


def test_batch_over_65535_rows():
    """The batch is folded into grid.x: 70,000 rows launch and match the PyTorch path."""
    metric, dst, src, r = _case(70_000, 4, 4, 8, 2, 2, torch.float16, seed=17)
    score, pos = OPS.best_dst(metric, dst, src)
    ref_score, _ = matching.best_dst(metric, dst, src)
    torch.testing.assert_close(score, ref_score, atol=SCORE_TOL[torch.float16], rtol=0)
    slot = OPS.build_plan(metric, dst, src, r)[0]
    assert torch.equal(slot, matching.plan_from_matches(score, pos, dst, src, r, 16).slot)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_channels(dtype):
    """C = 0: every cosine is 0, the first dst wins (as the PyTorch path); no kernel reads a channel."""
    metric, dst, src, r = _case(2, 12, 10, 0, 2, 2, dtype, seed=19)
    score, pos = OPS.best_dst(metric, dst, src)
    ref_score, ref_pos = OPS.best_dst(metric.cpu(), dst.cpu(), src.cpu())
    assert torch.equal(score.cpu(), ref_score) and torch.equal(pos.cpu(), ref_pos)
    slot, counts, offsets, members = OPS.build_plan(metric, dst, src, r)
    assert bool(((slot >= 0) & (slot < 120 - r)).all()) and int(counts.sum()) == 2 * 120
    assert OPS.merge(metric, slot, offsets, members, True).shape == (2, 120 - r, 0)


def test_plan_kernel_has_no_shared_memory_races(tmp_path):
    """compute-sanitizer racecheck over build_plan (the radix select's sel_k handoff, the scans)."""
    import shutil
    import subprocess
    import sys

    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = ("import torch, tomesd\nfrom tomesd import matching\n"
              "dst, src = matching.partition(40, 36, 2, 2, None, 'cuda')\n"
              "m = torch.randn(2, 1440, 64, device='cuda', dtype=torch.float16)\n"
              "torch.ops.tomesd.build_plan(m, dst, src, 700)\ntorch.cuda.synchronize()\n")
    proc = subprocess.run([sanitizer, "--tool", "racecheck", "--error-exitcode", "3", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

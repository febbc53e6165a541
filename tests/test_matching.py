"""The PyTorch path against the independent reference (tests/reference.py), and its fp16 sums."""
import random

import pytest
import torch

import reference
from tomesd import matching, ops
from tomesd.config import max_ratio
from tomesd.matching import MergePlan, merge

# Per-dtype tolerance of a merged mean against the float64 reference: a few ulps at magnitude ~3.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _case(rng: random.Random):
    sx, sy = rng.randint(1, 4), rng.randint(1, 4)
    h, w = rng.randint(sy, 13), rng.randint(sx, 13)
    B = rng.randint(1, 3)
    C = rng.choice([3, 8, 17])
    hi = max_ratio(sx, sy)
    ratio = rng.choice([0.0, hi, rng.uniform(0, hi)])
    return B, h, w, C, sx, sy, ratio


CASES = [_case(random.Random(seed)) for seed in range(40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,h,w,C,sx,sy,ratio", CASES)
def test_plan_matches_reference(B, h, w, C, sx, sy, ratio, dtype):
    g = torch.Generator().manual_seed(h * 131 + w * 7 + C)
    x = torch.randn(B, h * w, C, generator=g).to(dtype)
    N = h * w
    dst_idx, src_idx = matching.partition(h, w, sx, sy, None, "cpu")
    r = min(int(N * ratio), len(src_idx))
    want_groups = reference.groups(x, h, w, sx, sy, r)
    want_merged, want_spread = reference.merge_unmerge(x, want_groups)
    if r == 0:
        assert want_merged.shape[1] == N
        return
    plan = ops.build_plan(x, dst_idx, src_idx, r)
    assert plan.num_out == N - r and plan.slot.shape == (B, N) and plan.counts.shape == (B, N - r)
    got_groups = [
        sorted(sorted(torch.nonzero(plan.slot[b] == m).flatten().tolist()) for m in range(N - r)) for b in range(B)
    ]
    assert got_groups == [sorted(sorted(v) for v in row.values()) for row in want_groups]
    merged = ops.merge(x, plan)
    assert merged.dtype == dtype and merged.shape == (B, N - r, C)
    torch.testing.assert_close(merged.double(), want_merged, atol=TOL[dtype], rtol=TOL[dtype])
    spread = ops.unmerge(merged, plan)
    torch.testing.assert_close(spread.double(), want_spread, atol=TOL[dtype], rtol=TOL[dtype])


def test_partition_one_dst_per_cell_and_random_choice():
    h, w, sx, sy = 7, 9, 2, 3
    fixed_dst, fixed_src = matching.partition(h, w, sx, sy, None, "cpu")
    assert sorted(fixed_dst.tolist() + fixed_src.tolist()) == list(range(h * w))
    assert fixed_dst.tolist() == sorted((i * sy) * w + j * sx for i in range(h // sy) for j in range(w // sx))
    seen = set()
    for key in range(6):
        dst, src = matching.partition(h, w, sx, sy, torch.tensor(key * 977), "cpu")
        cells = {((int(d) // w) // sy, (int(d) % w) // sx) for d in dst}
        assert len(cells) == len(dst) == (h // sy) * (w // sx)  # one dst in each cell
        assert all((int(d) // w) < (h // sy) * sy and (int(d) % w) < (w // sx) * sx for d in dst)
        assert sorted(dst.tolist() + src.tolist()) == list(range(h * w))
        seen.add(tuple(dst.tolist()))
    assert len(seen) > 1  # the key changes the choice


def test_zero_norm_tokens_are_safe():
    x = torch.randn(2, 16, 4)
    x[:, ::3] = 0
    dst_idx, src_idx = matching.partition(4, 4, 2, 2, None, "cpu")
    plan = ops.build_plan(x, dst_idx, src_idx, 8)
    out = ops.unmerge(ops.merge(x, plan), plan)
    assert torch.isfinite(out).all()


def test_tiled_scores_equal_whole_matrix():
    x = torch.randn(2, 20 * 20, 8)
    dst_idx, src_idx = matching.partition(20, 20, 2, 2, None, "cpu")
    whole = matching.best_dst(x, dst_idx, src_idx)
    tiled = matching.best_dst(x, dst_idx, src_idx, tile_elems=2 * 100 * 7)
    assert torch.equal(whole[1], tiled[1])
    torch.testing.assert_close(whole[0], tiled[0])


def test_merge_and_unmerge_have_gradients():
    x = torch.randn(2, 64, 5, requires_grad=True)
    dst_idx, src_idx = matching.partition(8, 8, 2, 2, None, "cpu")
    plan = ops.build_plan(x, dst_idx, src_idx, 24)
    weight = torch.randn(2, 64, 5)
    (ops.unmerge(ops.merge(x, plan), plan) * weight).sum().backward()
    # d/dx_n of sum_k w_k * mean(group(k)) = mean of w over n's group
    counts = plan.counts.gather(1, plan.slot).double()
    expected = torch.zeros(2, 40, 5, dtype=torch.float64).scatter_add_(1, plan.slot[..., None].expand(2, 64, 5), weight.double())
    expected = expected.gather(1, plan.slot[..., None].expand(2, 64, 5)) / counts[..., None]
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_dispatch_on_cpu_is_torch(monkeypatch):
    backend, refused = ops.choose_backend(torch.zeros(1))
    assert backend == "torch" and "cuda" in refused
    monkeypatch.setenv("TOMESD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="TOMESD_BACKEND=cuda"):
        ops.choose_backend(torch.zeros(1))
    monkeypatch.setenv("TOMESD_BACKEND", "fast")
    with pytest.raises(ValueError, match="TOMESD_BACKEND"):
        ops.choose_backend(torch.zeros(1))


def test_fp16_merge_of_a_flat_region_does_not_overflow():
    n = 5000
    x = torch.full((1, n, 8), 60.0, dtype=torch.float16)
    plan = MergePlan(slot=torch.zeros(1, n, dtype=torch.int64), counts=torch.tensor([[n]], dtype=torch.int32), num_out=1)
    out = merge(x, plan)
    assert out.dtype == torch.float16 and torch.equal(out, torch.full((1, 1, 8), 60.0, dtype=torch.float16))
    ramp = torch.linspace(-1, 1, n, dtype=torch.float64).to(torch.float16)[None, :, None].expand(1, n, 8)
    torch.testing.assert_close(merge(ramp, plan).float(), ramp.double().mean(1, keepdim=True).float(),
                               rtol=0, atol=1e-3)


# ---- Exact ties on duplicated tokens (tomesd.ties) ----

def _duplicated(B, h, w, C, distinct, seed):
    """Tokens drawn from `distinct` random vectors: every token has bitwise-identical twins."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(B, distinct, C, generator=g)
    pick = torch.randint(0, distinct, (B, h * w), generator=g)
    return rows.gather(1, pick[..., None].expand(B, h * w, C))


def _exact(metric, dst, src, win):
    """(score fp64, dst position) by brute force, one summation order for every pair (identical pairs tie
    exactly), candidates outside the window masked, the lowest position among equal scores."""
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True)
    scores = (m[:, src, None, :] * m[:, None, dst, :]).sum(-1)
    if win is not None:
        hsy, wsx = win.cells
        cy = lambda t: (t // win.w // win.sy).clamp_max(hsy - 1)  # noqa: E731
        cx = lambda t: (t % win.w // win.sx).clamp_max(wsx - 1)  # noqa: E731
        near = ((cy(src)[:, None] - cy(dst)[None]).abs() <= win.k // 2) & ((cx(src)[:, None] - cx(dst)[None]).abs() <= win.k // 2)
        scores = scores.masked_fill(~near, float("-inf"))
    return scores.max(dim=-1)


@pytest.mark.parametrize("window", [None, 3, 5])
def test_duplicated_tokens_tie_exactly(window):
    """Issue 27 item 18: a batched matmul rounds identical columns differently, so the PyTorch path broke
    its own lowest-position rule on duplicated tokens (the local path here: 61 of 6,912 rows). Now every
    dst, and the plan, equal an exact reference's: identical pairs tie bit for bit, the lowest position
    wins, and equal scores at the r-th place merge the lower src positions."""
    h, w = 48, 40
    metric = _duplicated(2, h, w, 33, 12, seed=window or 0)
    dst, src = matching.partition(h, w, 2, 2, torch.tensor(11), "cpu")
    win = None if window is None else matching.LocalWindow(h, w, 2, 2, window)
    score, pos = matching.best_dst(metric, dst, src) if win is None else matching.best_dst_local(metric, dst, src, win)
    want_score, want_pos = _exact(metric, dst, src, win)
    assert torch.equal(pos, want_pos)
    torch.testing.assert_close(score.double(), want_score, rtol=0, atol=1e-6)
    pair = metric[:, src].sum(-1) * 7 + metric[:, dst].sum(-1).gather(1, pos)  # alike pairs alike here
    for b in range(2):
        for value in pair[b].unique():
            assert score[b][pair[b] == value].unique().numel() == 1  # one score per identical pair, bit for bit
    for r in (len(src) // 3, len(src) * 2 // 3):
        plan = matching.build_plan(metric, dst, src, r, win)
        assert torch.equal(plan.slot, matching.plan_from_matches(want_score.float(), want_pos, dst, src, r, h * w).slot)


def test_equal_scores_at_the_rth_place_merge_the_lower_src_positions():
    score = torch.tensor([[0.5, 0.9, 0.5, 0.5, float("nan"), 0.0, -0.0, 0.5]])
    src, dst = torch.arange(1, 9), torch.tensor([0])
    for r, merged in ((2, [1, 4]), (4, [0, 1, 2, 4]), (7, [0, 1, 2, 3, 4, 5, 7])):
        plan = matching.plan_from_matches(score, torch.zeros_like(score, dtype=torch.int64), dst, src, r, 9)
        assert (plan.slot[0, 1:] == plan.slot[0, 0]).nonzero().flatten().tolist() == merged, r

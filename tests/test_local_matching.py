"""Local matching (match_window=k): each src compares only with the dst of the k × k cells around its
own cell. Checked against a brute-force reference (the full score matrix, masked to the window), the
global matching for a window covering the grid, a memory bound, the ops, and apply_patch end to end."""
import pytest
import torch
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

import tiny
import tomesd
from tomesd import matching, ops
from tomesd.ops import selfcheck
from tomesd.matching import LocalWindow

OPS = torch.ops.tomesd


def _reference(metric, dst, src, win):
    """(score, dst position) by brute force: every src x dst cosine, dst outside the window masked."""
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = (m[:, src, None, :] * m[:, None, dst, :]).sum(-1)  # one summation order for every pair
    hsy, wsx = win.cells

    def cell(t):
        return (t // win.w // win.sy).clamp_max(hsy - 1), (t % win.w // win.sx).clamp_max(wsx - 1)

    (sy_, sx_), (dy_, dx_) = cell(src), cell(dst)
    near = ((sy_[:, None] - dy_[None, :]).abs() <= win.k // 2) & ((sx_[:, None] - dx_[None, :]).abs() <= win.k // 2)
    return scores.masked_fill(~near, float("-inf")).max(dim=-1)


def _case(h, w, sx, sy, key=5, B=2, C=16, seed=0):
    dst, src = matching.partition(h, w, sx, sy, None if key is None else torch.tensor(key), "cpu")
    metric = torch.randn(B, h * w, C, generator=torch.Generator().manual_seed(seed))
    return metric, dst, src


GRIDS = [(16, 16, 2, 2, 3), (13, 21, 2, 2, 3), (13, 21, 2, 2, 5), (9, 7, 3, 2, 1), (12, 10, 2, 3, 3),
         (24, 20, 4, 4, 3), (5, 40, 2, 2, 3)]


@pytest.mark.parametrize("h, w, sx, sy, k", GRIDS)
@pytest.mark.parametrize("key", [None, 7], ids=["first", "random"])
def test_local_matching_equals_brute_force_restricted_to_the_window(h, w, sx, sy, k, key):
    metric, dst, src = _case(h, w, sx, sy, key)
    win = LocalWindow(h, w, sx, sy, k)
    score, pos = matching.best_dst_local(metric, dst, src, win)
    want_score, want_pos = _reference(metric, dst, src, win)
    torch.testing.assert_close(score.double(), want_score, rtol=0, atol=1e-6)
    assert torch.equal(pos, want_pos)
    assert not win.covers_grid()
    # the window really restricts: the global matching picks other dst for some tokens
    assert not torch.equal(pos, matching.best_dst(metric, dst, src)[1]) or k >= 2 * max(win.cells) - 1


def test_zero_channels_take_the_lowest_dst_of_the_window():
    metric, dst, src = _case(12, 10, 2, 2, C=0)
    win = LocalWindow(12, 10, 2, 2, 3)
    score, pos = matching.best_dst_local(metric, dst, src, win)
    want_score, want_pos = _reference(metric, dst, src, win)
    assert torch.equal(pos, want_pos) and bool((score == 0).all())
    assert bool((pos > 0).any())  # not dst 0 for everyone: the window excludes it for far tokens


def test_small_chunks_give_the_same_matches():
    metric, dst, src = _case(13, 21, 2, 2)
    win = LocalWindow(13, 21, 2, 2, 3)
    whole = matching.best_dst_local(metric, dst, src, win)
    chunked = matching.best_dst_local(metric, dst, src, win, tile_elems=1)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def _tied(h, w, C=3, B=2, seed=0):
    """Metric rows drawn from C one-hot vectors and zeros: cosines are exactly 0 or 1, full of ties."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.eye(C), torch.zeros(1, C)])
    return rows[torch.randint(0, C + 1, (B, h * w), generator=g)]


@pytest.mark.parametrize("h, w, sx, sy", [(16, 16, 2, 2), (13, 21, 2, 2), (12, 10, 2, 3)])
def test_whole_grid_window_gives_the_global_plan(h, w, sx, sy):
    dst, src = matching.partition(h, w, sx, sy, torch.tensor(3), "cpu")
    win = LocalWindow(h, w, sx, sy, 2 * max(h // sy, w // sx) - 1)
    assert win.covers_grid() and not LocalWindow(h, w, sx, sy, win.k - 2).covers_grid()
    r = len(src) // 2
    for metric in (_tied(h, w), torch.randn(2, h * w, 8, generator=torch.Generator().manual_seed(1))):
        # the local code itself (not the shortcut to best_dst): same dst, ties broken alike
        score, pos = matching.best_dst_local(metric, dst, src, win)
        want_score, want_pos = matching.best_dst(metric, dst, src)
        torch.testing.assert_close(score, want_score, rtol=0, atol=1e-6)
        assert torch.equal(pos, want_pos)
        glob = matching.build_plan(metric, dst, src, r)
        for plan in (matching.build_plan(metric, dst, src, r, win), ops.build_plan(metric, dst, src, r, win)):
            assert torch.equal(plan.slot, glob.slot) and torch.equal(plan.counts, glob.counts)
    tied = _tied(h, w)
    local = matching.plan_from_matches(*matching.best_dst_local(tied, dst, src, win), dst, src, r, h * w)
    assert torch.equal(local.slot, matching.build_plan(tied, dst, src, r).slot)


def test_ties_and_nan_follow_the_global_rules():
    """Equal scores: the lowest dst position; a NaN score beats every number (torch.max's rules)."""
    h = w = 8
    metric, dst, src = _case(h, w, 2, 2, key=9, B=1, C=4)
    metric[0, dst] = torch.tensor([1.0, 0, 0, 0])  # every dst alike (and each cosine exact): all candidates tie
    metric[0, dst[10], 0] = float("nan")
    win = LocalWindow(h, w, 2, 2, 3)
    score, pos = matching.best_dst_local(metric, dst, src, win)
    want_score, want_pos = _reference(metric, dst, src, win)
    assert torch.equal(pos, want_pos)
    assert torch.equal(score.isnan(), want_score.isnan())


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_score_matrix_is_allocated():
    """At N = 16,384 (S·D = 50M scores) the largest tensor local matching makes is O(N·(C + k²)); the
    global matching's (tiled) score block is far larger, so the check can fail."""
    h = w = 128
    metric, dst, src = _case(h, w, 2, 2, B=1, C=8)
    N, K = h * w, 9
    win = LocalWindow(h, w, 2, 2, 3)
    with _LargestTensor() as local:
        matching.build_plan(metric, dst, src, N // 2, win)
    with _LargestTensor() as glob:
        matching.build_plan(metric, dst, src, N // 2)
    bound = 4 * N * (metric.shape[-1] + K)
    assert local.largest <= bound < glob.largest
    assert glob.largest >= min(len(src) * len(dst), matching.SCORE_TILE_ELEMS)


def test_neighbourhood_is_cached_per_grid_shape():
    win = LocalWindow(16, 12, 2, 2, 3)
    metric, dst, src = _case(16, 12, 2, 2)
    with torch.inference_mode():  # the first call caches; later ones may track gradients
        matching.best_dst_local(metric, dst, src, win)
    assert not matching.neighbourhood(win, "cpu").near.is_inference()
    matching.best_dst_local(metric.requires_grad_(), dst, src, win)
    assert matching.neighbourhood(win, "cpu") is matching.neighbourhood(LocalWindow(16, 12, 2, 2, 3), "cpu")
    assert matching.neighbourhood(win, "cpu") is not matching.neighbourhood(LocalWindow(16, 12, 2, 2, 5), "cpu")


# ---- the ops (CPU impls, fake impls, validation) ----

def test_local_ops_match_the_pytorch_path_and_pass_opcheck():
    h, w = 13, 21
    metric, dst, src = _case(h, w, 2, 2)
    r = len(src) // 2
    win = LocalWindow(h, w, 2, 2, 3)
    score, pos = OPS.best_dst_local(metric, dst, src, h, w, 2, 2, 3)
    want = matching.best_dst_local(metric, dst, src, win)
    assert torch.equal(score, want[0]) and torch.equal(pos, want[1])
    slot, counts, offsets, members = OPS.build_plan_local(metric, dst, src, h, w, 2, 2, 3, r)
    plan = matching.build_plan(metric, dst, src, r, win)
    assert torch.equal(slot, plan.slot) and torch.equal(counts, plan.counts)
    opcheck(OPS.best_dst_local, (metric, dst, src, h, w, 2, 2, 3))
    opcheck(OPS.build_plan_local, (metric, dst, src, h, w, 2, 2, 3, r))


def test_local_ops_refuse_a_bad_geometry():
    metric, dst, src = _case(8, 8, 2, 2)
    with pytest.raises(ValueError, match="does not fit N"):
        OPS.best_dst_local(metric, dst, src, 8, 9, 2, 2, 3)
    with pytest.raises(ValueError, match="odd int"):
        OPS.best_dst_local(metric, dst, src, 8, 8, 2, 2, 4)
    tiny_dst, tiny_src = matching.partition(1, 8, 2, 2, None, "cpu")  # one row: no 2 x 2 cell
    with pytest.raises(ValueError, match="no 2 x 2 cell"):
        OPS.best_dst_local(metric[:, :8], tiny_dst, tiny_src, 1, 8, 2, 2, 3)
    swapped = torch.cat([dst[:-1], src[:1]]), torch.cat([dst[-1:], src[1:]])  # two dst in one cell
    with pytest.raises(ValueError, match="one dst token per"):
        OPS.build_plan_local(metric, *swapped, 8, 8, 2, 2, 3, 4)


def test_self_check_covers_local_matching():
    assert selfcheck.self_check(selfcheck.torch_kernels(), "cpu") == ""

    def shifted(metric, dst, src, *geometry):
        score, pos = OPS.best_dst_local(metric, dst, src, *geometry)
        return score, (pos + 1) % len(dst)

    reason = selfcheck.self_check(selfcheck.torch_kernels()._replace(best_dst_local=shifted), "cpu")
    assert "best_dst_local" in reason


# ---- apply_patch ----

@pytest.mark.parametrize("bad", [0, 2, -1, 4, True, 3.0, "3"])
def test_match_window_is_validated(bad):
    with pytest.raises(ValueError, match=r"match_window must be None \(global matching\) or an odd int ≥ 1"):
        tomesd.ToMeConfig(match_window=bad)


def _run(model, seed=1):
    args, kwargs = tiny.unet_inputs("sd1", seed=seed)
    with torch.no_grad():
        return model(*args, **kwargs).sample


SETTINGS = [dict(), dict(mode="kv"), dict(mode="tokens", prop_attn=True, merge_mlp=True), dict(share_plan=True),
            dict(plan_every=2), dict(mode="kv", share_plan=True, plan_every=3)]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_apply_patch_with_local_matching(kwargs, monkeypatch, request):
    """The 16 x 16 top level has 8 x 8 cells: k = 15 covers it (bit-identical to global matching), k = 3
    does not, and the plans the model uses are the local plans of the blocks' own metrics."""
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=4, **kwargs)
    glob = _run(unet)
    tomesd.apply_patch(unet, ratio=0.5, seed=4, match_window=15, **kwargs)
    assert torch.equal(_run(unet), glob)
    seen = request.getfixturevalue("recorded_plans")
    tomesd.apply_patch(unet, ratio=0.5, seed=4, match_window=3, **kwargs)
    local = _run(unet)
    assert torch.isfinite(local).all() and not torch.equal(local, glob)
    assert seen and all(window == LocalWindow(16, 16, 2, 2, 3) for *_, window, _ in seen)
    for metric, dst, src, r, window, plan in seen:
        score, pos = _reference(metric, dst, src, window)
        want = matching.plan_from_matches(score.float(), pos, dst, src, r, metric.shape[1])
        assert torch.equal(plan.slot, want.slot)
    tomesd.remove_patch(unet)


def test_checkpoint_recompute_with_local_matching():
    def grads(unet):
        unet.zero_grad(set_to_none=True)
        args, kwargs = tiny.unet_inputs("sd1")
        unet(*args, **kwargs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=11, match_window=3, merge_mlp=True)
    want = grads(unet)
    unet.enable_gradient_checkpointing()
    got = grads(unet)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_unet_with_local_matching_matches_eager():
    torch._dynamo.reset()
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=3, match_window=3)
    args, kwargs = tiny.unet_inputs("sd1")
    with torch.no_grad():
        eager = unet(*args, **kwargs).sample
        compiled = torch.compile(unet, fullgraph=True)
        out = compiled(*args, **kwargs).sample
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)

"""The local matching kernels (match_window, csrc/local.cu) against the PyTorch path (needs a GPU; skipped
without one): plans, a whole-grid window, opcheck, empty and zero-channel inputs, malformed indices, a patched UNet."""
import pytest
import torch
from torch.library import opcheck

import tomesd
from cuda_cases import DTYPES, SCORE_TOL, case as _case, malformed as _malformed, patched_unet as _patched_unet
from tomesd import matching, ops
from tomesd.ops import selfcheck

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_kernels")]
OPS = torch.ops.tomesd


LOCAL_SHAPES = [(2, 64, 48, 40, 2, 2, 5), (3, 17, 9, 77, 3, 2, 3), (1, 128, 128, 320, 2, 2, 3), (2, 13, 21, 8, 2, 2, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOCAL_SHAPES)
def test_local_matching_matches_torch_path(shape, dtype):
    B, h, w, C, sx, sy, k = shape
    metric, dst, src, r = _case(B, h, w, C, sx, sy, dtype, seed=31)
    win = matching.LocalWindow(h, w, sx, sy, k)
    score, pos = OPS.best_dst_local(metric, dst, src, h, w, sx, sy, k)
    ref_score, ref_pos = matching.best_dst_local(metric.cpu(), dst.cpu(), src.cpu(), win)
    torch.testing.assert_close(score.cpu(), ref_score, atol=SCORE_TOL[dtype], rtol=0)
    reason = selfcheck.check_matches(metric.cpu(), dst.cpu(), src.cpu(), score.cpu(), pos.cpu(), SCORE_TOL[dtype],
                                      (ref_score, ref_pos), "best_dst_local")
    assert reason == ""
    slot = ops.build_plan(metric, dst, src, r, win).slot
    assert torch.equal(slot.cpu(), matching.plan_from_matches(score.cpu(), pos.cpu(), dst.cpu(), src.cpu(), r,
                                                              h * w).slot)


def test_local_kernel_with_a_whole_grid_window_equals_the_global_kernel():
    metric, dst, src, r = _case(2, 24, 20, 64, 2, 2, torch.float32, seed=33)
    score, pos = OPS.best_dst_local(metric, dst, src, 24, 20, 2, 2, 23)  # the op itself, not ops' shortcut
    glob_score, glob_pos = matching.best_dst(metric.cpu(), dst.cpu(), src.cpu())
    torch.testing.assert_close(score.cpu(), glob_score, atol=SCORE_TOL[torch.float32], rtol=0)
    assert (pos.cpu() != glob_pos).float().mean() < 0.01


def test_local_matching_opcheck_empty_and_zero_channels():
    metric, dst, src, r = _case(2, 16, 12, 32, 2, 2, torch.float16, seed=35)
    opcheck(OPS.best_dst_local, (metric, dst, src, 16, 12, 2, 2, 3))
    opcheck(OPS.build_plan_local, (metric, dst, src, 16, 12, 2, 2, 3, r))
    empty = OPS.build_plan_local(metric[:0], dst, src, 16, 12, 2, 2, 3, r)
    assert [tuple(t.shape) for t in empty] == [(0, 192), (0, 192 - r), (0, 193 - r), (0, 192)]
    zero = metric[..., :0]
    score, pos = OPS.best_dst_local(zero, dst, src, 16, 12, 2, 2, 3)
    ref = OPS.best_dst_local(zero.cpu(), dst.cpu(), src.cpu(), 16, 12, 2, 2, 3)
    assert torch.equal(score.cpu(), ref[0]) and torch.equal(pos.cpu(), ref[1])


@pytest.mark.parametrize("kind", ["repeated src", "out of range", "negative", "dst also src"])
def test_local_kernel_stays_in_bounds_on_malformed_indices(kind, monkeypatch):
    metric, dst, src, _ = _case(2, 40, 36, 64, 2, 2, torch.float16, seed=37)
    bad_dst, bad_src = _malformed(kind, dst, src, metric.shape[1])
    monkeypatch.delenv("TOMESD_CHECK_INDICES", raising=False)
    OPS.best_dst_local(metric, bad_dst, bad_src, 40, 36, 2, 2, 3)
    OPS.build_plan_local(metric, bad_dst, bad_src, 40, 36, 2, 2, 3, len(bad_src))
    torch.cuda.synchronize()
    healthy, hdst, hsrc, hr = _case(1, 8, 8, 8, 2, 2, torch.float32, seed=1)
    want = OPS.build_plan_local(healthy.cpu(), hdst.cpu(), hsrc.cpu(), 8, 8, 2, 2, 3, hr)[0]
    assert torch.equal(OPS.build_plan_local(healthy, hdst, hsrc, 8, 8, 2, 2, 3, hr)[0].cpu(), want)


def test_local_ops_check_one_dst_per_cell_under_check_indices(monkeypatch):
    """TOMESD_CHECK_INDICES=1: the CUDA local ops refuse a dst_idx that is not one token per cell with
    the CPU ops' ValueError (a valid partition otherwise: distinct tokens in range)."""
    metric, dst, src, r = _case(2, 16, 12, 32, 2, 2, torch.float16, seed=39)
    two_in_one = torch.cat([dst[:1], src[:1]])  # the first cell's dst and another token of that cell
    rest = torch.cat([src[1:], dst[1:]])
    bad_dst = torch.cat([two_in_one, dst[2:]])
    bad_src = rest[~torch.isin(rest, bad_dst)]
    monkeypatch.setenv("TOMESD_CHECK_INDICES", "1")
    for op, args in ((OPS.best_dst_local, (16, 12, 2, 2, 3)), (OPS.build_plan_local, (16, 12, 2, 2, 3, r))):
        with pytest.raises(ValueError, match="local matching needs one dst token per 2 x 2 cell of the 16 x 12 grid"):
            op(metric.cpu(), bad_dst.cpu(), bad_src.cpu(), *args)
        with pytest.raises(ValueError, match="local matching needs one dst token per 2 x 2 cell of the 16 x 12 grid"):
            op(metric, bad_dst, bad_src, *args)
        op(metric, dst, src, *args)  # a valid partition passes


def test_patched_unet_with_local_matching_on_cuda(monkeypatch, request):
    """fp16 UNet, match_window=3: compiled equals eager, and the plans are the local kernel's."""
    torch._dynamo.reset()
    unet, args, kwargs = _patched_unet()
    with torch.no_grad():
        glob = unet(*args, **kwargs).sample
    tomesd.apply_patch(unet, ratio=0.5, seed=1, match_window=3)
    seen = request.getfixturevalue("recorded_plans")
    with torch.no_grad():
        eager = unet(*args, **kwargs).sample
    monkeypatch.undo()
    assert seen and all(window == matching.LocalWindow(16, 16, 2, 2, 3) for *_, window, _ in seen)
    for metric, dst, src, r, window, plan in seen:
        score, pos = OPS.best_dst_local(metric, dst, src, 16, 16, 2, 2, 3)
        assert torch.equal(plan.slot, matching.plan_from_matches(score, pos, dst, src, r, 256).slot)
    assert torch.isfinite(eager).all() and not torch.equal(eager, glob)
    with torch.no_grad():
        out = torch.compile(unet)(*args, **kwargs).sample
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)

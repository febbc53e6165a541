"""The kernels' load-time self-check (tomesd/ops/selfcheck.py) against faults it let through before issue 27
item 16, each injected into the registered ops (their CPU impls stand in for the kernels): an fp16 / bf16
tail dropped when C % 8 != 0, exact ties broken the wrong way (dst and r-th place), windows k ≥ 5 and
4 × 4 cells, and sums accumulated in fp16. The correct ops still pass."""
import pytest
import torch

from loader_fakes import broken
from tomesd import matching
from tomesd.ops import selfcheck

OPS = torch.ops.tomesd
HALF = (torch.float16, torch.bfloat16)


def _half_tail_dropping_best_dst(metric, dst, src):
    """fp16 / bf16 with C % 8 != 0: the channels after the last whole 8-element vector are lost."""
    if metric.dtype in HALF and metric.shape[-1] % 8:
        metric = metric.clone()
        metric[..., metric.shape[-1] // 8 * 8 :] = 0
    return OPS.best_dst(metric, dst, src)


def _highest_of_ties_best_dst(metric, dst, src):
    """Equal scores go to the highest dst position (matching the dst in reverse order)."""
    score, pos = OPS.best_dst(metric, dst.flip(0), src)
    return score, len(dst) - 1 - pos


def _highest_of_ties_best_dst_local(metric, dst, src, h, w, sx, sy, window):
    score, pos = OPS.best_dst_local(metric, dst.flip(0), src, h, w, sx, sy, window)
    return score, len(dst) - 1 - pos


def _higher_src_at_rth_place_build_plan(metric, dst, src, r):
    """Equal scores at the r-th place merge the higher src positions (src listed in reverse order)."""
    return OPS.build_plan(metric, dst, src.flip(0), r)


def _small_window_best_dst_local(metric, dst, src, h, w, sx, sy, window):
    """Windows larger than 3 × 3 searched as 3 × 3."""
    return OPS.best_dst_local(metric, dst, src, h, w, sx, sy, min(window, 3))


def _four_by_four_best_dst_local(metric, dst, src, h, w, sx, sy, window):
    """Wrong only with 4 × 4 cells: the window is one step narrower."""
    return OPS.best_dst_local(metric, dst, src, h, w, sx, sy, window if sx < 4 else max(1, window - 2))


def _half_accumulating_best_dst(metric, dst, src):
    """fp16 / bf16 inputs summed in their own precision (each partial dot product rounded to the dtype)."""
    if metric.dtype not in HALF:
        return OPS.best_dst(metric, dst, src)
    m = metric.float()
    a, d = m[:, src], m[:, dst]
    acc = torch.zeros(a.shape[0], a.shape[1], d.shape[1], dtype=metric.dtype)
    for c in range(m.shape[-1]):
        acc = (acc.float() + a[:, :, None, c] * d[:, None, :, c]).to(metric.dtype)
    inv_a, inv_d = 1 / a.norm(dim=-1).clamp_min(1e-12), 1 / d.norm(dim=-1).clamp_min(1e-12)
    return (acc.float() * inv_a[..., None] * inv_d[:, None, :]).max(dim=-1)


@pytest.mark.parametrize("fns, message", [
    (dict(best_dst=_half_tail_dropping_best_dst), "best_dst scores differ from the PyTorch path"),
    (dict(best_dst=_highest_of_ties_best_dst), "best_dst broke the lowest-position rule on"),
    (dict(best_dst_local=_highest_of_ties_best_dst_local), "broke the lowest-position rule on"),
    (dict(build_plan=_higher_src_at_rth_place_build_plan), "build_plan's slot map differs"),
    (dict(best_dst_local=_small_window_best_dst_local), "best_dst_local (k = 5)"),
    (dict(best_dst_local=_four_by_four_best_dst_local), "4x4 cells"),
    (dict(best_dst=_half_accumulating_best_dst), "best_dst scores differ from the PyTorch path"),
], ids=["half-tail", "dst-ties", "local-dst-ties", "rth-place-ties", "window-5", "cells-4x4", "half-accumulation"])
def test_self_check_refuses_the_faults_it_missed(fns, message):
    reason = selfcheck.self_check(broken(**fns), "cpu")
    assert message in reason and "\n" not in reason, reason


def test_half_accumulation_fails_on_the_first_case():
    """The fp16-accumulating fault is slow on big cases: it must fail on the first (small) one, whose
    error is far above score_tol and below the former tolerance (2e-3)."""
    reason = selfcheck.self_check(broken(best_dst=_half_accumulating_best_dst), "cpu")
    first = selfcheck.SELF_CHECK_CASES[0]
    assert f"metric [{first.B}, {first.h}x{first.w}, {first.C}] {first.dtype}" in reason
    gap = float(reason.split("differ from the PyTorch path by ")[1].split(" ")[0])
    assert 4 * selfcheck.score_tol(first.C) < gap < 2e-3


def test_tie_cases_tie_and_the_tolerance_is_derived_from_c():
    """The tie cases really make bitwise-identical dst and equal scores at the r-th place; score_tol
    grows with C as the arithmetic bound (5C + 12)·2**-24, doubled."""
    case = next(c for c in selfcheck.SELF_CHECK_CASES if c.ties)
    assert {c.dtype for c in selfcheck.SELF_CHECK_CASES if c.C % 8 and c.B} >= {"float16", "bfloat16", "float32"}
    assert {(c.sx, c.sy) for c in selfcheck.SELF_CHECK_CASES} >= {(2, 2), (3, 2), (4, 4)}
    assert selfcheck.LOCAL_WINDOWS == (3, 5, 9)
    assert selfcheck.score_tol(40) == pytest.approx(2 * 212 * 2**-24) and selfcheck.score_tol(8) < selfcheck.score_tol(64)
    dst, src = matching.partition(case.h, case.w, case.sx, case.sy, None, "cpu")
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(case.B, selfcheck.TIE_VECTORS, case.C, generator=g)
    metric = rows.gather(1, torch.randint(0, selfcheck.TIE_VECTORS, (case.B, case.h * case.w, 1), generator=g)
                         .expand(-1, -1, case.C))
    score, _ = matching.best_dst(metric, dst, src)
    r = selfcheck.case_r(case, len(src))
    top = score.sort(dim=1, descending=True).values
    assert bool((top[:, r - 1] == top[:, r]).all())


def test_the_correct_ops_pass_the_stricter_check():
    assert selfcheck.self_check(selfcheck.torch_kernels(), "cpu") == ""

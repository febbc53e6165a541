"""The self-check the CUDA kernels pass before first use on a device: the loaded ops against the
PyTorch path (tomesd.matching on the CPU, so no TF32 or other device setting blurs the reference).

The cases are chosen to reach the code paths real workloads take (tests/test_cuda_rules.py computes
each property from csrc's constants and rules, and fails if the list stops covering one): several dst
tiles per block in both matching kernels, r = S, unaligned (unvectorized) loads, fp16 / bf16 rows with
C % 8 != 0 (an unvectorized tail), pack width 1 in merge / unmerge, non-contiguous and offset inputs,
merge with mean=False, block-scan chunks > 1 in the plan kernel, grids that the cells do not divide,
2 × 2, 3 × 2 and 4 × 4 cells, every dtype, an empty batch, and exact ties: cases whose tokens are drawn
from a few vectors, so bitwise-identical dst tie (the lowest position must win) and equal scores fall
on the r-th place (the lower src positions must merge). Local matching (best_dst_local,
build_plan_local) is checked on every case with k × k windows for k = 3, 5 and 9. The CPU side stays
cheap: the largest case scores 2 × 3,072 × 1,024 pairs.

Scores must agree within score_tol(C), derived from the arithmetic: both sides take
the same fp32 values (fp16 / bf16 convert exactly) and accumulate in fp32, so a kernel that rounds
its sums to fp16 or bf16 is refused.

`self_check(kernels, device)` runs them; tomesd.ops.loader calls it on the device of the first CUDA
tensor that asks for the kernels. Tests pass the registered ops on "cpu" (the CPU impls stand in for
the kernels) or deliberately broken ones (`Kernels._replace`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Tuple

import torch
from torch import Tensor

from .. import matching
from .torch_ops import csr

CPU = torch.device("cpu")


class Kernels(NamedTuple):
    """The op callables a self-check runs, with the torch.ops.tomesd signatures (see tomesd.ops.torch_ops)."""

    best_dst: Callable
    build_plan: Callable
    merge: Callable
    unmerge: Callable
    best_dst_local: Callable
    build_plan_local: Callable


def torch_kernels() -> Kernels:
    """The registered ops: on CUDA tensors they dispatch to the kernels."""
    ops = torch.ops.tomesd
    return Kernels(ops.best_dst, ops.build_plan, ops.merge, ops.unmerge, ops.best_dst_local, ops.build_plan_local)


class Case(NamedTuple):
    """One self-check shape: metric [B, h·w, C] in `dtype`, sy × sx cells.

    r: "half" → r = min(N // 2, S); "all" → r = S (every src merges).
    layout of metric, x and y on the device: "dense"; "offset" (storage offset of one element:
    contiguous but unaligned, so no vector loads or packs); "strided" (channels-first storage,
    non-contiguous).
    ties: every token is one of TIE_VECTORS random vectors (bitwise-identical tokens everywhere).
    """

    B: int
    h: int
    w: int
    C: int
    sx: int
    sy: int
    dtype: str
    r: str = "half"
    layout: str = "dense"
    ties: bool = False


# Grids that sx, sy do not divide; fp16 / bf16 with C % 8 != 0 (an unvectorized tail), first, so that
# a kernel accumulating in half precision fails on a small case; C not a multiple of 8 (unvectorized
# loads); several dst tiles with B = 1 (dst slices combined); 3 x 2 and 4 x 4 cells; exact ties; every
# dtype; then the two cases that reach the paths of real workloads (N = 4,096 bf16 with r = S,
# unaligned; fp32 with 2+ dst tiles per block, odd C, non-contiguous, M > 1,024); and B = 0.
SELF_CHECK_CASES: Tuple[Case, ...] = (
    Case(2, 13, 21, 36, 2, 2, "float16"),
    Case(2, 16, 12, 20, 2, 2, "bfloat16"),
    Case(2, 13, 21, 40, 2, 2, "float16"),
    Case(2, 13, 21, 40, 2, 2, "float32"),
    Case(1, 30, 26, 64, 2, 2, "float16"),
    Case(1, 30, 26, 64, 2, 2, "float32"),
    Case(3, 9, 7, 24, 3, 2, "float32"),
    Case(2, 30, 26, 40, 4, 4, "float16"),
    Case(1, 21, 19, 33, 4, 4, "float32"),
    Case(2, 24, 20, 40, 2, 2, "float16", ties=True),
    Case(2, 22, 18, 24, 2, 2, "float32", ties=True),
    Case(2, 16, 12, 32, 2, 2, "bfloat16"),
    Case(2, 64, 64, 40, 2, 2, "bfloat16", r="all", layout="offset"),
    Case(2, 48, 48, 33, 2, 2, "float32", layout="strided"),
    Case(0, 8, 8, 16, 2, 2, "float16"),
)
# Local matching is checked on every case with these windows (README recommends 3 to 17).
LOCAL_WINDOWS = (3, 5, 9)
TIE_VECTORS = 6  # distinct vectors of a `ties` case
# The merge error floor per dtype (merge is checked against the PyTorch path's own error in fp64).
MERGE_FLOOR = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6}
U32 = 2.0 ** -24  # fp32 unit roundoff


def score_tol(C: int) -> float:
    """Largest |score difference| allowed between a kernel and the PyTorch path for C channels.

    Both compute c = a·b / (‖a‖‖b‖) from the same fp32 values, in fp32; u = 2**-24, first order:
    - the PyTorch path normalizes each row (‖a‖: a sum of C squares, a sqrt, a division: each element
      within (C/2 + 2)u) and sums C products in any order (within Cu, as |â·b̂| terms sum to ≤ 1):
      (2C + 4)u;
    - a kernel sums the C raw products (within Cu; 2Cu for tensor cores, whose fp32 accumulators
      may truncate), times two inverse norms (each within (C/2 + 3)u) and two roundings: (3C + 8)u;
    so they differ by at most (5C + 12)u, doubled for margin: 2(5C + 12)u (C = 40:
    2.5e-5). Accumulating in fp16 (u = 2**-11) or bf16 (2**-8) errs by ~1e-4 and more on these cases.
    """
    return 2 * (5 * C + 12) * U32


def case_r(case: Case, num_src: int) -> int:
    """The r a case merges, given its number of src tokens."""
    return num_src if case.r == "all" else min(case.h * case.w // 2, num_src)


def placed(t: Tensor, layout: str, device) -> Tensor:
    """t moved to `device` in a case's memory layout (see Case)."""
    if layout == "offset":
        out = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:].view(t.shape)
        return out.copy_(t)
    if layout == "strided":
        return t.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    return t.to(device)


@contextlib.contextmanager
def real_tensors(device: torch.device):
    """Real tensors, no autograd, `device` current: the check runs the same when the first CUDA call
    happens while torch.compile traces or on another device than the current one."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover - older torch
        unset_fake_temporarily = contextlib.nullcontext
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with unset_fake_temporarily(), torch.no_grad(), on_device:
        yield


def self_check(kernels: Kernels, device, cases=SELF_CHECK_CASES) -> str:
    """Runs `kernels` on `device` against the PyTorch path; "" if they agree, else the first mismatch.

    Agreement: best_dst scores within a per-dtype tolerance and the same dst except between
    candidates within it; build_plan's slot map equal to the PyTorch plan of those matches except on
    an exact score tie at the r-th place; counts, CSR offsets and members equal; merge (mean and sum)
    within twice the PyTorch path's own error in that dtype (against fp64) plus a floor; unmerge exact.
    Every CPU tensor is created on the CPU explicitly, so a default device (torch.set_default_device)
    changes nothing.
    """
    device = torch.device(device)
    with real_tensors(device):
        for case in cases:
            try:
                reason = _check_case(kernels, device, case)
            except Exception as exc:  # noqa: BLE001 - a kernel that raises fails the check
                text = str(exc).strip()
                reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            if reason:
                return (f"{reason} (metric [{case.B}, {case.h}x{case.w}, {case.C}] {case.dtype}, "
                        f"{case.sy}x{case.sx} cells, r {case.r}, {case.layout})")
    return ""


def _check_case(k: Kernels, device: torch.device, case: Case) -> str:
    B, h, w, C = case.B, case.h, case.w, case.C
    dtype = getattr(torch, case.dtype)
    seed = B * 1000 + h * 37 + w * 11 + C
    g = torch.Generator(device=CPU).manual_seed(seed)
    dst, src = matching.partition(h, w, case.sx, case.sy, torch.tensor(seed * 7919 % 2**32, device=CPU), CPU)
    N = h * w
    r = case_r(case, len(src))
    metric = torch.randn(B, N, C, generator=g, device=CPU).to(dtype)
    if case.ties:  # tokens drawn from a few vectors: identical tokens everywhere
        pick = torch.randint(0, TIE_VECTORS, (B, N), generator=g, device=CPU)
        metric = metric[:, :TIE_VECTORS].gather(1, pick[..., None].expand(B, N, C))
    x = (torch.randn(B, N, C, generator=g, device=CPU) * 4).to(dtype)
    y = torch.randn(B, N - r, C, generator=g, device=CPU).to(dtype)
    dev = [placed(metric, case.layout, device), dst.to(device), src.to(device)]

    def host(tensors):
        return [t.cpu() for t in tensors]

    if B == 0:
        got = host(k.build_plan(*dev, r))
        want = torch.ops.tomesd.build_plan(metric, dst, src, r)  # the CPU impl
        if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in want]:
            return f"build_plan on an empty batch gives shapes {[tuple(t.shape) for t in got]}"
        got = host(k.build_plan_local(*dev, h, w, case.sx, case.sy, LOCAL_WINDOWS[0], r))
        if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in want]:
            return f"build_plan_local on an empty batch gives shapes {[tuple(t.shape) for t in got]}"
        return ""

    tol = score_tol(C)
    score, pos = host(k.best_dst(*dev))
    reason = check_matches(metric, dst, src, score, pos, tol, matching.best_dst(metric, dst, src))
    if reason:
        return reason
    slot, counts, offsets, members = host(k.build_plan(*dev, r))
    reason = _check_plan(slot, counts, offsets, members, score, pos, dst, src, r, "build_plan")
    if reason:
        return reason

    for window in LOCAL_WINDOWS:
        geometry = (h, w, case.sx, case.sy, window)
        local_score, local_pos = host(k.best_dst_local(*dev, *geometry))
        want = matching.best_dst_local(metric, dst, src, matching.LocalWindow(*geometry))
        what = f"best_dst_local (k = {window})"
        reason = check_matches(metric, dst, src, local_score, local_pos, tol, want, what)
        if reason:
            return reason
        local_plan = host(k.build_plan_local(*dev, *geometry, r))
        reason = _check_plan(*local_plan, local_score, local_pos, dst, src, r, f"build_plan_local (k = {window})")
        if reason:
            return reason

    plan = matching.MergePlan(slot=slot, counts=counts.int(), num_out=N - r)
    on_dev = [t.to(device) for t in (slot, offsets, members)]
    x_dev = placed(x, case.layout, device)
    for mean in (True, False):
        merged = k.merge(x_dev, *on_dev, mean).cpu()
        exact = matching.merge(x.double(), plan, mean=mean)
        floor = MERGE_FLOOR[case.dtype] * (1 if mean else int(counts.max()))
        bound = 2 * (matching.merge(x, plan, mean=mean).double() - exact).abs().max().item() + floor
        error = (merged.double() - exact).abs().max().item() if merged.shape == exact.shape else float("inf")
        if merged.dtype != dtype or not error <= bound:
            what = "segment mean" if mean else "segment sum (mean=False)"
            return f"merge differs from the {what} by {error:.3g} (bound {bound:.3g})"
    unmerged = k.unmerge(placed(y, case.layout, device), *on_dev).cpu()
    if unmerged.dtype != dtype or not torch.equal(unmerged, matching.unmerge(y, plan)):
        return "unmerge differs from the gather y[b, slot[b, n]]"
    return ""


def _check_plan(slot: Tensor, counts: Tensor, offsets: Tensor, members: Tensor, score: Tensor, pos: Tensor,
                dst: Tensor, src: Tensor, r: int, what: str) -> str:
    """A plan op's outputs (on the CPU) against the PyTorch plan of the kernels' own matches (score, pos):
    the same slot map (equal scores at the r-th place included: the lower src positions merge), counts
    that count it, and its CSR."""
    B, N = slot.shape[0], src.numel() + dst.numel()
    ref = matching.plan_from_matches(score, pos, dst, src, r, N)
    if slot.shape != ref.slot.shape or counts.shape != ref.counts.shape:
        return f"{what} gives shapes {tuple(slot.shape)}, {tuple(counts.shape)}"
    if not torch.equal(slot, ref.slot):
        return f"{what}'s slot map differs from the PyTorch path for {int((slot != ref.slot).sum())} token(s)"
    if bool((slot < 0).any() or (slot >= N - r).any()):
        return f"{what} wrote a slot outside [0, N - r)"
    ones = torch.ones_like(slot, dtype=torch.int32)
    want_counts = torch.zeros(B, N - r, dtype=torch.int32, device=CPU).scatter_add_(1, slot, ones)
    if not torch.equal(counts.int(), want_counts):
        return f"{what}'s counts do not count its slot map"
    want_offsets, want_members = csr(slot, want_counts)
    if not (torch.equal(offsets, want_offsets) and torch.equal(members, want_members)):
        return f"{what}'s CSR offsets / members do not list its slot map in raster order"
    return ""


def check_matches(metric: Tensor, dst: Tensor, src: Tensor, score: Tensor, pos: Tensor, tol: float,
                  reference: Tuple[Tensor, Tensor], what: str = "best_dst") -> str:
    """A matching op's (score, pos) against the PyTorch path's (reference): scores within tol, another
    dst only on a near-tie, never another of bitwise-identical dst (an exact tie: the lowest position)."""
    ref_score, ref_pos = reference
    if score.shape != ref_score.shape or pos.shape != ref_pos.shape:
        return f"{what} gives shapes {tuple(score.shape)}, {tuple(pos.shape)}, expected {tuple(ref_score.shape)}"
    gap = (score - ref_score).abs().max().item()
    if not gap <= tol:
        return f"{what} scores differ from the PyTorch path by {gap:.3g} (tolerance {tol:g})"
    differ = pos != ref_pos
    if not differ.any():
        return ""
    if not bool(((pos >= 0) & (pos < len(dst))).all()):
        return f"{what} wrote a dst position outside dst_idx"
    b, s = differ.nonzero(as_tuple=True)
    twins = (metric[b, dst[pos[b, s]]] == metric[b, dst[ref_pos[b, s]]]).all(-1)
    if bool(twins.any()):
        return (f"{what} broke the lowest-position rule on {int(twins.sum())} exact tie(s) (bitwise-identical "
                f"dst)")
    a = metric[b, src[s]].double()

    def cosine(p):  # exact cosine of each differing src with dst position p, in fp64
        d = metric[b, dst[p]].double()
        return (a * d).sum(-1) / (a.norm(dim=-1) * d.norm(dim=-1)).clamp_min(1e-24)

    loss = (cosine(ref_pos[b, s]) - cosine(pos[b, s])).max().item()
    if loss > 2 * tol:
        return f"{what} picked a dst {loss:.3g} worse than the best for {int(differ.sum())} src token(s)"
    return ""

"""The torch.library ops (namespace `tomesd`): schemas, CPU impls, fake impls and autograd formulas.

Defined here, in Python, so that the ops exist on every machine: the CPU impls run the
tomesd.matching algorithm (for tests and tracing), the fake impls give shapes only (so
`torch.compile(fullgraph=True)` traces a patched model). The C++ extension (csrc/ops.cpp, loaded by
tomesd.ops.loader) only adds the CUDA kernels with `TORCH_LIBRARY_IMPL(tomesd, CUDA, ...)`:

  best_dst(metric [B, N, C], dst_idx [D], src_idx [S]) -> (score [B, S] fp32, dst_pos [B, S] int64)
  build_plan(metric, dst_idx, src_idx, r) -> (slot [B, N] int64, counts [B, M] int32,
                                              offsets [B, M + 1] int32, members [B, N] int32)
  best_dst_local(metric, dst_idx, src_idx, h, w, sx, sy, window) -> (score, dst_pos)   local matching:
      candidates are the dst of the window × window cells around a src's cell (matching.best_dst_local);
      N = h·w and dst_idx holds one token per sy × sx cell of the grid (as matching.partition gives)
  build_plan_local(metric, dst_idx, src_idx, h, w, sx, sy, window, r) -> as build_plan
  merge(x [B, N, C], slot, offsets, members, mean) -> [B, M, C]   segment mean (or sum) over the CSR rows
  unmerge(y [B, M, C], slot, offsets, members) -> [B, N, C]       y[b, slot[b, n]]

M = N − r; 0 ≤ r ≤ S; dst_idx and src_idx are distinct token indices in [0, N). merge and unmerge
are each other's adjoint up to the counts: d merge(x)/dx = unmerge(g / counts),
d unmerge(y)/dy = merge(g, mean=False).

Invalid indices (out of range, duplicated, a token both dst and src; for local matching, not one dst
per cell; a slot outside [0, M), offsets that are not a CSR of N tokens): the CPU impls always raise
ValueError. The CUDA kernels never read or
write outside their buffers whatever the indices (every index is bounds-guarded on the device), but
give unspecified outputs for invalid ones; with TOMESD_CHECK_INDICES=1 (a debug switch) the CUDA ops
raise the same ValueError, at the cost of a host synchronization per call (so not inside a
CUDA-graph capture).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import matching
from ..matching import LocalWindow, MergePlan

SCHEMAS = {
    "best_dst": "best_dst(Tensor metric, Tensor dst_idx, Tensor src_idx) -> (Tensor, Tensor)",
    "build_plan": "build_plan(Tensor metric, Tensor dst_idx, Tensor src_idx, int r) -> (Tensor, Tensor, Tensor, Tensor)",
    "best_dst_local": ("best_dst_local(Tensor metric, Tensor dst_idx, Tensor src_idx, int h, int w, int sx, int sy, "
                       "int window) -> (Tensor, Tensor)"),
    "build_plan_local": ("build_plan_local(Tensor metric, Tensor dst_idx, Tensor src_idx, int h, int w, int sx, int sy, "
                         "int window, int r) -> (Tensor, Tensor, Tensor, Tensor)"),
    "merge": "merge(Tensor x, Tensor slot, Tensor offsets, Tensor members, bool mean=True) -> Tensor",
    "unmerge": "unmerge(Tensor y, Tensor slot, Tensor offsets, Tensor members) -> Tensor",
}


def csr(slot: Tensor, counts: Tensor) -> Tuple[Tensor, Tensor]:
    """(offsets [B, M + 1] int32, members [B, N] int32) of a slot map: row m's tokens in raster order."""
    zero = counts.new_zeros(counts.shape[0], 1)
    offsets = torch.cat([zero, counts.cumsum(dim=1)], dim=1).to(torch.int32)
    members = torch.argsort(slot, dim=1, stable=True).to(torch.int32)
    return offsets, members


def check_partition(n: int, dst_idx: Tensor, src_idx: Tensor) -> None:
    """Raises ValueError unless dst_idx and src_idx are distinct token indices in [0, n) (the rule
    csrc/ops.cpp checks under TOMESD_CHECK_INDICES=1)."""
    both = torch.cat([dst_idx.flatten(), src_idx.flatten()])
    if both.numel() and (bool(both.min() < 0) or bool(both.max() >= n) or both.unique().numel() != both.numel()):
        raise ValueError(f"tomesd: dst_idx and src_idx must be distinct token indices in [0, {n})")


def check_window(n: int, dst_idx: Tensor, h: int, w: int, sx: int, sy: int, window: int) -> LocalWindow:
    """The LocalWindow of a local matching op's arguments; raises ValueError unless N = h·w, window is odd
    ≥ 1 and dst_idx holds exactly one token per sy × sx cell of the top-left (h//sy·sy) × (w//sx·sx) region."""
    if min(h, w, sx, sy) < 1 or h * w != n:
        raise ValueError(f"tomesd: a {h} x {w} grid with {sy} x {sx} cells does not fit N = {n} tokens")
    if window < 1 or window % 2 != 1:
        raise ValueError(f"tomesd: match_window must be an odd int ≥ 1, got {window}")
    hsy, wsx = h // sy, w // sx
    rows, cols = dst_idx // w, dst_idx % w
    cells = (rows // sy) * max(wsx, 1) + cols // sx
    if (dst_idx.numel() != hsy * wsx or bool((rows >= hsy * sy).any() | (cols >= wsx * sx).any())
            or cells.unique().numel() != cells.numel()):
        raise ValueError(f"tomesd: local matching needs one dst token per {sy} x {sx} cell of the {h} x {w} grid")
    return LocalWindow(h, w, sx, sy, window)


def check_plan(n: int, slot: Tensor, offsets: Tensor, members: Tensor) -> None:
    """Raises ValueError unless slot [B, N] is in [0, M) and offsets / members are a CSR of the N tokens."""
    m = offsets.shape[1] - 1
    if slot.numel() and (bool(slot.min() < 0) or bool(slot.max() >= m)):
        raise ValueError(f"tomesd: slot must be in [0, {m}) (the plan's output rows)")
    if offsets.numel() and (bool((offsets[:, 0] != 0).any()) or bool((offsets[:, -1] != n).any())
                            or bool((offsets[:, 1:] < offsets[:, :-1]).any())):
        raise ValueError(f"tomesd: offsets must rise from 0 to N = {n} along each row")
    if members.numel() and (bool(members.min() < 0) or bool(members.max() >= n)):
        raise ValueError(f"tomesd: members must be token indices in [0, {n})")


def counts_of(offsets: Tensor) -> Tensor:
    """[B, M] tokens per output row, from the CSR offsets [B, M + 1]."""
    return offsets[:, 1:] - offsets[:, :-1]


def _plan_of(slot: Tensor, offsets: Tensor) -> MergePlan:
    return MergePlan(slot=slot, counts=counts_of(offsets), num_out=offsets.shape[1] - 1)


def _best_dst_cpu(metric: Tensor, dst_idx: Tensor, src_idx: Tensor) -> Tuple[Tensor, Tensor]:
    check_partition(metric.shape[1], dst_idx, src_idx)
    if src_idx.numel() == 0:  # nothing to match (also with no dst), as the CUDA op
        return _best_dst_fake(metric, dst_idx, src_idx)
    with torch.no_grad():
        score, dst_pos = matching.best_dst(metric, dst_idx, src_idx)
    return score.contiguous(), dst_pos.contiguous()


def _best_dst_local_cpu(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, h: int, w: int, sx: int, sy: int,
                        window: int) -> Tuple[Tensor, Tensor]:
    check_partition(metric.shape[1], dst_idx, src_idx)
    win = check_window(metric.shape[1], dst_idx, h, w, sx, sy, window)
    if src_idx.numel() == 0 or metric.shape[0] == 0:
        return _best_dst_fake(metric, dst_idx, src_idx)
    with torch.no_grad():
        score, dst_pos = matching.best_dst_local(metric, dst_idx, src_idx, win)
    return score.contiguous(), dst_pos.contiguous()


def _build_plan_local_cpu(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, h: int, w: int, sx: int, sy: int,
                          window: int, r: int):
    check_partition(metric.shape[1], dst_idx, src_idx)
    return _plan_cpu(metric, dst_idx, src_idx, r, check_window(metric.shape[1], dst_idx, h, w, sx, sy, window))


def _build_plan_cpu(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, r: int):
    check_partition(metric.shape[1], dst_idx, src_idx)
    return _plan_cpu(metric, dst_idx, src_idx, r, None)


def _plan_cpu(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, r: int, window: Optional[LocalWindow]):
    if not 0 <= r <= src_idx.shape[0]:
        raise RuntimeError(f"tomesd: r = {r} must be in [0, {src_idx.shape[0]}] (the number of src tokens)")
    if r == 0:
        B, N, _ = metric.shape
        slot = torch.arange(N, device=metric.device).expand(B, N).contiguous()
        counts = torch.ones(B, N, dtype=torch.int32, device=metric.device)
    else:
        plan = matching.build_plan(metric, dst_idx, src_idx, r, window)
        slot, counts = plan.slot, plan.counts
    offsets, members = csr(slot, counts)
    return slot, counts.to(torch.int32), offsets, members


def _merge_cpu(x: Tensor, slot: Tensor, offsets: Tensor, members: Tensor, mean: bool = True) -> Tensor:
    check_plan(x.shape[1], slot, offsets, members)
    return matching.merge(x, _plan_of(slot, offsets), mean=mean)


def _unmerge_cpu(y: Tensor, slot: Tensor, offsets: Tensor, members: Tensor) -> Tensor:
    check_plan(slot.shape[1], slot, offsets, members)
    return matching.unmerge(y, _plan_of(slot, offsets))


def _best_dst_fake(metric: Tensor, dst_idx: Tensor, src_idx: Tensor):
    torch._check(metric.dim() == 3, lambda: f"metric must be [B, N, C], got {tuple(metric.shape)}")
    B, S = metric.shape[0], src_idx.shape[0]
    return metric.new_empty(B, S, dtype=torch.float32), metric.new_empty(B, S, dtype=torch.int64)


def _build_plan_fake(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, r: int):
    torch._check(metric.dim() == 3, lambda: f"metric must be [B, N, C], got {tuple(metric.shape)}")
    torch._check(0 <= r <= src_idx.shape[0], lambda: f"r = {r} must be in [0, {src_idx.shape[0]}]")
    B, N = metric.shape[0], metric.shape[1]
    M = N - r
    i32 = torch.int32
    return (metric.new_empty(B, N, dtype=torch.int64), metric.new_empty(B, M, dtype=i32),
            metric.new_empty(B, M + 1, dtype=i32), metric.new_empty(B, N, dtype=i32))


def _best_dst_local_fake(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, h: int, w: int, sx: int, sy: int,
                         window: int):
    torch._check(window >= 1 and window % 2 == 1, lambda: f"match_window must be an odd int ≥ 1, got {window}")
    return _best_dst_fake(metric, dst_idx, src_idx)


def _build_plan_local_fake(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, h: int, w: int, sx: int, sy: int,
                           window: int, r: int):
    torch._check(window >= 1 and window % 2 == 1, lambda: f"match_window must be an odd int ≥ 1, got {window}")
    return _build_plan_fake(metric, dst_idx, src_idx, r)


def _check_plan_shapes(t: Tensor, slot: Tensor, offsets: Tensor, members: Tensor) -> None:
    torch._check(t.dim() == 3 and slot.dim() == 2 and offsets.dim() == 2, lambda: "expected [B, *, C] and a [B, N] plan")
    torch._check(t.shape[0] == slot.shape[0], lambda: f"batch {t.shape[0]} != plan batch {slot.shape[0]}")
    torch._check(members.shape == slot.shape, lambda: "members must be shaped like slot")


def _merge_fake(x: Tensor, slot: Tensor, offsets: Tensor, members: Tensor, mean: bool = True) -> Tensor:
    _check_plan_shapes(x, slot, offsets, members)
    torch._check(x.shape[1] == slot.shape[1], lambda: f"x has {x.shape[1]} tokens, the plan {slot.shape[1]}")
    return x.new_empty(x.shape[0], offsets.shape[1] - 1, x.shape[2])


def _unmerge_fake(y: Tensor, slot: Tensor, offsets: Tensor, members: Tensor) -> Tensor:
    _check_plan_shapes(y, slot, offsets, members)
    torch._check(y.shape[1] == offsets.shape[1] - 1, lambda: f"y has {y.shape[1]} rows, the plan {offsets.shape[1] - 1}")
    return y.new_empty(y.shape[0], slot.shape[1], y.shape[2])


def _save_plan(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[1:4])
    ctx.mean = inputs[4] if len(inputs) > 4 else True


def _merge_backward(ctx, grad: Tensor):
    slot, offsets, members = ctx.saved_tensors
    if ctx.mean:
        grad = grad / counts_of(offsets)[..., None].to(grad.dtype)
    return torch.ops.tomesd.unmerge(grad, slot, offsets, members), None, None, None, None


def _unmerge_backward(ctx, grad: Tensor):
    slot, offsets, members = ctx.saved_tensors
    return torch.ops.tomesd.merge(grad, slot, offsets, members, False), None, None, None


_LIB = None  # the Library object owns the registrations; kept alive for the process


def _register() -> None:
    if hasattr(torch.ops.tomesd, "merge"):  # already registered (module reloaded)
        return
    global _LIB
    _LIB = torch.library.Library("tomesd", "DEF")
    for schema in SCHEMAS.values():
        _LIB.define(schema)
    for name, cpu, fake in (
        ("best_dst", _best_dst_cpu, _best_dst_fake),
        ("build_plan", _build_plan_cpu, _build_plan_fake),
        ("best_dst_local", _best_dst_local_cpu, _best_dst_local_fake),
        ("build_plan_local", _build_plan_local_cpu, _build_plan_local_fake),
        ("merge", _merge_cpu, _merge_fake),
        ("unmerge", _unmerge_cpu, _unmerge_fake),
    ):
        _LIB.impl(name, cpu, "CPU")
        torch.library.register_fake(f"tomesd::{name}", fake, lib=_LIB)
    torch.library.register_autograd("tomesd::merge", _merge_backward, setup_context=_save_plan, lib=_LIB)
    torch.library.register_autograd("tomesd::unmerge", _unmerge_backward, setup_context=_save_plan, lib=_LIB)


_register()

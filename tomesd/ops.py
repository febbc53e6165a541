"""The op surface: build_plan, merge, unmerge, and the one place that picks a backend.

Backends: "cuda" (the kernels in csrc/) and "torch" (tomesd.matching, runs everywhere).
`TOMESD_BACKEND=torch|cuda|auto` forces a choice; "cuda" raises if the kernels cannot serve a
tensor. `choose_backend(t)` returns the backend and, for each refused one, why (printed by
`python -m tomesd.info`).

The torch.library ops (namespace `tomesd`) are defined here, in Python, so that they exist on every
machine: their schemas, CPU implementations (the matching.py algorithm, for tests and tracing), fake
implementations (shapes only, so `torch.compile(fullgraph=True)` traces a patched model) and autograd
formulas. The C++ extension (csrc/ops.cpp, loaded by tomesd._build) only adds the CUDA kernels with
`TORCH_LIBRARY_IMPL(tomesd, CUDA, ...)`. One schema, one registration site, testable without a GPU:

  best_dst(metric [B, N, C], dst_idx [D], src_idx [S]) -> (score [B, S] fp32, dst_pos [B, S] int64)
  build_plan(metric, dst_idx, src_idx, r) -> (slot [B, N] int64, counts [B, M] int32,
                                              offsets [B, M + 1] int32, members [B, N] int32)
  merge(x [B, N, C], slot, offsets, members, mean) -> [B, M, C]   segment mean (or sum) over the CSR rows
  unmerge(y [B, M, C], slot, offsets, members) -> [B, N, C]       y[b, slot[b, n]]

M = N − r; dst_idx and src_idx are disjoint; 0 ≤ r ≤ S. merge and unmerge are each other's adjoint
up to the counts: d merge(x)/dx = unmerge(g / counts), d unmerge(y)/dy = merge(g, mean=False).
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

import torch
from torch import Tensor

from . import matching
from .matching import MergePlan

BACKENDS = ("auto", "torch", "cuda")
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def requested_backend() -> str:
    value = os.environ.get("TOMESD_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"TOMESD_BACKEND={os.environ['TOMESD_BACKEND']!r} is not one of {', '.join(BACKENDS)} "
                         "(unset it for auto)")
    return value


def _cuda_refusal(device_type: str, dtype: torch.dtype) -> str:
    if device_type != "cuda":
        return f"tensor is on {device_type}, not cuda"
    if dtype not in CUDA_DTYPES:
        return f"dtype {dtype} is not fp16, bf16 or fp32"
    from . import _build

    error = _build.load_error()
    return f"extension unavailable: {error}" if error else ""


def cuda_refusal(t: Tensor) -> str:
    """Why the CUDA kernels cannot serve tensor t ("" if they can)."""
    return _cuda_refusal(t.device.type, t.dtype)


def _choose_for(device_type: str, dtype: torch.dtype) -> Tuple[str, Dict[str, str]]:
    want = requested_backend()
    if want == "torch":
        return "torch", {"cuda": "TOMESD_BACKEND=torch"}
    reason = _cuda_refusal(device_type, dtype)
    if not reason:
        return "cuda", {}
    if want == "cuda":
        raise RuntimeError(f"TOMESD_BACKEND=cuda but the CUDA kernels cannot run: {reason}")
    return "torch", {"cuda": reason}


def choose_backend(t: Tensor) -> Tuple[str, Dict[str, str]]:
    """(backend for tensor t, {refused backend: reason})."""
    return _choose_for(t.device.type, t.dtype)


@torch.compiler.assume_constant_result
def _backend_for(device_type: str, dtype: torch.dtype) -> str:
    # Device type and dtype are static under torch.compile: the choice is made once at trace time
    # (loading the extension if needed) and baked into the graph, without a graph break.
    return _choose_for(device_type, dtype)[0]


def _use_cuda(t: Tensor) -> bool:
    return _backend_for(t.device.type, t.dtype) == "cuda"


def csr(slot: Tensor, counts: Tensor) -> Tuple[Tensor, Tensor]:
    """(offsets [B, M + 1] int32, members [B, N] int32) of a slot map: row m's tokens in raster order."""
    zero = counts.new_zeros(counts.shape[0], 1)
    offsets = torch.cat([zero, counts.cumsum(dim=1)], dim=1).to(torch.int32)
    members = torch.argsort(slot, dim=1, stable=True).to(torch.int32)
    return offsets, members


def build_plan(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, r: int) -> MergePlan:
    """MergePlan for metric [B, N, C]: the r best-matching src merge into their dst; 0 < r ≤ S."""
    if _use_cuda(metric):
        with torch.no_grad():
            slot, counts, offsets, members = torch.ops.tomesd.build_plan(metric, dst_idx, src_idx, r)
        return MergePlan(slot=slot, counts=counts, num_out=metric.shape[1] - r, offsets=offsets, members=members)
    return matching.build_plan(metric, dst_idx, src_idx, r)


def _plan_csr(plan: MergePlan) -> Tuple[Tensor, Tensor]:
    if plan.offsets is not None and plan.members is not None:
        return plan.offsets, plan.members
    return csr(plan.slot, plan.counts)


def merge(x: Tensor, plan: MergePlan) -> Tensor:
    """Segment mean by slot: x [B, N, C] → [B, M, C]."""
    if _use_cuda(x):
        offsets, members = _plan_csr(plan)
        return torch.ops.tomesd.merge(x, plan.slot, offsets, members, True)
    return matching.merge(x, plan)


def unmerge(y: Tensor, plan: MergePlan) -> Tensor:
    """Gather by slot: y [B, M, C] → [B, N, C]."""
    if _use_cuda(y):
        offsets, members = _plan_csr(plan)
        return torch.ops.tomesd.unmerge(y, plan.slot, offsets, members)
    return matching.unmerge(y, plan)


# ---- torch.library registration: schemas, CPU and fake impls, autograd ----

SCHEMAS = {
    "best_dst": "best_dst(Tensor metric, Tensor dst_idx, Tensor src_idx) -> (Tensor, Tensor)",
    "build_plan": "build_plan(Tensor metric, Tensor dst_idx, Tensor src_idx, int r) -> (Tensor, Tensor, Tensor, Tensor)",
    "merge": "merge(Tensor x, Tensor slot, Tensor offsets, Tensor members, bool mean=True) -> Tensor",
    "unmerge": "unmerge(Tensor y, Tensor slot, Tensor offsets, Tensor members) -> Tensor",
}


def _best_dst_cpu(metric: Tensor, dst_idx: Tensor, src_idx: Tensor) -> Tuple[Tensor, Tensor]:
    if src_idx.numel() == 0:  # nothing to match (also with no dst), as the CUDA op
        return _best_dst_fake(metric, dst_idx, src_idx)
    with torch.no_grad():
        score, dst_pos = matching.best_dst(metric, dst_idx, src_idx)
    return score.contiguous(), dst_pos.contiguous()


def _build_plan_cpu(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, r: int):
    if r == 0:
        B, N, _ = metric.shape
        slot = torch.arange(N, device=metric.device).expand(B, N).contiguous()
        counts = torch.ones(B, N, dtype=torch.int32, device=metric.device)
    else:
        plan = matching.build_plan(metric, dst_idx, src_idx, r)
        slot, counts = plan.slot, plan.counts
    offsets, members = csr(slot, counts)
    return slot, counts.to(torch.int32), offsets, members


def _counts(offsets: Tensor) -> Tensor:
    return offsets[:, 1:] - offsets[:, :-1]


def _merge_cpu(x: Tensor, slot: Tensor, offsets: Tensor, members: Tensor, mean: bool = True) -> Tensor:
    B, N, C = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # as the kernels: fp32 or wider
    out = x.new_zeros(B, offsets.shape[1] - 1, C, dtype=acc)
    out.scatter_add_(1, slot[..., None].expand(B, N, C), x.to(acc))
    if mean:
        out = out / _counts(offsets)[..., None]
    return out.to(x.dtype)


def _unmerge_cpu(y: Tensor, slot: Tensor, offsets: Tensor, members: Tensor) -> Tensor:
    return matching.unmerge(y, MergePlan(slot=slot, counts=_counts(offsets), num_out=offsets.shape[1] - 1))


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


def _check_plan(t: Tensor, slot: Tensor, offsets: Tensor, members: Tensor) -> None:
    torch._check(t.dim() == 3 and slot.dim() == 2 and offsets.dim() == 2, lambda: "expected [B, *, C] and a [B, N] plan")
    torch._check(t.shape[0] == slot.shape[0], lambda: f"batch {t.shape[0]} != plan batch {slot.shape[0]}")
    torch._check(members.shape == slot.shape, lambda: "members must be shaped like slot")


def _merge_fake(x: Tensor, slot: Tensor, offsets: Tensor, members: Tensor, mean: bool = True) -> Tensor:
    _check_plan(x, slot, offsets, members)
    torch._check(x.shape[1] == slot.shape[1], lambda: f"x has {x.shape[1]} tokens, the plan {slot.shape[1]}")
    return x.new_empty(x.shape[0], offsets.shape[1] - 1, x.shape[2])


def _unmerge_fake(y: Tensor, slot: Tensor, offsets: Tensor, members: Tensor) -> Tensor:
    _check_plan(y, slot, offsets, members)
    torch._check(y.shape[1] == offsets.shape[1] - 1, lambda: f"y has {y.shape[1]} rows, the plan {offsets.shape[1] - 1}")
    return y.new_empty(y.shape[0], slot.shape[1], y.shape[2])


def _save_plan(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[1:4])
    ctx.mean = inputs[4] if len(inputs) > 4 else True


def _merge_backward(ctx, grad: Tensor):
    slot, offsets, members = ctx.saved_tensors
    if ctx.mean:
        grad = grad / _counts(offsets)[..., None].to(grad.dtype)
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
        ("merge", _merge_cpu, _merge_fake),
        ("unmerge", _unmerge_cpu, _unmerge_fake),
    ):
        _LIB.impl(name, cpu, "CPU")
        torch.library.register_fake(f"tomesd::{name}", fake, lib=_LIB)
    torch.library.register_autograd("tomesd::merge", _merge_backward, setup_context=_save_plan, lib=_LIB)
    torch.library.register_autograd("tomesd::unmerge", _unmerge_backward, setup_context=_save_plan, lib=_LIB)


_register()

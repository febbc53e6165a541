"""The op surface: build_plan, merge, unmerge, and the one place that picks a backend.

Backends: "cuda" (the kernels in csrc/, registered as torch.library ops `tomesd::*`) and "torch"
(tomesd.matching, runs everywhere). `TOMESD_BACKEND=torch|cuda|auto` forces a choice; "cuda" raises
if the kernels cannot serve a tensor. `choose_backend(t)` returns the backend and, for each refused
one, why (printed by `python -m tomesd.info`).
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
        raise ValueError(f"TOMESD_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def cuda_refusal(t: Tensor) -> str:
    """Why the CUDA kernels cannot serve tensor t ("" if they can)."""
    if t.device.type != "cuda":
        return f"tensor is on {t.device.type}, not cuda"
    if t.dtype not in CUDA_DTYPES:
        return f"dtype {t.dtype} is not fp16, bf16 or fp32"
    from . import _build

    error = _build.load_error()
    return f"extension unavailable: {error}" if error else ""


def choose_backend(t: Tensor) -> Tuple[str, Dict[str, str]]:
    """(backend for tensor t, {refused backend: reason})."""
    want = requested_backend()
    if want == "torch":
        return "torch", {"cuda": "TOMESD_BACKEND=torch"}
    reason = cuda_refusal(t)
    if not reason:
        return "cuda", {}
    if want == "cuda":
        raise RuntimeError(f"TOMESD_BACKEND=cuda but the CUDA kernels cannot run: {reason}")
    return "torch", {"cuda": reason}


@torch.compiler.disable
def _choose(t: Tensor) -> str:
    return choose_backend(t)[0]


def _use_cuda(t: Tensor) -> bool:
    # Device and dtype are static under torch.compile, so only CUDA tensors reach the Python check.
    return t.device.type == "cuda" and _choose(t) == "cuda"


def build_plan(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, r: int) -> MergePlan:
    """MergePlan for metric [B, N, C]: the r best-matching src merge into their dst; 0 < r ≤ S."""
    if _use_cuda(metric):
        slot, counts = torch.ops.tomesd.build_plan(metric, dst_idx, src_idx, r)
        return MergePlan(slot=slot, counts=counts, num_out=metric.shape[1] - r)
    return matching.build_plan(metric, dst_idx, src_idx, r)


def merge(x: Tensor, plan: MergePlan) -> Tensor:
    """Segment mean by slot: x [B, N, C] → [B, M, C]."""
    if _use_cuda(x):
        return torch.ops.tomesd.merge(x, plan.slot, plan.counts, plan.num_out)
    return matching.merge(x, plan)


def unmerge(y: Tensor, plan: MergePlan) -> Tensor:
    """Gather by slot: y [B, M, C] → [B, N, C]."""
    if _use_cuda(y):
        return torch.ops.tomesd.unmerge(y, plan.slot)
    return matching.unmerge(y, plan)

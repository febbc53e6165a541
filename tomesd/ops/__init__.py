"""The op surface: build_plan, merge, unmerge, and the one place that picks a backend.

Backends: "cuda" (the kernels in csrc/, loaded by tomesd.ops.loader) and "torch" (tomesd.matching,
runs everywhere). `TOMESD_BACKEND=torch|cuda|auto` forces a choice; "cuda" raises if the kernels
cannot serve a tensor. `choose_backend(t)` returns the backend and, for each refused one, why
(printed by `python -m tomesd.info`). `report()` lists the path the op calls of this process took,
per device and dtype (and inside CUDA-graph captures apart), with why; `prepare(device)` loads and
self-checks the kernels ahead of a CUDA-graph capture.

Which ops a traced or exported graph holds (`graph_ops`, a context manager, per thread): "auto" (the
default) calls torch.ops.tomesd where the CUDA kernels serve the tensor and the PyTorch path elsewhere,
as eager calls do; "aten" always the PyTorch path, so the graph holds ATen ops only (ONNX, OpenVINO:
targets without the tomesd ops); "tomesd" always torch.ops.tomesd (opaque in the graph, their
fake impls give the shapes; on the CPU their CPU impls run the same PyTorch algorithm).

The torch.library ops these functions call on CUDA (`torch.ops.tomesd.*`: schemas, CPU and fake
impls, autograd) are defined in tomesd.ops.torch_ops, imported here so that they exist once tomesd.ops does.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import matching
from ..matching import LocalWindow, MergePlan
from . import loader
from .torch_ops import csr

__all__ = ["BACKENDS", "CUDA_DTYPES", "GRAPH_OPS", "requested_backend", "cuda_refusal", "cuda_refusal_for",
           "choose_backend", "backend_for", "prepare", "PathRow", "report", "clear_report", "graph_ops", "csr",
           "plan_csr", "LocalWindow", "build_plan", "merge", "unmerge"]

BACKENDS = ("auto", "torch", "cuda")
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GRAPH_OPS = ("auto", "aten", "tomesd")


class _GraphOps(threading.local):
    kind = "auto"


_GRAPH_OPS = _GraphOps()


@contextlib.contextmanager
def graph_ops(kind: str) -> Iterator[None]:
    """Inside, build_plan / merge / unmerge call: "auto" (default) the CUDA kernels (torch.ops.tomesd)
    where they serve the tensor, else the PyTorch path; "aten" the PyTorch path everywhere (a graph of
    ATen ops only: ONNX, OpenVINO); "tomesd" torch.ops.tomesd everywhere (opaque ops in the graph; on the
    CPU they run the PyTorch algorithm). Read when a call is traced: torch.compile keeps the choice it
    traced with."""
    if kind not in GRAPH_OPS:
        raise ValueError(f"graph_ops kind must be one of {', '.join(GRAPH_OPS)}, got {kind!r}")
    previous, _GRAPH_OPS.kind = _GRAPH_OPS.kind, kind
    try:
        yield
    finally:
        _GRAPH_OPS.kind = previous


def requested_backend() -> str:
    value = os.environ.get("TOMESD_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"TOMESD_BACKEND={os.environ['TOMESD_BACKEND']!r} is not one of {', '.join(BACKENDS)} "
                         "(unset it for auto)")
    return value


def cuda_refusal_for(device, dtype: torch.dtype) -> str:
    """Why the CUDA kernels cannot serve a tensor of this device (torch.device or str) and dtype ("" if
    they can). On a CUDA device this loads the kernels and self-checks them there on first use."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"tensor is on {device.type}, not cuda"
    if dtype not in CUDA_DTYPES:
        return f"dtype {dtype} is not fp16, bf16 or fp32"
    error = loader.load_error(device)
    return f"extension unavailable: {error}" if error else ""


def cuda_refusal(t: Tensor) -> str:
    """Why the CUDA kernels cannot serve tensor t ("" if they can)."""
    return cuda_refusal_for(t.device, t.dtype)


def _choose_for(device_type: str, index: Optional[int], dtype: torch.dtype) -> Tuple[str, Dict[str, str]]:
    want = requested_backend()
    if want == "torch":
        return "torch", {"cuda": "TOMESD_BACKEND=torch"}
    reason = cuda_refusal_for(torch.device(device_type, index), dtype)
    if not reason:
        return "cuda", {}
    if want == "cuda":
        raise RuntimeError(f"TOMESD_BACKEND=cuda but the CUDA kernels cannot run: {reason}")
    return "torch", {"cuda": reason}


def choose_backend(t: Tensor) -> Tuple[str, Dict[str, str]]:
    """(backend for tensor t, {refused backend: reason})."""
    return _choose_for(t.device.type, t.device.index, t.dtype)


class PathRow(NamedTuple):
    """The path op calls on tensors of one device and dtype took (a row of `report()`).

    backend: "cuda" or "torch"; capture: the calls were recorded into a CUDA graph; reason: why the
    CUDA kernels were refused (backend "torch"), else where they come from and their self-check."""

    device: str
    dtype: str
    capture: bool
    backend: str
    reason: str


_PATHS: Dict[Tuple[str, str, bool, str], str] = {}  # (device, dtype, capture, backend) → why the kernels were refused


def _record(device: torch.device, dtype: torch.dtype, backend: str, refused: Dict[str, str]) -> None:
    capture = device.type == "cuda" and loader.loader.capturing(device)
    _PATHS[(str(device), str(dtype).replace("torch.", ""), capture, backend)] = refused.get("cuda", "")


def report() -> List[PathRow]:
    """Which path the op calls of this process took (build_plan, merge, unmerge; a compiled graph's at
    trace time), one row per device, dtype, backend and whether inside a CUDA-graph capture, with why."""
    rows = []
    for (device, dtype, capture, backend), refusal in sorted(_PATHS.items()):
        if backend == "cuda":
            refusal = (f"kernels {loader.loaded_from() or 'loaded'}; self-check on {device}: "
                       f"{loader.loader.checks.get(device, 'not run')}")
        rows.append(PathRow(device, dtype, capture, backend, refusal))
    return rows


def clear_report() -> None:
    """Forget the paths recorded so far (report() then lists only later calls)."""
    _PATHS.clear()


@torch.compiler.assume_constant_result
def _backend_for(device_type: str, index: Optional[int], dtype: torch.dtype) -> str:
    # Device and dtype are static under torch.compile: the choice is made once at trace time
    # (loading the extension if needed) and baked into the graph, without a graph break.
    backend, refused = _choose_for(device_type, index, dtype)
    _record(torch.device(device_type, index), dtype, backend, refused)
    return backend


def backend_for(device, dtype: torch.dtype) -> str:
    """The backend an op call on a tensor of this device and dtype takes now, recorded in report() as a
    call would be (tomesd.info probes every device and dtype with it)."""
    device = torch.device(device)
    return _backend_for(device.type, device.index, dtype)


def prepare(device=None) -> str:
    """Load the CUDA kernels and self-check them on `device` (default: the current CUDA device) now.

    Call it before capturing a CUDA graph of a patched model whose first op calls would come inside
    the capture: a capture cannot load or check them (the check synchronizes), so it would record the
    PyTorch path (said by one RuntimeWarning and by report()). Returns why the kernels cannot serve
    that device ("" when they can)."""
    if requested_backend() == "torch":
        return "TOMESD_BACKEND=torch"
    return cuda_refusal_for("cuda" if device is None else device, torch.float16)


@torch.compiler.assume_constant_result
def _ops_for(device_type: str, index: Optional[int], dtype: torch.dtype) -> bool:
    # Whether to call torch.ops.tomesd (else the PyTorch path). Device, dtype and the graph_ops setting are
    # static under torch.compile: the choice is made once at trace time (loading the extension if needed)
    # and baked into the graph, without a graph break.
    kind = _GRAPH_OPS.kind
    if kind == "aten":
        return False
    if kind == "tomesd":
        if device_type != "cpu":
            reason = cuda_refusal_for(torch.device(device_type, index), dtype)
            if reason:
                raise RuntimeError(f"tomesd: graph_ops('tomesd') but the tomesd ops cannot run on this tensor: {reason}")
        return True
    return _backend_for(device_type, index, dtype) == "cuda"


def _use_ops(t: Tensor) -> bool:
    return _ops_for(t.device.type, t.device.index, t.dtype)


def plan_csr(plan: MergePlan) -> Tuple[Tensor, Tensor]:
    """(offsets [B, M + 1], members [B, N]) of a plan: its own CSR (CUDA-built plans carry one), else
    built from slot and counts (plans of the PyTorch path), as the CUDA merge / unmerge take it."""
    if plan.offsets is not None and plan.members is not None:
        return plan.offsets, plan.members
    return csr(plan.slot, plan.counts)


def build_plan(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, r: int,
               window: Optional[LocalWindow] = None) -> MergePlan:
    """MergePlan for metric [B, N, C]: the r best-matching src merge into their dst; 0 < r ≤ S.

    window: local matching (each src compares with the dst of the k × k cells around its own; dst_idx
    from matching.partition on the window's grid); None, or a window covering the whole grid: global.
    """
    if window is not None and window.covers_grid():
        window = None  # every dst is a candidate: the global matching, exactly
    if _use_ops(metric):
        with torch.no_grad():
            if window is None:
                slot, counts, offsets, members = torch.ops.tomesd.build_plan(metric, dst_idx, src_idx, r)
            else:
                slot, counts, offsets, members = torch.ops.tomesd.build_plan_local(
                    metric, dst_idx, src_idx, window.h, window.w, window.sx, window.sy, window.k, r)
        return MergePlan(slot=slot, counts=counts, num_out=metric.shape[1] - r, offsets=offsets, members=members)
    return matching.build_plan(metric, dst_idx, src_idx, r, window)


def merge(x: Tensor, plan: MergePlan) -> Tensor:
    """Segment mean by slot: x [B, N, C] → [B, M, C]."""
    if _use_ops(x):
        offsets, members = plan_csr(plan)
        return torch.ops.tomesd.merge(x, plan.slot, offsets, members, True)
    return matching.merge(x, plan)


def unmerge(y: Tensor, plan: MergePlan) -> Tensor:
    """Gather by slot: y [B, M, C] → [B, N, C]."""
    if _use_ops(y):
        offsets, members = plan_csr(plan)
        return torch.ops.tomesd.unmerge(y, plan.slot, offsets, members)
    return matching.unmerge(y, plan)

"""Exporting a patched denoiser: torch.export, and what exports through it (AOTInductor, ONNX with
`torch.onnx.export(..., dynamo=True)`, OpenVINO's `convert_model` of an ExportedProgram).

A plain `torch.export.export(model, args, kwargs=...)` of a patched UNet or SD 3 transformer works
(strict or not): while torch.export traces, the hooks keep no checkpoint records and read no input
value on the host, and the random dst choice stays a hash of the timestep input inside the graph. What
an exported program cannot do is refused when tracing starts, naming the option (plan_every > 1, a ratio
callable taking `timestep`). `exporting(model, args, kwargs, ops=...)` adds what plain torch.export
cannot know: the choice of ops in the graph (`tomesd.ops.graph_ops`) and what a host reads from input
values (Flux's token layout, from img_ids), taken from the example inputs; `export(...)` is
torch.export.export inside it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .ops import GRAPH_OPS, graph_ops
from .patch import patched_state
from .patch.calls import traced_root
from .patch.compiled import check_exportable

__all__ = ["GRAPH_OPS", "export", "exporting", "graph_ops"]


@contextlib.contextmanager
def exporting(model, args: tuple = (), kwargs: Optional[dict] = None, ops: str = "auto") -> Iterator[None]:
    """A context for exporting `model` (patched or not) called with these example inputs: refuses
    settings an exported program cannot run (ValueError naming the option), lets a host that reads input
    values (Flux: img_ids) take them from the example inputs, and sets the graph's ops:
    "auto" (default: the CUDA kernels' tomesd ops where they serve the tensors, ATen elsewhere — on the
    CPU, ATen only), "aten" (ATen only: ONNX, OpenVINO) or "tomesd" (the tomesd:: custom ops)."""
    if ops not in GRAPH_OPS:
        raise ValueError(f"ops must be one of {', '.join(GRAPH_OPS)}, got {ops!r}")
    state = patched_state(model)
    with contextlib.ExitStack() as stack:
        if state is not None:
            check_exportable(state.config)
            stack.enter_context(state.host.export_inputs(tuple(args), dict(kwargs or {})))
            stack.enter_context(traced_root(state))
        stack.enter_context(graph_ops(ops))
        yield


def export(model, args: tuple = (), kwargs: Optional[dict] = None, *, ops: str = "auto", **options):
    """torch.export.export(model, args, kwargs=kwargs, **options) inside `exporting(model, args, kwargs,
    ops)`: an ExportedProgram computing what the patched model computes (every timestep: the random dst
    choice is a function of the timestep input)."""
    with exporting(model, args, kwargs, ops=ops):
        return torch.export.export(model, tuple(args), kwargs=kwargs, **options)

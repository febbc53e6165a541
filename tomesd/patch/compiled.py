"""torch.compile wrappers: what a compiled model holds, and whether hooks changed after tracing
reach it; whether torch.export is tracing the call."""
from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.comptime import comptime

from ..config import ToMeConfig


def unwrap_compiled(module):
    """The module a `torch.compile(module)` wrapper (OptimizedModule) holds; anything else unchanged."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(module, nn.Module) and isinstance(inner, nn.Module) else module


def is_compiled(module) -> bool:
    """True if module is a torch.compile wrapper or it, or a module inside it, was compiled in place
    (`module.compile()`): compiled code does not see hooks added or removed after it was traced."""
    if not isinstance(module, nn.Module):
        return False
    if unwrap_compiled(module) is not module:
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def exporting() -> bool:
    """True while torch.export traces (strict or not; torch.onnx.export(dynamo=True) exports through
    it): an exported program keeps no Python state between calls and reads no
    input value on the host, so the hooks take the traced path (no checkpoint records, no host syncs)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _raise_traced(ctx) -> None:
    """A comptime callback: raise_error's exception, raised while dynamo traces."""
    raise ctx.get_local("kind").as_python_constant()(ctx.get_local("message").as_python_constant())


def raise_error(kind: type, message: str) -> None:
    """Raise kind(message); while dynamo traces (strict torch.export), from the tracer itself, so that
    it reaches the caller as is rather than as dynamo's "observed exception"."""
    if torch.compiler.is_dynamo_compiling():
        comptime(_raise_traced)
    raise kind(message)


def check_exportable(config: ToMeConfig) -> None:
    """Raise ValueError naming every option of config that an exported program cannot run
    (ToMeConfig.export_refusals)."""
    refusals = config.export_refusals()
    if refusals:
        raise_error(ValueError, "tomesd: this patched model cannot be exported: " + "; ".join(refusals))

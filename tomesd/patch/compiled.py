"""torch.compile wrappers: what a compiled model holds, and whether hooks changed after tracing
reach it."""
from __future__ import annotations

from torch import nn


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

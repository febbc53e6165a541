"""MethodWrapper: run code around a module's method, for what module hooks cannot do."""
from __future__ import annotations

from typing import Callable

from torch import nn


class MethodWrapper:
    """Replaces `module.<name>` on the instance by `around(original, args, kwargs)`.

    For what module hooks cannot do: run code around a method that a checkpoint recompute calls
    directly (LDM's `checkpoint(self._forward, ...)`), or keep a context open for exactly the length
    of a forward. `remove()` restores the instance exactly; once removed, a wrapper still referenced
    elsewhere only forwards the call. The wrapper is this object (not a closure), so a deep copy or a
    pickle of the module carries a wrapper of the copy's own method.
    """

    def __init__(self, module: nn.Module, name: str, around: Callable):
        self.module, self.name, self.around = module, name, around
        self.had = name in vars(module)
        self.previous = vars(module).get(name)
        self.original = getattr(module, name)
        self.active = True
        vars(module)[name] = self

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.original(*args, **kwargs)
        return self.around(self.original, args, kwargs)

    def remove(self) -> None:
        self.active = False
        if vars(self.module).get(self.name) is self:
            if self.had:
                vars(self.module)[self.name] = self.previous
            else:
                del vars(self.module)[self.name]

"""MethodWrapper: run code around a module's method, for what module hooks cannot do."""
from __future__ import annotations

import functools
from typing import Callable

from torch import nn


class MethodWrapper:
    """Replaces `module.<name>` on the instance by `around(original, args, kwargs)`.

    For what module hooks cannot do: run code around a method that a checkpoint recompute calls
    directly (LDM's `checkpoint(self._forward, ...)`), or keep a context open for exactly the length
    of a forward. `remove()` restores the instance exactly; once removed, a wrapper still referenced
    elsewhere only forwards the call.
    """

    def __init__(self, module: nn.Module, name: str, around: Callable):
        self.module, self.name = module, name
        self.had = name in vars(module)
        self.previous = vars(module).get(name)
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            return around(original, args, kwargs)

        self.active = True
        self.wrapped = wrapped
        vars(module)[name] = wrapped

    def remove(self) -> None:
        self.active = False
        if vars(self.module).get(self.name) is self.wrapped:
            if self.had:
                vars(self.module)[self.name] = self.previous
            else:
                del vars(self.module)[self.name]

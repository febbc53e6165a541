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


class ProcessorWrapper:
    """Replaces a diffusers attention's `processor` by itself, calling `around(inner, args, kwargs)`.

    The attention's own forward runs unchanged and calls its processor as always. Wrappers of one
    processor class are instances of one class (compiled code guards on the processor's type, not on a
    per-module callable, so blocks share compiled code, e.g. with `compile_repeated_blocks`). diffusers
    reads `inspect.signature(processor.__call__)` to filter extra attention kwargs: that class's
    `__call__` carries the inner processor's signature, so the same kwargs reach it. `remove()` restores
    the inner processor. Use `ProcessorWrapper.wrap(module, around)`.
    """

    _classes: dict = {}

    @classmethod
    def wrap(cls, module: nn.Module, around: Callable) -> "ProcessorWrapper":
        wrapper = _rebuild(cls.class_for(type(module.processor)), module, around, module.processor, True)
        module.processor = wrapper
        return wrapper

    @classmethod
    def class_for(cls, inner: type) -> type:
        """The wrapper class for processors of class `inner` (one per class, made once)."""
        made = cls._classes.get(inner)
        if made is None:
            def __call__(self, *args, **kwargs):
                if not self.active:
                    return self.inner(*args, **kwargs)
                return self.around(self.inner, args, kwargs)

            __call__.__wrapped__ = inner.__call__
            made = cls._classes[inner] = type(f"Wrapped{inner.__name__}", (cls,), {"__call__": __call__})
        return made

    def __reduce__(self):  # the class is made at run time: rebuild it from the inner processor's class
        return (_rebuild, (None, self.module, self.around, self.inner, self.active))

    def remove(self) -> None:
        self.active = False
        if getattr(self.module, "processor", None) is self:
            self.module.processor = self.inner


def _rebuild(cls, module, around, inner, active) -> ProcessorWrapper:
    wrapper = object.__new__(cls or ProcessorWrapper.class_for(type(inner)))
    wrapper.module, wrapper.around, wrapper.inner, wrapper.active = module, around, inner, active
    return wrapper

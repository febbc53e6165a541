"""MethodWrapper: run code around a module's method, for what module hooks cannot do."""
from __future__ import annotations

from typing import Any, Callable

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
    `__call__` carries the inner processor's signature, so the same kwargs reach it. Attributes other
    than the wrapper's own are read from and set on the inner processor (e.g. an adapter's scale).
    `owner`: the patch that made it (`serves` tells a patch's own live wrapper from one of another
    patch, or one retired by `remove()` and set back). `remove()` restores the inner processor. Use
    `ProcessorWrapper.wrap(module, around, owner)`.
    """

    _classes: dict = {}
    _OWN = ("module", "around", "inner", "active", "owner")

    @classmethod
    def wrap(cls, module: nn.Module, around: Callable, owner: Any = None) -> "ProcessorWrapper":
        wrapper = _rebuild(cls.class_for(type(module.processor)), module, around, module.processor, True, owner)
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

    def __getattr__(self, name: str):  # only for names the wrapper does not have
        if name in self._OWN or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __reduce__(self):  # the class is made at run time: rebuild it from the inner processor's class
        return (_rebuild, (None, self.module, self.around, self.inner, self.active, self.owner))

    def serves(self, module: nn.Module, owner: Any) -> bool:
        """Whether this is `owner`'s live wrapper of `module`'s processor."""
        return self.active and self.owner is owner and self.module is module

    def remove(self) -> None:
        self.active = False
        if getattr(self.module, "processor", None) is self:
            self.module.processor = self.inner


def own_processor(module: nn.Module, owner: Any) -> bool:
    """Whether `module`'s processor now is `owner`'s live wrapper of it (not a processor set after patching:
    another one, a wrapper of another patch, or one of its own retired wrappers set back)."""
    processor = getattr(module, "processor", None)
    return isinstance(processor, ProcessorWrapper) and processor.serves(module, owner)


def _rebuild(cls, module, around, inner, active, owner=None) -> ProcessorWrapper:
    wrapper = object.__new__(cls or ProcessorWrapper.class_for(type(inner)))
    for name, value in zip(ProcessorWrapper._OWN, (module, around, inner, active, owner)):
        object.__setattr__(wrapper, name, value)
    return wrapper

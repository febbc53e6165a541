"""Reading a host's forward arguments by name (hosts are called positionally or by keyword)."""
from __future__ import annotations

import inspect
from typing import Optional, Sequence, Tuple

from torch import Tensor, nn


def get_arg(args: tuple, kwargs: dict, names: Sequence[str], position: Optional[int]):
    """(value, where): the argument at `position` or passed by one of `names`; (None, None) if absent.
    `where` is the position (int) or the keyword (str), for `set_arg`."""
    if position is not None and len(args) > position:
        return args[position], position
    for name in names:
        if name in kwargs:
            return kwargs[name], name
    return None, None


def set_arg(args: tuple, kwargs: dict, where, value) -> Tuple[tuple, dict]:
    """(args, kwargs) with the argument found at `where` (see get_arg) replaced by value."""
    if isinstance(where, int):
        args = args[:where] + (value,) + args[where + 1 :]
    else:
        kwargs = dict(kwargs)
        kwargs[where] = value
    return args, kwargs


def arg_position(module: nn.Module, names: Sequence[str], default: Optional[int]) -> Optional[int]:
    """Position of the first of `names` among the positional parameters of type(module).forward.

    The class's forward is read (not the instance attribute, which offloading / cache hooks may
    replace by a (*args, **kwargs) wrapper). None if the forward names none of them positionally;
    `default` if its signature cannot be read.
    """
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return default
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional and any(p.kind is p.VAR_POSITIONAL for p in params):
        return default
    for name in names:
        if name in positional:
            return positional.index(name)
    return None


def first_tensor(output) -> Optional[Tensor]:
    """The first tensor of a forward's output (a tensor, tuple, list, dict or output dataclass)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        values = output
    elif isinstance(output, dict):
        values = list(output.values())
    else:
        values = list(getattr(output, "__dict__", {}).values())
    return next((v for v in values if isinstance(v, Tensor)), None)

"""Modes: how a sub-layer runs on merged tokens, one module each. A new mode is one new module
registered in MODES; the engine only calls Mode.enter / Mode.exit."""
from __future__ import annotations

from .base import Mode, SublayerCall
from .kv import KVMode
from .tokens import TokensMode

MODES = {mode.name: mode for mode in (TokensMode, KVMode)}

__all__ = ["Mode", "SublayerCall", "MODES", "TokensMode", "KVMode", "make"]


def make(name: str, prop: bool) -> Mode:
    """The mode `name` ("tokens", "kv"), with proportional attention if `prop`."""
    return MODES[name](prop=prop)

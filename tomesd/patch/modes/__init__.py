"""Modes: how a sub-layer runs on merged tokens, one module each (tokens.py, kv.py). MODES is the one
list of them: a new mode is one new module registered here, and nothing else names modes.

resolve(config, host) gives the patch's configuration with its mode (None: the host's default) and a
prop_attn left to follow the mode resolved; refusals(host, config) why the model cannot run it;
make(config, host, sublayers) the Mode of each sub-layer ("self" sub-layers and whole blocks: the
configured mode; cross-attention and feed-forward: tokens).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional

from ..hosts.base import ATTENTION_KINDS
from .base import Mode
from .kv import KVMode
from .tokens import TokensMode

if TYPE_CHECKING:  # pragma: no cover
    from ...config import ToMeConfig
    from ..hosts.base import Host, Sublayer

MODES = {mode.name: mode for mode in (TokensMode, KVMode)}
OTHER_SUBLAYERS = TokensMode  # how cross-attention and feed-forward sub-layers merge, in every mode

__all__ = ["Mode", "MODES", "TokensMode", "KVMode", "check", "resolve", "refusals", "notes", "merges_inputs",
           "make"]


def check(config: "ToMeConfig") -> None:
    """ValueError if config's mode is not None or one of MODES (tools check settings with it before work)."""
    if config.mode is not None and config.mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)} or None, got {config.mode!r}")


def resolve(config: "ToMeConfig", host: "Host") -> "ToMeConfig":
    """config with mode (None: host.default_mode) and prop_attn (None: the mode's default) resolved;
    ValueError for a mode that is not in MODES."""
    check(config)
    mode = config.mode if config.mode is not None else host.default_mode
    prop = config.prop_attn
    if prop is None:
        prop = MODES[mode].prop_default(config, host.attention)
    return replace(config, mode=mode, prop_attn=prop)


def refusals(host: "Host", config: "ToMeConfig") -> List[str]:
    """Why the resolved config's mode cannot run on host ([] if it can)."""
    return MODES[config.mode].refusals(host, config)


def notes(host: "Host", config: "ToMeConfig", prop_given: bool) -> List[str]:
    """What patching logs at INFO about the resolved config's mode on host."""
    return MODES[config.mode].notes(host, config, prop_given)


def merges_inputs(config: "ToMeConfig") -> bool:
    """Whether the resolved config's mode merges sub-layers' input tokens (Mode.merges_inputs)."""
    return MODES[config.mode].merges_inputs


def make(config: "ToMeConfig", host: "Host", sublayers: Optional[Iterable["Sublayer"]] = None) -> Dict[str, Mode]:
    """Sub-layer name → its Mode, for a resolved config and the sub-layers patched (default: the host's)."""
    subs = host.sublayers if sublayers is None else sublayers
    return {sub.name: MODES[config.mode](host.attention, config.prop_attn) if sub.kind in ATTENTION_KINDS
            else OTHER_SUBLAYERS(host.attention, False) for sub in subs}

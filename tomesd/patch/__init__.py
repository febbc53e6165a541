"""Attaching to hosts. One module per host (diffusers.py, ldm.py, mmdit.py); hooks.py holds what they share."""
from __future__ import annotations

import logging
from typing import List

import torch
from torch import nn

from ..config import ToMeConfig
from . import diffusers as _diffusers
from . import ldm as _ldm
from . import mmdit as _mmdit
from .hooks import STATE_ATTR, Host, ModelState, attach, detach, is_compiled, owner, unwrap_compiled

__all__ = ["Host", "ModelState", "attach", "detach", "find_host", "attach_to", "detach_from", "patched_state"]

logger = logging.getLogger("tomesd")


def find_host(model) -> Host:
    """The denoiser and transformer blocks of `model`; TypeError/ValueError if there are none."""
    for finder in (_ldm.find_host, _mmdit.find_host, _diffusers.find_host):
        host = finder(model)
        if host is not None:
            return host
    if not isinstance(model, nn.Module) and _diffusers.denoiser(model) is None:
        raise TypeError(
            "tomesd: model must be a diffusers pipeline (with .unet or .transformer), a torch.nn.Module holding "
            f"transformer blocks, or an LDM-style model with .model.diffusion_model; got {type(model).__name__}"
        )
    raise ValueError(
        f"tomesd: {type(model).__name__} holds no transformer blocks (diffusers BasicTransformerBlock, "
        "LDM-style BasicTransformerBlock, or an SD 3 / Flux transformer) to merge tokens in"
    )


def _controlnet_hosts(model) -> List[Host]:
    nets = _diffusers.controlnets(model)
    if not nets:
        raise ValueError(f"tomesd: patch_controlnet=True but {type(model).__name__} has no .controlnet")
    hosts = []
    for net in nets:
        host = _diffusers.find_host(model, root=net)
        if host is None:
            raise ValueError(f"tomesd: patch_controlnet=True but {type(net).__name__} holds no transformer blocks")
        hosts.append(host)
    return hosts


def _claim(host: Host) -> None:
    """One patch per block: a patch of a module inside host's root gives way (logged); a patch of a
    module around it is an error, since it already merges in these blocks."""
    others = {}
    for block in host.blocks:
        state = owner(block)
        if state is not None and state.host.root is not host.root:
            others[id(state)] = state
    inside = {id(m) for m in host.root.modules()}
    for state in others.values():
        other = state.host.root
        if id(other) not in inside:
            raise ValueError(
                f"tomesd: {type(other).__name__} is patched and holds the transformer blocks of this "
                f"{type(host.root).__name__}; remove_patch it first, or patch only one of them"
            )
        logger.info("tomesd: replacing the patch of %s, which is inside %s", type(other).__name__,
                    type(host.root).__name__)
        detach(other)


def _after_change(model, roots: List[nn.Module]) -> None:
    """Compiled code does not see hooks added or removed after tracing: recompile on the next call."""
    wrappers = [model] + [getattr(model, name, None) for name in _diffusers.DENOISER_ATTRS + ("controlnet",)]
    if any(is_compiled(m) for m in wrappers + roots):
        logger.warning("tomesd: the model is compiled (torch.compile); compiled code does not see hooks "
                       "added or removed after it was traced, so torch.compiler.reset() was called and the next "
                       "call recompiles. Patch before compiling to avoid the recompile")
        torch.compiler.reset()


def attach_to(model, config: ToMeConfig, controlnet: bool = False) -> None:
    """Attach `config` to model's denoiser (and its ControlNets), replacing earlier patches."""
    hosts = [find_host(model)] + (_controlnet_hosts(model) if controlnet else [])
    _detach_roots(model)
    for host in hosts:
        _claim(host)
    for host in hosts:
        attach(host, config)
    _after_change(model, [host.root for host in hosts])


def detach_from(model) -> None:
    """Remove tomesd from model's denoiser and, for a pipeline, its ControlNets."""
    roots = _detach_roots(model)
    if roots:
        _after_change(model, roots)


def _detach_roots(model) -> List[nn.Module]:
    roots = [root for root in _roots(model) if getattr(root, STATE_ATTR, None) is not None]
    for root in roots:
        detach(root)
    return roots


def _roots(model) -> List[nn.Module]:
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    first = unwrap_compiled(inner) if isinstance(inner, nn.Module) else _diffusers.denoiser(model)
    return ([first] if first is not None else []) + _diffusers.controlnets(model)


def patched_state(model):
    """The ModelState of a patched model (pipeline, denoiser or LDM wrapper), else None."""
    for root in _roots(model):
        state = getattr(root, STATE_ATTR, None)
        if state is not None:
            return state
    return None

"""Attaching to hosts. One module per host (diffusers.py, ldm.py); hooks.py holds what they share."""
from __future__ import annotations

from typing import List

from torch import nn

from ..config import ToMeConfig
from . import diffusers as _diffusers
from . import ldm as _ldm
from .hooks import STATE_ATTR, Host, ModelState, attach, detach

__all__ = ["Host", "ModelState", "attach", "detach", "find_host", "attach_to", "detach_from", "patched_state"]


def find_host(model) -> Host:
    """The denoiser and transformer blocks of `model`; TypeError/ValueError if there are none."""
    for finder in (_ldm.find_host, _diffusers.find_host):
        host = finder(model)
        if host is not None:
            return host
    if not isinstance(model, nn.Module) and _diffusers.denoiser(model) is None:
        raise TypeError(
            "tomesd: model must be a diffusers pipeline (with .unet or .transformer), a torch.nn.Module holding "
            f"transformer blocks, or an LDM-style model with .model.diffusion_model; got {type(model).__name__}"
        )
    raise ValueError(
        f"tomesd: {type(model).__name__} holds no transformer blocks (diffusers BasicTransformerBlock or "
        "LDM-style BasicTransformerBlock) to merge tokens in"
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


def attach_to(model, config: ToMeConfig, controlnet: bool = False) -> None:
    """Attach `config` to model's denoiser (and its ControlNets), replacing earlier patches."""
    hosts = [find_host(model)] + (_controlnet_hosts(model) if controlnet else [])
    detach_from(model)
    for host in hosts:
        attach(host, config)


def detach_from(model) -> None:
    """Remove tomesd from model's denoiser and, for a pipeline, its ControlNets."""
    for root in _roots(model):
        detach(root)


def _roots(model) -> List[nn.Module]:
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    first = inner if isinstance(inner, nn.Module) else _diffusers.denoiser(model)
    return ([first] if first is not None else []) + _diffusers.controlnets(model)


def patched_state(model):
    """The ModelState of a patched model (pipeline, denoiser or LDM wrapper), else None."""
    for root in _roots(model):
        state = getattr(root, STATE_ATTR, None)
        if state is not None:
            return state
    return None

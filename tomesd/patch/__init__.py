"""Attaching to hosts. One module per host (diffusers.py, ldm.py); hooks.py holds what they share."""
from __future__ import annotations

from torch import nn

from . import diffusers as _diffusers
from . import ldm as _ldm
from .hooks import STATE_ATTR, Host, ModelState, attach, detach

__all__ = ["Host", "ModelState", "attach", "detach", "find_host", "patched_state"]


def find_host(model) -> Host:
    """The denoiser and transformer blocks of `model`; TypeError/ValueError if there are none."""
    for finder in (_ldm.find_host, _diffusers.find_host):
        host = finder(model)
        if host is not None:
            return host
    if not isinstance(model, nn.Module) and not hasattr(model, "unet"):
        raise TypeError(
            "tomesd: model must be a diffusers pipeline (with .unet), a torch.nn.Module holding transformer "
            f"blocks, or an LDM-style model with .model.diffusion_model; got {type(model).__name__}"
        )
    raise ValueError(
        f"tomesd: {type(model).__name__} holds no transformer blocks (diffusers BasicTransformerBlock or "
        "LDM-style BasicTransformerBlock) to merge tokens in"
    )


def _root_of(model):
    for candidate in (getattr(getattr(model, "model", None), "diffusion_model", None), getattr(model, "unet", None), model):
        if isinstance(candidate, nn.Module):
            return candidate
    return None


def patched_state(model):
    """The ModelState of a patched model (pipeline, denoiser or LDM wrapper), else None."""
    root = _root_of(model)
    return getattr(root, STATE_ATTR, None) if root is not None else None

"""Hosts: one module per kind of model, each describing where its tokens are (hosts.base.Host).

FINDERS is the one ordered list of host finders: the first that recognizes a model wins (ComfyUI's
first: its UNets are LDM-style ones with an attention of their own, and it refuses a ModelPatcher; LDM
models next: their wrapper is no diffusers module; MMDiT before the generic diffusers finder, whose
BasicTransformerBlock search would find nothing in them). `roots(model)` lists the denoiser modules
a patch lives on (the denoiser, then a pipeline's ControlNets).
"""
from __future__ import annotations

from typing import List

from torch import nn

from . import comfyui, diffusers, ldm, mmdit
from .base import KIND_FLAGS, ArgAttention, Attention, Host, Sublayer
from .diffusers import DENOISER_ATTRS, controlnets, denoiser

FINDERS = (comfyui.find_host, ldm.find_host, mmdit.find_host, diffusers.find_host)

__all__ = ["Host", "Sublayer", "Attention", "ArgAttention", "KIND_FLAGS", "FINDERS", "find_host",
           "controlnet_hosts", "roots", "wrappers"]


def find_host(model, root=None) -> Host:
    """The Host of `model` (or of its module `root`); TypeError / ValueError if it holds no blocks."""
    for finder in FINDERS:
        if root is not None and finder in (comfyui.find_host, ldm.find_host):
            continue
        host = finder(model, root) if root is not None else finder(model)
        if host is not None:
            return host
    if root is None and not isinstance(model, nn.Module) and denoiser(model) is None:
        raise TypeError(
            "tomesd: model must be a diffusers pipeline (with .unet or .transformer), a torch.nn.Module holding "
            "transformer blocks, or an LDM-style model with .model.diffusion_model (ComfyUI: .diffusion_model); got "
            f"{type(model).__name__}"
        )
    what = type(model if root is None else root).__name__
    raise ValueError(
        f"tomesd: {what} holds no transformer blocks (diffusers BasicTransformerBlock, "
        "LDM-style BasicTransformerBlock, an SD 3 / Flux transformer, or ComfyUI's Flux) to merge tokens in"
    )


def controlnet_hosts(model) -> List[Host]:
    """Hosts of a pipeline's ControlNets (patch_controlnet=True)."""
    nets = controlnets(model)
    if not nets:
        raise ValueError(f"tomesd: patch_controlnet=True but {type(model).__name__} has no .controlnet")
    hosts = []
    for net in nets:
        try:
            hosts.append(find_host(model, root=net))
        except ValueError as error:
            why = str(error).replace("tomesd: ", "", 1)
            raise ValueError(f"tomesd: patch_controlnet=True, but {type(net).__name__} cannot be patched: {why}") from None
    return hosts


def roots(model) -> List[nn.Module]:
    """The modules a patch of `model` lives on: its denoiser (an LDM wrapper's diffusion_model, a
    pipeline's unet / transformer, or the module itself), then a pipeline's ControlNets."""
    first = ldm.root_of(model) if ldm.is_wrapper(model) else denoiser(model)
    return ([first] if first is not None else []) + controlnets(model)


def wrappers(model) -> List[nn.Module]:
    """model and the modules of its denoiser attributes (compiled wrappers included), for compile checks."""
    return [model] + [getattr(model, name, None) for name in DENOISER_ATTRS + ("controlnet",)]

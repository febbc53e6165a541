"""diffusers hosts: pipelines (anything with `.unet`), UNet2DConditionModel and any module holding
diffusers' BasicTransformerBlock (e.g. Transformer2DModel)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .hooks import Host, top_level


def _root(model) -> Optional[nn.Module]:
    unet = getattr(model, "unet", None)
    if isinstance(unet, nn.Module):
        return unet
    return model if isinstance(model, nn.Module) else None


def find_host(model) -> Optional[Host]:
    """Host for a diffusers pipeline or model, or None if `model` holds no diffusers blocks."""
    try:
        from diffusers.models.attention import BasicTransformerBlock
    except ImportError:
        return None
    root = _root(model)
    if root is None:
        return None
    blocks = [m for m in root.modules() if isinstance(m, BasicTransformerBlock)]
    if not blocks:
        return None
    stages = getattr(root, "down_blocks", None)
    level = top_level(
        stages if isinstance(stages, nn.ModuleList) else (),
        blocks,
        lambda stage: getattr(stage, "downsamplers", None) is not None,
    )
    return Host(
        name="diffusers",
        root=root,
        blocks=blocks,
        top_level=level,
        vae_scale_factor=int(getattr(model, "vae_scale_factor", 8)),
    )

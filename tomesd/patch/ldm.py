"""LDM / CompVis / sd-webui / sgm hosts: models exposing `.model.diffusion_model` (an openaimodel
UNetModel), or such a UNetModel itself. Blocks are recognized by shape, not imported: a module whose
class is named BasicTransformerBlock with attn1/attn2/ff children, called as block(x, context)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .hooks import Host, top_level


def _root(model) -> Optional[nn.Module]:
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if isinstance(inner, nn.Module):
        return inner
    return model if isinstance(model, nn.Module) else None


def is_block(module: nn.Module) -> bool:
    return (
        type(module).__name__ == "BasicTransformerBlock"
        and not type(module).__module__.startswith("diffusers.")
        and isinstance(getattr(module, "attn1", None), nn.Module)
    )


def find_host(model) -> Optional[Host]:
    """Host for an LDM-style model, or None if it holds no LDM-style transformer blocks."""
    root = _root(model)
    if root is None:
        return None
    blocks = [m for m in root.modules() if is_block(m)]
    if not blocks:
        return None
    stages = getattr(root, "input_blocks", None)
    level = top_level(
        stages if isinstance(stages, nn.ModuleList) else (),
        blocks,
        lambda stage: any(type(m).__name__ == "Downsample" for m in stage.modules()),
    )
    return Host(name="ldm", root=root, blocks=blocks, top_level=level,
                sample_names=("x", "sample"), timestep_names=("timesteps", "timestep", "t"))

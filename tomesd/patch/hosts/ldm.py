"""LDM / CompVis / sd-webui / sgm hosts: models exposing `.model.diffusion_model` (an openaimodel
UNetModel) or `.diffusion_model` (ComfyUI's BaseModel), or such a UNetModel itself (ComfyUI's own:
hosts/comfyui.py). Blocks are recognized by shape, not imported: a module with
attn1/attn2/ff children, called as block(x, context), of a class named BasicTransformerBlock or
derived from one (sd-webui hijacks, sgm and ComfyUI subclass it), as tomesd 0.1.3 recognizes them.

CompVis, sgm and ComfyUI blocks run `checkpoint(self._forward, (x, context), ...)` (sd-webui's hijack
calls `torch.utils.checkpoint.checkpoint(self._forward, ...)`): a recompute in backward calls `_forward`
directly, past the module's hooks, so such a block's entry is a wrapper of its `_forward`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..compiled import unwrap_compiled
from ..levels import top_level
from .base import ArgAttention, Host


def _wrapped(model) -> Optional[nn.Module]:
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(inner, nn.Module):
        inner = getattr(model, "diffusion_model", None)
    return inner if isinstance(inner, nn.Module) else None


def is_wrapper(model) -> bool:
    """An LDM-style wrapper: `.model.diffusion_model` is a module (CompVis, sgm, sd-webui), or
    `.diffusion_model` is (ComfyUI's BaseModel, `model_patcher.model`)."""
    return _wrapped(model) is not None


def root_of(model) -> Optional[nn.Module]:
    """The denoiser of an LDM-style model: its `.model.diffusion_model` or `.diffusion_model`, or the
    module itself."""
    inner = _wrapped(model)
    if inner is not None:
        return unwrap_compiled(inner)
    return unwrap_compiled(model) if isinstance(model, nn.Module) else None


def is_block(module: nn.Module) -> bool:
    """A class named BasicTransformerBlock, or a subclass of one, with an attn1 (not diffusers': those
    are the diffusers host's, subclasses included)."""
    mro = type(module).__mro__
    return (
        isinstance(getattr(module, "attn1", None), nn.Module)
        and any(cls.__name__ == "BasicTransformerBlock" for cls in mro)
        and not any(cls.__module__.split(".")[0] == "diffusers" for cls in mro)
    )


@dataclass
class LDMHost(Host):
    """openaimodel UNets: blocks called as block(x, context); attention without an additive bias."""

    def entry(self, block):
        """"_forward" if the block's forward delegates to it (through a checkpoint), else None."""
        return "_forward" if callable(getattr(type(block), "_forward", None)) else None


def find_host(model, kind=LDMHost, attention=None, name: str = "ldm") -> Optional[Host]:
    """Host for an LDM-style model, or None if it holds no LDM-style transformer blocks. A variant of
    these UNets (ComfyUI's) passes its own Host class `kind`, `attention` and `name`."""
    root = root_of(model)
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
    return kind(name=name, root=root, blocks=blocks, top_level=level,
                attention=attention or ArgAttention("context", None), sample_names=("x", "sample"),
                timestep_names=("timesteps", "timestep", "t"))

"""diffusers hosts: pipelines (their `.unet` or `.transformer`, and `.controlnet` on request),
UNet2DConditionModel, video UNets (UNetMotionModel, UNet3DConditionModel), DiT / PixArt
Transformer2DModels, and any module holding diffusers' BasicTransformerBlock.

Temporal transformer blocks (attention across frames: a video UNet's motion modules / temp_attentions,
Latte's temporal_transformer_blocks) see [B·H·W, F, C]: their tokens are frames, not a spatial grid, so
they are left alone and that is logged when patching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from torch import nn

from ..compiled import unwrap_compiled
from ..levels import top_level
from .base import Host
from .sdpa import ProcessorAttention

DENOISER_ATTRS = ("unet", "transformer")
# Modules whose BasicTransformerBlocks attend across frames.
TEMPORAL_CONTAINERS = ("TransformerTemporalModel", "AnimateDiffTransformer3D", "I2VGenXLTransformerTemporalEncoder")
TEMPORAL_LISTS = ("temporal_transformer_blocks",)
TEMPORAL_REASON = ("they attend across frames ([B·H·W, F, C] tokens), not over the spatial grid token merging "
                   "works on")
# diffusers hooks on a sub-layer that only move or cast its weights; any other hook there may return
# outputs computed at another step (pyramid attention broadcast, FasterCache, TaylorSeer, ...).
WEIGHT_ONLY_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading", "layerwise_casting",
                     "peft_autocast_disable")


def denoiser(model) -> Optional[nn.Module]:
    """The pipeline's `.unet` or `.transformer`, or `model` itself if it is a module (a torch.compile
    wrapper stands for the module it holds)."""
    for attr in DENOISER_ATTRS:
        candidate = getattr(model, attr, None)
        if isinstance(candidate, nn.Module):
            return unwrap_compiled(candidate)
    return unwrap_compiled(model) if isinstance(model, nn.Module) else None


def controlnets(model) -> List[nn.Module]:
    """The ControlNet models of a pipeline (each net of a MultiControlNetModel); [] if none."""
    net = getattr(model, "controlnet", None)
    if not isinstance(net, nn.Module):
        return []
    net = unwrap_compiled(net)
    nets = getattr(net, "nets", None)
    return [unwrap_compiled(n) for n in nets] if isinstance(nets, nn.ModuleList) else [net]


def _temporal_blocks(root: nn.Module, block_type) -> set:
    ids = set()
    for module in root.modules():
        if type(module).__name__ in TEMPORAL_CONTAINERS:
            ids.update(id(m) for m in module.modules() if isinstance(m, block_type))
        for name in TEMPORAL_LISTS:
            blocks = getattr(module, name, None)
            if isinstance(blocks, nn.ModuleList):
                ids.update(id(m) for b in blocks for m in b.modules() if isinstance(m, block_type))
    return ids


def _patch_size(root: nn.Module) -> int:
    config = getattr(root, "config", None)
    size = config.get("patch_size") if hasattr(config, "get") else None
    return int(size) if isinstance(size, int) and size > 0 else 1


def vae_scale_factor(model) -> int:
    """Pixels per latent cell: the pipeline's vae_scale_factor, else its VAE's depth, else 8."""
    factor = getattr(model, "vae_scale_factor", None)
    if isinstance(factor, int) and factor > 0:
        return factor
    channels = getattr(getattr(getattr(model, "vae", None), "config", None), "block_out_channels", None)
    return 2 ** (len(channels) - 1) if channels else 8


def cache_hook_refusals(module: nn.Module) -> List[str]:
    """Why merging `module`'s input is wrong ([] if it is not): a diffusers hook on it that may replay outputs.

    Such caches reuse a sub-layer's output across steps and assume a fixed token layout, but each step
    merges different tokens (the partition follows the timestep and the matching follows the input).
    """
    registry = getattr(module, "_diffusers_hook", None)
    hooks = getattr(registry, "hooks", None)
    unsafe = sorted(name for name in hooks or () if name not in WEIGHT_ONLY_HOOKS)
    if not unsafe:
        return []
    return [f"it carries diffusers hook(s) {', '.join(unsafe)}, which may return outputs cached at another "
            "step, whose tokens were merged with another partition"]


def kv_refusal(attn: nn.Module) -> Optional[str]:
    """Why attn cannot take keys/values from merged tokens passed as encoder_hidden_states, or None."""
    processor = type(getattr(attn, "processor", None)).__name__
    if getattr(attn, "fused_projections", False) and "Fused" in processor and not hasattr(attn, "to_kv"):
        return ("its query/key/value projections are fused into one to_qkv (fuse_qkv_projections()), which "
                "cannot take keys and values from other tokens; call unfuse_qkv_projections() first, or use "
                "mode='tokens'")
    if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None:
        return "it normalizes its input inside the processor, which keys and values from merged tokens would skip"
    if getattr(attn, "norm_cross", None):
        return "it would apply its cross-attention norm (norm_cross) to the merged tokens"
    return None


@dataclass
class DiffusersHost(Host):
    """diffusers UNets and transformers built of BasicTransformerBlocks."""

    def sublayer_refusals(self, module):
        return cache_hook_refusals(module)


def find_host(model, root: Optional[nn.Module] = None) -> Optional[Host]:
    """Host for a diffusers pipeline or model (or its `root` module), or None if it holds no diffusers blocks."""
    try:
        from diffusers.models.attention import BasicTransformerBlock
    except ImportError:
        return None
    root = denoiser(model) if root is None else root
    if root is None:
        return None
    found = [m for m in root.modules() if isinstance(m, BasicTransformerBlock)]
    if not found:
        return None
    temporal = _temporal_blocks(root, BasicTransformerBlock)
    blocks = [m for m in found if id(m) not in temporal]
    if not blocks:
        raise ValueError(f"tomesd: every transformer block of {type(root).__name__} is temporal: {TEMPORAL_REASON}; "
                         "there is nothing to merge")
    stages = getattr(root, "down_blocks", None)
    level = top_level(
        stages if isinstance(stages, nn.ModuleList) else (),
        blocks,
        lambda stage: getattr(stage, "downsamplers", None) is not None,
    )
    return DiffusersHost(
        name="diffusers",
        root=root,
        blocks=blocks,
        top_level=level,
        attention=ProcessorAttention("encoder_hidden_states", "attention_mask", kv_refusal=kv_refusal),
        vae_scale_factor=vae_scale_factor(model),
        patch_size=_patch_size(root),
        excluded=tuple((m, TEMPORAL_REASON) for m in found if id(m) in temporal),
    )

"""ComfyUI's Flux (`comfy.ldm.flux.model.Flux`): double-stream blocks (image and text apart, one joint
attention), then single-stream blocks on the joint sequence [text, image]. Every block runs at the full
token grid of 2×2 latent patches (one level); reference latents (`ref_latents`, Kontext) follow the
image's tokens and pass through unmerged.

Its attention is no module: a block computes q, k, v itself and calls comfy.ldm.flux.math.attention,
which applies the rotary embedding (`pe`) and then ComfyUI's attention function of the session
(PyTorch's SDPA, or its sub-quadratic / split / einsum attention (a CPU's default), xformers, sage,
flash). So torch's SDPA is not always called (sdpa.py's `Joint` would act on nothing); instead kv mode
acts through ComfyUI's own seam, `transformer_options["optimized_attention_override"]`, which each of
those functions calls with its q, k, v after the rotary embedding: the block's call gets a copy of its
transformer_options whose override merges the image part of the keys and values (the last tokens) and
adds prop_attn's log-size bias as an additive float `mask`, then calls an override already there, or
the attention function. The block itself is the "self" sub-layer (Host.sublayer_module). Rotary
positions rule tokens mode out here (diffusers' Flux merges tokens at their anchors' positions); there is no separate feed-forward to merge.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ... import ops
from ...matching import MergePlan
from ..args import arg_position, get_arg, set_arg
from .base import Attention, Host, Sublayer
from .sdpa import merge_heads

OVERRIDE = "optimized_attention_override"
TOKENS_REFUSAL = ("ComfyUI's Flux applies rotary position embeddings per token inside its blocks, where merged "
                  "tokens cannot take their anchors' positions (tokens mode runs on diffusers' "
                  "FluxTransformer2DModel); use mode='kv' (or merge_attn=False)")
FLUX_MATH = "comfy.ldm.flux.math"
SUBLAYERS = (Sublayer("attention", "self"),)
NO_OVERRIDE = ("ComfyUI's attention function here takes no transformer_options['optimized_attention_override'] "
               "(ComfyUI older than the one that added it, or an attention function replaced by a custom node), "
               "so keys/values cannot be merged inside Flux's attention; update ComfyUI")


def is_flux(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__name__ == "Flux" and kind.__module__ == "comfy.ldm.flux.model"


def overridable() -> bool:
    """ComfyUI's Flux attention function honours optimized_attention_override (it is wrapped by wrap_attn)."""
    math_module = sys.modules.get(FLUX_MATH)
    return getattr(getattr(math_module, "optimized_attention", None), "__wrapped__", None) is not None


class MergedKV:
    """An optimized_attention_override for one block call: the image keys/values (the last plan.num_in
    tokens) merged (merge_kv) and / or biased by log size (bias), then the previous override or the
    attention function itself. ComfyUI calls it as override(func, q, k, v, heads, ..., **kwargs), with
    q, k, v [B, H, S, D] (skip_reshape=True) or [B, S, H·D]."""

    def __init__(self, plan: MergePlan, merge_kv: bool, bias: bool, previous=None):
        self.plan, self.merge_kv, self.bias, self.previous = plan, merge_kv, bias, previous

    def __call__(self, func, q: Tensor, k: Tensor, v: Tensor, heads: int, *rest, **kwargs):
        if (rest[0] if rest else kwargs.get("mask")) is not None:
            raise RuntimeError("tomesd: Flux's attention was given a mask, which tomesd cannot merge with; blocks "
                               "called with attn_mask are not merged")
        rest = rest[1:]
        per_head = bool(kwargs.get("skip_reshape", False))
        plan, axis = self.plan, 2 if per_head else 1
        n = plan.num_in if self.merge_kv else plan.num_out
        S = k.shape[axis]
        if self.merge_kv:
            merge = merge_heads if per_head else ops.merge
            k = torch.cat([k.narrow(axis, 0, S - n), merge(k.narrow(axis, S - n, n), plan)], dim=axis)
            v = torch.cat([v.narrow(axis, 0, S - n), merge(v.narrow(axis, S - n, n), plan)], dim=axis)
        if self.bias:
            size = plan.counts.to(torch.float32).log()
            log_size = torch.cat([size.new_zeros(q.shape[0], k.shape[axis] - size.shape[1]), size], dim=1)
            kwargs["mask"] = log_size[:, None, :].to(q.dtype)  # [B, 1, S']: every head and query alike
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, *rest, **kwargs)
        return func(q, k, v, heads, *rest, **kwargs)


class FluxAttention(Attention):
    """kv mode and prop_attn inside ComfyUI's Flux attention, through optimized_attention_override."""

    kv_inside = True

    def masked(self, kwargs):
        return kwargs.get("attn_mask") is not None

    def refusals(self, host, config):
        if (config.mode == "kv" or config.prop_attn) and config.merge_attn and not overridable():
            return [NO_OVERRIDE]
        return []

    def prepare(self, call, args, kwargs, plan, merge_kv, bias):
        if not (merge_kv or bias):
            return args, kwargs
        if not overridable():
            call.warn("no-override", f"tomesd: {NO_OVERRIDE}; Flux is not merged")
            return args, kwargs
        options, where = get_arg(args, kwargs, ("transformer_options",),
                                 arg_position(call.module, ("transformer_options",), None))
        options = dict(options) if isinstance(options, dict) else {}
        options[OVERRIDE] = MergedKV(plan, merge_kv, bias, options.get(OVERRIDE))
        return set_arg(args, kwargs, where if where is not None else "transformer_options", options)


@dataclass
class ComfyFluxHost(Host):
    """ComfyUI's Flux: the latent x [B, C, H, W] padded to whole 2×2 patches; `doubles` double-stream blocks
    first, whose input is the image (and reference) tokens, then single-stream blocks on [text, image]."""

    doubles: int = 0
    refs_pos: Optional[int] = None

    def sublayer_module(self, block, spec):
        return block

    def image_tokens(self, index, x, n):
        return x[:, x.shape[1] - n:] if index >= self.doubles and x.shape[1] > n else x

    def locate(self, args, kwargs):
        """(H, W, head, tail): the latent padded to whole patches, no tokens before its grid, and the tokens
        of the reference latents after it."""
        x, _ = get_arg(args, kwargs, self.sample_names, 0)
        refs, _ = get_arg(args, kwargs, ("ref_latents",), self.refs_pos)
        p = self.patch_size
        tail = sum(math.ceil(ref.shape[-2] / p) * math.ceil(ref.shape[-1] / p) for ref in refs or ())
        return p * math.ceil(x.shape[-2] / p), p * math.ceil(x.shape[-1] / p), 0, tail


def flux_host(root: nn.Module) -> ComfyFluxHost:
    """Host for ComfyUI's Flux module `root`."""
    doubles, singles = list(root.double_blocks), list(root.single_blocks)
    return ComfyFluxHost(name="comfyui-flux", root=root, blocks=doubles + singles, top_level=1,
                         attention=FluxAttention(), patch_size=int(root.patch_size), sample_names=("x",),
                         timestep_names=("timestep",), input_names=("img", "x"), sublayers=SUBLAYERS,
                         mode_refusals={"tokens": TOKENS_REFUSAL}, default_mode="kv", timestep_scale=1000.0,
                         doubles=len(doubles), refs_pos=arg_position(root, ("ref_latents",), None))

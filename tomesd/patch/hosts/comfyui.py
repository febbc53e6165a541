"""ComfyUI hosts: its UNets (SD 1.x / 2.x / XL: `comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`)
and Flux (hosts/comfyui_flux.py), given as the diffusion model or as the BaseModel holding it
(`model_patcher.model`). Nothing here imports ComfyUI: its classes are recognized by module and name.

A ModelPatcher is refused: its clones share one BaseModel, so hooks put on it would merge in every
clone. The custom node (comfyui/tomesd_nodes) attaches to a clone instead, for the length of its
sampling runs.

ComfyUI's attention (`comfy.ldm.modules.attention.CrossAttention`) is called as
attn1(x, context=None, value=None, mask=None, transformer_options): keys come from `context`, values
from `value` (else `context`), both x when absent, and `mask` is added to the logits as floats, so
prop_attn's log-size bias goes in as `mask` (exact on duplicate tokens). Its BasicTransformerBlock gives
attn1 a context and a value only after `transformer_options["patches"]["attn1_patch"]` functions ran
(or in blocks whose attn1 attends to the text):
- keys / values the patches left as attn1's own tokens, or made token by token from them (same batch and
  token count as its input, e.g. a hypernetwork's), are merged with the same plan (both modes);
- other keys / values (more tokens, e.g. a reference image's; the text) are left as given: tokens mode
  merges the queries only there, without prop_attn, and kv mode does not merge that block (both said).
An attn1 replace patch (`patches_replace["attn1"]`) runs attn1's projections itself, past tomesd's
hooks, so blocks it replaces are not merged, with a warning.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ... import ops
from ..args import get_arg, set_arg
from . import comfyui_flux, ldm
from .base import ArgAttention, Host, size_bias

PATCHER_REFUSAL = (
    "tomesd: apply_patch was given a ComfyUI ModelPatcher, whose clones share one diffusion model: hooks put on it "
    "would merge tokens in every clone, the unpatched ones too. In ComfyUI use the 'Token Merging' node "
    "(comfyui/tomesd_nodes, README 'ComfyUI'), which patches a clone for the length of its sampling; in a script, "
    "patch a model of your own (apply_patch(model_patcher.model) changes every clone of it)"
)
REPLACED = ("ComfyUI replaces their attn1 (transformer_options['patches_replace']['attn1'], e.g. Self-Attention "
            "Guidance's): the replacement runs attn1's projections itself, past tomesd's hooks")


def from_comfy(obj) -> bool:
    """obj's class, or one it derives from, is defined in ComfyUI's `comfy` package."""
    return any(cls.__module__.split(".")[0] == "comfy" for cls in type(obj).__mro__)


def is_model_patcher(model) -> bool:
    return any(cls.__name__ == "ModelPatcher" and cls.__module__.split(".")[0] == "comfy"
               for cls in type(model).__mro__)


def _takes_value_and_mask(attn) -> bool:
    try:
        params = inspect.signature(type(attn).forward).parameters
    except (TypeError, ValueError):
        return False
    return {"context", "value", "mask"} <= set(params)


class ComfyAttention(ArgAttention):
    """ComfyUI's CrossAttention as attn1 (see the module docstring): keys/values from `context` and
    `value`, prop_attn's bias as the additive float `mask`."""

    def __init__(self):
        super().__init__("context", "mask")

    def prepare(self, call, args, kwargs, plan, merge_kv, bias):
        context, cwhere = get_arg(call.args, call.kwargs, ("context",), 1)
        value, vwhere = get_arg(call.args, call.kwargs, ("value",), 2)
        given = [(t, where) for t, where in ((context, cwhere), (value, vwhere)) if t is not None]
        if not given:
            return super().prepare(call, args, kwargs, plan, merge_kv, bias)
        if not all(t is call.x or tuple(t.shape[:2]) == tuple(call.x.shape[:2]) for t, _ in given):
            return self._foreign(call, args, kwargs, merge_kv, bias)
        merged = {}  # keys / values made token by token from attn1's input: merged alike (each tensor once)
        for t, where in given:
            if id(t) not in merged:
                merged[id(t)] = ops.merge(t, plan)
            args, kwargs = set_arg(args, kwargs, where, merged[id(t)])
        if bias:
            kwargs = dict(kwargs, mask=size_bias(plan, call.x.dtype))
        return args, kwargs

    @staticmethod
    def _foreign(call, args, kwargs, merge_kv, bias):
        """attn1 given keys/values of other tokens than its own: tokens an attn1_patch added, or the text."""
        options = call.kwargs.get("transformer_options")
        patched = isinstance(options, dict) and bool((options.get("patches") or {}).get("attn1_patch"))
        why = ("an attn1_patch gives attn1 keys/values of other tokens than its own (e.g. a reference image's)"
               if patched else "attn1 attends to the text (only_cross_attention)")
        if merge_kv:
            call.warn(f"kv-foreign-{patched}", f"tomesd: mode='kv' does not merge blocks where {why}")
            return call.args, call.kwargs
        if patched or bias:
            call.warn(f"tokens-foreign-{patched}-{bias}", f"tomesd: in blocks where {why}, the queries merge and the "
                      "keys/values are left as given" + (", without prop_attn" if bias else ""))
        return args, kwargs


@dataclass
class ComfyUNetHost(ldm.LDMHost):
    """ComfyUI's UNets: blocks called as block(x, context, transformer_options)."""

    def call_refusal(self, block, args, kwargs):
        options, _ = get_arg(args, kwargs, ("transformer_options",), 2)
        options = options if isinstance(options, dict) else {}
        replace = (options.get("patches_replace") or {}).get("attn1") or {}
        if not replace:
            return None
        where = options.get("block")
        key = (where[0], where[1], options.get("block_index", 0)) if where else None
        return REPLACED if key in replace or where in replace else None


def find_host(model, root: Optional[nn.Module] = None) -> Optional[Host]:
    """Host for a ComfyUI UNet or Flux (or the BaseModel holding one); TypeError for a ModelPatcher; None
    for anything else."""
    if root is not None:
        return None
    if is_model_patcher(model):
        raise TypeError(PATCHER_REFUSAL)
    denoiser = ldm.root_of(model)
    if denoiser is None:
        return None
    if comfyui_flux.is_flux(denoiser):
        return comfyui_flux.flux_host(denoiser)
    blocks = [m for m in denoiser.modules() if ldm.is_block(m)]
    if not blocks or not all(from_comfy(b) and _takes_value_and_mask(b.attn1) for b in blocks):
        return None
    return ldm.find_host(model, kind=ComfyUNetHost, attention=ComfyAttention(), name="comfyui")

"""Acting inside an attention processor's torch SDPA call (diffusers `Attention` modules).

kv mode on joint attentions (MMDiT) and prop_attn's head-channel form need the queries, keys and values
after every projection, norm and rotary embedding the processor applies. The attention's processor is
wrapped when patching (tomesd.patch.wrappers.ProcessorWrapper); a sub-layer's pre-hook leaves a `Joint`
(a TorchFunctionMode) in the sub-layer's slot of the current call (SublayerCall.leave), and the wrapped
processor takes it and runs inside it, where the first F.scaled_dot_product_attention call becomes
`joint_attention`: image keys / values merged (kv mode)
and / or biased by log size (prop_attn, in the form tomesd.prop_attention.choose_form gives the device).

- JointAttention: MMDiT joint attention (image and text in one SDPA call, the image part first or last).
- ProcessorAttention: diffusers UNet / DiT self-attention (ArgAttention: kv through
  encoder_hidden_states, prop_attn as attention_mask) that takes prop_attn's bias as one extra head
  channel inside the SDPA call where choose_form says "channel" (CUDA: a float mask keeps SDPA off its
  flash kernels) and the processor is torch's SDPA processor.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ... import ops
from ... import prop_attention as pa
from ...matching import MergePlan
from ..wrappers import ProcessorWrapper, own_processor
from .base import ArgAttention, Attention, Take

SDPA_PROCESSORS = ("AttnProcessor2_0",)  # diffusers processors that call F.scaled_dot_product_attention once


def merge_heads(t: Tensor, plan: MergePlan) -> Tensor:
    """Merge keys or values laid out per head: [B, H, N, D] → [B, H, M, D]."""
    B, H, N, D = t.shape
    merged = ops.merge(t.transpose(1, 2).reshape(B, N, H * D), plan)
    return merged.view(B, plan.num_out, H, D).transpose(1, 2)


def joint_attention(sdpa, q: Tensor, k: Tensor, v: Tensor, plan: MergePlan, merge_kv: bool, bias: bool,
                    image_first: bool, *rest, **kwargs) -> Tensor:
    """A joint attention `sdpa(q, k, v, mask, ...)` ([B, H, S, D] queries, keys, values) whose image keys
    and values are merged (merge_kv: kv mode) and / or biased by log size (bias: prop_attn). The image
    part is the first or last `plan.num_in` (kv mode) or `plan.num_out` (tokens mode: already merged)
    positions of the keys (all of them in a self-attention); queries are untouched. The bias is an
    additive mask or an extra head channel (tomesd.prop_attention, the form chosen per device)."""
    S = k.shape[2]
    n = plan.num_in if merge_kv else plan.num_out
    image = slice(0, n) if image_first else slice(S - n, S)
    text = slice(n, S) if image_first else slice(0, S - n)
    if merge_kv:
        parts = [merge_heads(k[:, :, image], plan), k[:, :, text]]
        vparts = [merge_heads(v[:, :, image], plan), v[:, :, text]]
        if not image_first:
            parts, vparts = parts[::-1], vparts[::-1]
        k, v = torch.cat(parts, dim=2), torch.cat(vparts, dim=2)
    if not bias:
        return sdpa(q, k, v, None, *rest, **kwargs)
    size = plan.counts.to(torch.float32).log()
    zeros = size.new_zeros(q.shape[0], S - n)
    log_size = torch.cat([size, zeros] if image_first else [zeros, size], dim=1)
    kwargs.update(zip(("dropout_p", "is_causal", "scale"), rest))  # SDPA's positional arguments after the mask
    return pa.prop_attention(q, k, v, log_size, kwargs.pop("scale", None), pa.choose_form(q.device), sdpa, **kwargs)


class Joint(TorchFunctionMode):
    """Open for one attention processor call: its first F.scaled_dot_product_attention call runs as
    `joint_attention`, after every projection, norm and rotary embedding the processor applied."""

    def __init__(self, plan: MergePlan, merge_kv: bool, bias: bool, image_first: bool):
        super().__init__()
        self.plan, self.merge_kv, self.bias, self.image_first = plan, merge_kv, bias, image_first
        self.used = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention or self.used:
            if getattr(func, "__name__", None) and getattr(Tensor, func.__name__, None) is func and args:
                # a Tensor method: called as one (dynamo traces x.unflatten(...), not Tensor.unflatten's body)
                return getattr(args[0], func.__name__)(*args[1:], **kwargs)
            return func(*args, **kwargs)
        self.used = True
        names = ("query", "key", "value", "attn_mask")
        values = dict(zip(names, args))
        values.update({n: kwargs.pop(n) for n in names if n in kwargs})
        if values.get("attn_mask") is not None:
            raise RuntimeError("tomesd: mode='kv' / prop_attn on a joint attention that is given an attention "
                               "mask is not supported")
        return joint_attention(func, values["query"], values["key"], values["value"], self.plan, self.merge_kv,
                               self.bias, self.image_first, *args[len(names):], **kwargs)


def sdpa_forward(take: Take, name: str, original, args: tuple, kwargs: dict):
    """A wrapped processor's call, inside its Joint context when the sub-layer's pre-hook left one."""
    taken = take(name)
    if taken is None:
        return original(*args, **kwargs)
    joint, index = taken
    with joint:
        out = original(*args, **kwargs)
    if not joint.used:
        raise RuntimeError(f"tomesd: {name} of transformer block {index} did not call torch's "
                           "scaled_dot_product_attention, so its keys/values cannot be merged or biased there "
                           "(mode='kv' / prop_attn on MMDiT models need the native attention backend)")
    return out


class JointAttention(Attention):
    """A joint attention (image and text tokens in one SDPA call, the image part first or last):
    kv mode and prop_attn act inside that call, through a Joint opened around the attention's processor
    (wrapped when patching). Only this patch's own live wrapper takes it: any other processor set after
    patching (another one, a wrapper of another patch, or a wrapper of an earlier patch saved from
    `attn_processors` and set back, e.g. by unfuse_qkv_projections) is said and left unmerged there."""

    kv_inside = True

    def __init__(self, image_first: bool):
        self.image_first = image_first

    def refusal(self, call, merge_kv, bias):
        if (merge_kv or bias) and not own_processor(call.module, call.owner):
            return (f"the attention processor of {call.name} was replaced after patching (set_attn_processor, "
                    "unfuse_qkv_projections, or processors saved from a patched model and set back), so "
                    "mode='kv' / prop_attn cannot act inside it; apply_patch again after setting processors")
        return None

    def prepare(self, call, args, kwargs, plan, merge_kv, bias):
        if merge_kv or bias:
            call.leave(Joint(plan, merge_kv=merge_kv, bias=bias, image_first=self.image_first))
        return args, kwargs

    def wrap(self, name, module, take, bias, owner=None):
        return ProcessorWrapper.wrap(module, partial(sdpa_forward, take, name), owner)


class ProcessorAttention(ArgAttention):
    """diffusers' Attention as a self-attention sub-layer (UNets, DiT / PixArt blocks): ArgAttention's
    keys / values source and additive mask, and prop_attn's head-channel form on devices where
    tomesd.prop_attention.choose_form gives "channel", when the processor is torch's SDPA one
    (SDPA_PROCESSORS; wrapped when patching with prop_attn) and still this patch's own wrapper. Elsewhere —
    another processor, any processor set after patching (a wrapper of another or an earlier patch too), a
    CPU — the bias goes in as the attention_mask, as before."""

    def wrap(self, name, module, take, bias, owner=None):
        kind = type(getattr(module, "processor", None))
        sdpa_processor = kind.__name__ in SDPA_PROCESSORS and kind.__module__.startswith("diffusers.")
        if not (bias and sdpa_processor):  # exactly diffusers' class: a look-alike may not call SDPA once
            return None
        return ProcessorWrapper.wrap(module, partial(sdpa_forward, take, name), owner)

    def prepare(self, call, args, kwargs, plan, merge_kv, bias):
        if (bias and (merge_kv or not self._has_kv_source(call))
                and own_processor(call.module, call.owner)
                and pa.choose_form(call.x.device) == "channel"):
            args, kwargs = super().prepare(call, args, kwargs, plan, merge_kv, False)
            call.leave(Joint(plan, merge_kv=False, bias=True, image_first=True))
            return args, kwargs
        return super().prepare(call, args, kwargs, plan, merge_kv, bias)

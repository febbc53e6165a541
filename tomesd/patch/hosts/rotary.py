"""Rotary positions of merged tokens (Flux in tokens mode).

Flux rotates every query and key by its token's position (diffusers' `apply_rotary_emb` with the
transformer's `image_rotary_emb` = (cos, sin), each [S_txt + N, D], text rows first). A merged token
takes the position of its row's anchor (MergePlan.anchor: its dst, or the unmerged src itself; local
matching keeps the merged tokens close to it). The anchors differ between batch rows (each row is
matched on its own), and diffusers' `apply_rotary_emb` broadcasts one [S, D] table over the batch, so
the attention is called without positions (`image_rotary_emb=None`) and a RotaryJoint applies them at
its SDPA call, with the rows' tables gathered from the call's own table ([B, S_txt + M, D]), through
diffusers' `apply_rotary_emb` one batch row at a time (the same arithmetic on the same values: a plan
that merges nothing gives the unpatched attention bit for bit). prop_attn's log-size bias is added at
the same call (sdpa.Joint).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...matching import MergePlan
from ..args import get_arg, set_arg
from ..wrappers import own_processor
from .sdpa import Joint, JointAttention

ROTARY_NAMES = ("image_rotary_emb",)


def gather_rows(table: Tensor, plan: MergePlan) -> Tensor:
    """A rotary table [S_txt + N, D] (text rows first, then the plan's N input tokens) → [B, S_txt + M, D]:
    the text rows, then each output row's anchor's row."""
    text = table.shape[0] - plan.num_in
    if text < 0 or plan.anchor is None:
        raise RuntimeError(f"tomesd: a rotary table of {table.shape[0]} rows cannot hold the positions of "
                           f"{plan.num_in} image tokens (or the plan carries no anchors)")
    B = plan.anchor.shape[0]
    rows = torch.cat([torch.arange(text, device=table.device).expand(B, text), plan.anchor.to(table.device) + text], 1)
    return table[rows]


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, S, D] rotated by per-batch-row tables cos, sin [B, S, D], through diffusers'
    apply_rotary_emb (one table per call) row by row."""
    from diffusers.models.embeddings import apply_rotary_emb

    rows = [apply_rotary_emb(x[b : b + 1], (cos[b], sin[b]), sequence_dim=2) for b in range(x.shape[0])]
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


class RotaryJoint(Joint):
    """A Joint (sdpa.py) whose SDPA call first rotates the queries and keys ([B, H, S_txt + M, D]) by
    the per-row tables cos, sin [B, S_txt + M, D]; then prop_attn's bias, if asked."""

    def __init__(self, plan: MergePlan, bias: bool, image_first: bool, cos: Tensor, sin: Tensor):
        super().__init__(plan, merge_kv=False, bias=bias, image_first=image_first)
        self.cos, self.sin = cos, sin

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and not self.used:
            kwargs = dict(kwargs or {})
            q, where_q = get_arg(args, kwargs, ("query",), 0)
            k, where_k = get_arg(args, kwargs, ("key",), 1)
            args, kwargs = set_arg(args, kwargs, where_q, rotate(q, self.cos, self.sin))
            args, kwargs = set_arg(args, kwargs, where_k, rotate(k, self.cos, self.sin))
        return super().__torch_function__(func, types, args, kwargs)


class RotaryJointAttention(JointAttention):
    """A joint attention that applies rotary positions itself (Flux): kv mode and prop_attn as
    JointAttention; in tokens mode its (merged) call gets no positions and a RotaryJoint applies the
    anchors' positions at its SDPA call.

    inner: the attention sub-module of a whole block (Sublayer kind "block"), whose processor the block's
    RotaryJoint is left for. rotary_at: Sublayer kind → position of the rotary argument in the forward of
    that kind's module (None: passed by keyword only); the block's is read when a checkpoint calls it
    positionally."""

    moves_positions = True

    def __init__(self, image_first: bool, inner: str = "attn", rotary_at: Optional[Dict[str, Optional[int]]] = None):
        super().__init__(image_first)
        self.inner = inner
        self.rotary_at = dict(rotary_at or {})

    def _attention_of(self, call):
        return call.module if call.kind == "self" else getattr(call.module, self.inner, None)

    def tokens_refusal(self, call):
        if not own_processor(self._attention_of(call), call.owner):
            return (f"the attention processor of {call.name if call.kind == 'self' else self.inner} was replaced "
                    "after patching (set_attn_processor, unfuse_qkv_projections, or processors saved from a "
                    "patched model and set back), so merged tokens would lose their rotary positions; "
                    "apply_patch again after setting processors")
        return None

    def refusal(self, call, merge_kv, bias):
        if (merge_kv or bias) and not own_processor(self._attention_of(call), call.owner):
            return self.tokens_refusal(call)
        return None

    def prepare(self, call, args, kwargs, plan, merge_kv, bias):
        if merge_kv:
            return super().prepare(call, args, kwargs, plan, merge_kv, bias)
        rotary, where = get_arg(args, kwargs, ROTARY_NAMES, self.rotary_at.get(call.kind))
        if rotary is None and not bias:  # a call without positions: nothing to do inside the attention
            return args, kwargs
        if rotary is None:
            joint = Joint(plan, merge_kv=False, bias=True, image_first=self.image_first)
        else:
            cos, sin = _tables(rotary)
            joint = RotaryJoint(plan, bias, self.image_first, gather_rows(cos, plan), gather_rows(sin, plan))
            args, kwargs = set_arg(args, kwargs, where, None)
        call.leave(joint, None if call.kind == "self" else self.inner)
        return args, kwargs


def _tables(rotary) -> Tuple[Tensor, Tensor]:
    if isinstance(rotary, (tuple, list)) and len(rotary) == 2:
        return rotary[0], rotary[1]
    raise RuntimeError("tomesd: tokens mode on this model needs rotary embeddings as a (cos, sin) pair of "
                       f"[S, D] tables; got {type(rotary).__name__}")

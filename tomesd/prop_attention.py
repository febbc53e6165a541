"""Proportional attention (prop_attn) in two equal forms: an additive mask or one extra head channel.

A key standing for s merged tokens gets + log s on its logits. Given as an additive float mask
(scaled_dot_product_attention's attn_mask), PyTorch's SDPA cannot use its flash kernels on GPUs. The
same logits come from one more head channel, which keeps them: q' = [q, 1], k' = [k, log s / scale],
v' = [v, 0], zero-padded to a multiple of CHANNEL_MULTIPLE (what the fused kernels want), and SDPA is
called with the original scale passed explicitly: scale · q'·k' = scale · q·k + log s. The output is
the first Dv channels.

Nothing here imports diffusers; hosts call `prop_attention` where they hold q, k and v.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

FORMS = ("mask", "channel")
CHANNEL_MULTIPLE = 8  # head dims the flash / memory-efficient SDPA kernels take: multiples of 8


def choose_form(device) -> str:
    """The form prop_attention uses on `device`: "channel" on CUDA (it keeps SDPA's flash kernels; not
    measured yet on a GPU), "mask" elsewhere (on a CPU the mask form is the faster: see
    tests/test_prop_attention.py and README)."""
    return "channel" if torch.device(device).type == "cuda" else "mask"


def prop_attention(q: Tensor, k: Tensor, v: Tensor, log_size: Tensor, scale: Optional[float] = None,
                   form: str = "mask", sdpa=F.scaled_dot_product_attention, **kwargs) -> Tensor:
    """SDPA with + log_size[b, j] on the logits of key j.

    q: [B, H, Sq, D]; k: [B, Hk, Sk, D]; v: [B, Hk, Sk, Dv]; log_size: [B, Sk] (0 for a key standing for
    one token). scale: the logits' scale, None for 1 / sqrt(D). form: "mask" (an additive attn_mask
    [B, 1, 1, Sk]) or "channel" (one extra head channel, see the module docstring); both give the same
    result up to float rounding. sdpa: the attention function (F.scaled_dot_product_attention's
    signature); kwargs (dropout_p, is_causal, enable_gqa) are passed on. Returns [B, H, Sq, Dv].
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if "attn_mask" in kwargs:
        raise ValueError("prop_attention adds its own bias; combine other masks before calling it")
    D, Dv = q.shape[-1], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if form == "mask":
        mask = log_size[:, None, None, :].to(q.dtype)
        return sdpa(q, k, v, attn_mask=mask, scale=scale, **kwargs)
    width = -(-max(D + 1, Dv) // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
    q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
    extra = (log_size.float() / scale).to(k.dtype)[:, None, :, None].expand(-1, k.shape[1], -1, 1)
    k = torch.cat([k, extra], dim=-1)
    q, k = F.pad(q, (0, width - D - 1)), F.pad(k, (0, width - D - 1))
    out = sdpa(q, k, F.pad(v, (0, width - Dv)), scale=scale, **kwargs)
    return out[..., :Dv]

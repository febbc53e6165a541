"""What the CUDA kernel tests share: dtypes, score tolerances, random cases on the GPU, malformed
partitions, and a patched fp16 UNet on the GPU."""
from __future__ import annotations

import torch

import tiny
import tomesd
from tomesd import matching

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SCORE_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-3, torch.float32: 1e-5}


def case(B, h, w, C, sx, sy, dtype, seed, ratio=0.5):
    g = torch.Generator(device="cuda").manual_seed(seed)
    key = torch.tensor(seed * 7919 % 2**32)
    dst, src = matching.partition(h, w, sx, sy, key, "cuda")
    metric = torch.randn(B, h * w, C, device="cuda", generator=g).to(dtype)
    r = max(1, min(int(h * w * ratio), len(src)))
    return metric, dst, src, r


def malformed(kind, dst, src, N):
    return {"repeated src": (dst, torch.cat([src[:1], src])),
            "out of range": (dst, torch.cat([src[:-1], src.new_tensor([N + 1000])])),
            "negative": (dst, torch.cat([src.new_tensor([-5]), src[1:]])),
            "dst also src": (dst, torch.cat([src[:-1], dst[:1]]))}[kind]


def patched_unet(dtype=torch.float16):
    unet = tiny.unet("sd1").to("cuda", dtype)
    tomesd.apply_patch(unet, ratio=0.5, seed=1)
    args, kwargs = tiny.unet_inputs("sd1", dtype=dtype)
    args = tuple(a.to("cuda") for a in args)
    kwargs = {k: v.to("cuda") for k, v in kwargs.items()}
    return unet, args, kwargs

"""What prop_attn costs: SD 1.5's top-level self-attention with and without the float bias, CPU or GPU.

prop_attn=True gives each merged key + log(size) on its logits: diffusers passes it to
F.scaled_dot_product_attention as a float attn_mask [B, heads, 1, M], which may move SDPA off its
fastest kernel. This times, at SD 1.5's top level (C=320, 8 heads of 40, batch 2) for image sides
--resolutions and --ratios (M = N − int(N·ratio) merged tokens):
- attn1: diffusers' Attention (AttnProcessor2_0, projections included) as each mode calls it —
  tokens (M queries, M keys) and kv (N queries, M keys), each without and with the bias (prop_attn);
- sdpa: F.scaled_dot_product_attention alone on the same shapes, with and without the mask, and the
  bias as one extra head channel (tomesd.prop_attention's "channel" form, what CUDA uses: it keeps
  SDPA's flash kernels); "channel cost" is that form's cost over no bias.
Medians over --reps, the variants interleaved round by round; writes JSON with --out.

    python benchmarks/bench_prop_attn.py --resolutions 512,768 --ratios 0.3,0.5,0.7
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tomesd.prop_attention import prop_attention  # noqa: E402


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1000.0


def cases(resolution: int, ratio: float, device: str, dtype):
    """name → zero-argument callable, for one (resolution, ratio)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    B, heads, head_dim = 2, 8, 40
    C = heads * head_dim
    N = (resolution // 8) ** 2
    M = N - int(N * ratio)
    attn = Attention(query_dim=C, heads=heads, dim_head=head_dim).to(device, dtype).eval()
    attn.set_processor(AttnProcessor2_0())
    x = torch.randn(B, N, C, device=device, dtype=dtype)
    merged = torch.randn(B, M, C, device=device, dtype=dtype)
    bias = torch.rand(B, 1, M, device=device).mul(3).log1p().to(dtype)  # log of merged-token sizes, ~[0, 1.4]
    q = torch.randn(B, heads, N, head_dim, device=device, dtype=dtype)
    k = torch.randn(B, heads, M, head_dim, device=device, dtype=dtype)
    mask = bias[:, None].expand(B, heads, 1, M)
    log_size = bias[:, 0].float()
    return {
        "attn1 tokens": lambda: attn(merged),
        "attn1 tokens+bias": lambda: attn(merged, attention_mask=bias),
        "attn1 kv": lambda: attn(x, encoder_hidden_states=merged),
        "attn1 kv+bias": lambda: attn(x, encoder_hidden_states=merged, attention_mask=bias),
        "sdpa kv": lambda: F.scaled_dot_product_attention(q, k, k),
        "sdpa kv+mask": lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask),
        "sdpa kv+channel": lambda: prop_attention(q, k, k, log_size, form="channel"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", default="512,768")
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default fp16 on a GPU, fp32 on a CPU")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")]
    sync = (lambda: torch.cuda.synchronize(args.device)) if args.device.startswith("cuda") else (lambda: None)
    rows = []
    with torch.inference_mode():
        for resolution in (int(v) for v in args.resolutions.split(",")):
            for ratio in (float(v) for v in args.ratios.split(",")):
                fns = cases(resolution, ratio, args.device, dtype)
                for fn in fns.values():  # warm-up
                    fn()
                times = {name: [] for name in fns}
                for _ in range(args.reps):
                    for name, fn in fns.items():
                        times[name].append(timed(fn, sync))
                ms = {name: statistics.median(t) for name, t in times.items()}
                row = dict(resolution=resolution, ratio=ratio, ms=ms,
                           tokens_bias_cost=ms["attn1 tokens+bias"] / ms["attn1 tokens"] - 1,
                           kv_bias_cost=ms["attn1 kv+bias"] / ms["attn1 kv"] - 1,
                           sdpa_mask_cost=ms["sdpa kv+mask"] / ms["sdpa kv"] - 1,
                           sdpa_channel_cost=ms["sdpa kv+channel"] / ms["sdpa kv"] - 1)
                rows.append(row)
                print(f"{resolution} px ratio {ratio:g}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
                      + f"; bias costs attn1 tokens {row['tokens_bias_cost']:+.1%}, attn1 kv {row['kv_bias_cost']:+.1%}, "
                      f"sdpa {row['sdpa_mask_cost']:+.1%}, channel {row['sdpa_channel_cost']:+.1%}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=args.device, dtype=str(dtype), threads=torch.get_num_threads(),
                           torch=torch.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()

"""Per-step speed-up of tomesd's modes and plan options on SD 1.5, resolved on a shared CPU.

Every setting (mode, prop_attn, share_plan, plan_every, ratio) changes only the level-1 transformer
blocks: SD 1.5's five Transformer2DModels at the latent's full resolution (2 down, 3 up). The rest of
the UNet step is the same work whatever the setting. On a shared CPU a whole SD 1.5 step varies by
±30% with the load, which drowns differences of a few percent between settings (`python -m
tomesd.bench --interleave` over the same grid showed it). So this measures the two parts apart:

1. f: the fraction of an unpatched SD 1.5 UNet step (random weights, fp32, classifier-free-guidance
   batch 2) spent in its level-1 Transformer2DModels, timed by forward hooks inside --full-calls
   steps per resolution (after one warm-up): one ratio of two times taken in the same calls.
2. t(setting): one call of those same five modules (taken from the SD 1.5 UNet, real sizes, run in
   UNet order on [2, 320, H/8, W/8] with 77 text tokens) as a denoiser of their own, which tomesd
   patches as it patches the UNet: one level, share_plan across the five blocks, plan_every across
   calls. All settings are timed round-robin for --rounds rounds (tomesd.bench's timing: windows of
   whole plan_every periods, the timestep changing at every call, the patch applied per window); medians.
3. per-step speed-up on SD 1.5 = 1 / (1 − f + f · t(setting) / t(no ToMe)).

    python benchmarks/bench_modes.py --resolutions 512,768 --out modes.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tomesd  # noqa: E402
from tomesd import bench  # noqa: E402

SETTINGS = (  # name → apply_patch keywords (ratio apart)
    ("tokens", dict(mode="tokens")),
    ("tokens+prop", dict(mode="tokens", prop_attn=True)),
    ("kv+prop", dict(mode="kv", prop_attn=True)),
    ("kv", dict(mode="kv", prop_attn=False)),
    ("tokens share_plan", dict(mode="tokens", share_plan=True)),
    ("tokens plan_every 2", dict(mode="tokens", plan_every=2)),
    ("tokens plan_every 5", dict(mode="tokens", plan_every=5)),
    ("kv+prop share_plan", dict(mode="kv", prop_attn=True, share_plan=True)),
)


class TopLevel(nn.Module):
    """SD 1.5's level-1 Transformer2DModels in UNet order, as a denoiser: forward(sample [B, 320, h, w],
    timestep, encoder_hidden_states) → the chained output."""

    def __init__(self, unet):
        super().__init__()
        self.blocks = nn.ModuleList([*unet.down_blocks[0].attentions, *unet.up_blocks[-1].attentions])

    def forward(self, sample, timestep, encoder_hidden_states):
        for block in self.blocks:
            sample = block(sample, encoder_hidden_states=encoder_hidden_states).sample
        return sample


def top_fraction(unet, cfg, resolution: int, calls: int) -> Dict[str, Any]:
    """Share of unpatched SD 1.5 steps spent in the level-1 Transformer2DModels (one warm-up call)."""
    blocks = TopLevel(unet).blocks
    spent = [0.0]
    start = {}
    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(lambda m, a: start.__setitem__(id(m), time.perf_counter())))
        handles.append(block.register_forward_hook(
            lambda m, a, o: spent.__setitem__(0, spent[0] + time.perf_counter() - start[id(m)])))
    args, kwargs = bench.unet_inputs(unet, cfg, resolution)
    fractions, steps = [], []
    with torch.inference_mode():
        unet(*args, **kwargs)
        for _ in range(calls):
            spent[0] = 0.0
            t0 = time.perf_counter()
            unet(*args, **kwargs)
            step = time.perf_counter() - t0
            fractions.append(spent[0] / step)
            steps.append(step * 1000)
    for handle in handles:
        handle.remove()
    return dict(fraction=statistics.median(fractions), fractions=fractions, step_ms=steps)


def top_times(top, cfg, resolution: int, ratios, rounds: int) -> List[Dict[str, Any]]:
    """Round-robin timing of the five blocks unpatched and with every setting at every ratio."""
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    sample = torch.randn(2, 320, side, side, generator=g)
    text = torch.randn(2, 77, 768, generator=g)
    args, kwargs = (sample, torch.tensor(500)), dict(encoder_hidden_states=text)
    points = [("no ToMe", None, {})] + [(name, r, params) for name, params in SETTINGS for r in ratios]
    times: List[List[float]] = [[] for _ in points]
    for k in range(rounds):
        for i, (name, ratio, params) in enumerate(points):
            calls = bench.calls_per_window(cfg, params)
            if ratio is not None:
                tomesd.apply_patch(top, ratio=ratio, seed=0, **params)
            try:
                times[i] += bench._time_calls(top, args, kwargs, cfg, calls=calls, warmup=1 if k == 0 else 0, steps=1,
                                              first=k * calls)
            finally:
                tomesd.remove_patch(top)
        print(f"  {resolution} px: round {k + 1}/{rounds} done", file=sys.stderr, flush=True)
    return [dict(setting=name, ratio=ratio, params=params, ms=statistics.median(t), ms_all=t)
            for (name, ratio, params), t in zip(points, times)]


def load() -> Optional[str]:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", default="512,768")
    p.add_argument("--ratios", default="0.3,0.5,0.7")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the settings (median)")
    p.add_argument("--full-calls", type=int, default=2, help="timed SD 1.5 steps per resolution for f")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    resolutions = [int(v) for v in args.resolutions.split(",")]
    ratios = [float(v) for v in args.ratios.split(",")]
    cfg = bench.default_config("cpu", arch="sd15", resolutions=tuple(resolutions), ratios=tuple(ratios), isolate=False)
    result: Dict[str, Any] = dict(torch=torch.__version__, threads=torch.get_num_threads(), load_before=load(),
                                  resolutions={})
    unet = bench.load_unet(cfg)
    top = TopLevel(unet).eval()
    for res in resolutions:
        frac = top_fraction(unet, cfg, res, args.full_calls)
        print(f"{res} px: level-1 transformer blocks take {frac['fraction']:.1%} of an SD 1.5 step "
              f"({', '.join(f'{v:.1%}' for v in frac['fractions'])}; steps {', '.join(f'{v:.0f}' for v in frac['step_ms'])} ms)",
              flush=True)
        rows = top_times(top, cfg, res, ratios, args.rounds)
        base = rows[0]["ms"]
        f = frac["fraction"]
        for row in rows:
            row["top_speedup"] = base / row["ms"]
            row["step_speedup"] = 1.0 / (1.0 - f + f * row["ms"] / base)
            print(f"  {row['setting']:22s} {'' if row['ratio'] is None else format(row['ratio'], 'g'):>4s}  "
                  f"top {row['ms']:8.1f} ms ({row['top_speedup']:.2f}x, {min(row['ms_all']):.1f}-{max(row['ms_all']):.1f})"
                  f"  SD 1.5 step {row['step_speedup']:.2f}x", flush=True)
        result["resolutions"][res] = dict(fraction=frac, rows=rows)
    result["load_after"] = load()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Per-step speed-up of tomesd's modes and plan options on SD 1.5, resolved on a shared CPU.

Every setting here (mode, prop_attn, share_plan, plan_every, merge_mlp, sx/sy, ratio, max_downsample
≤ 2) changes only the transformer blocks of SD 1.5's two finest levels: the five Transformer2DModels at
the latent's resolution (2 down, 3 up, C = 320) and the five at half of it (C = 640). The rest of the
UNet step is the same work whatever the setting. On a shared CPU a whole SD 1.5 step varies by ±30%
with the load, which drowns differences of a few percent between settings. So this measures two parts:

1. f: the fraction of an unpatched SD 1.5 UNet step (random weights, fp32, classifier-free-guidance
   batch 2) spent in those ten Transformer2DModels, timed by forward hooks inside --full-calls steps
   per resolution (after one warm-up): one ratio of two times taken in the same calls.
2. t(setting): one call of those same ten modules (taken from the SD 1.5 UNet, real sizes, in UNet
   order, see Levels) as a denoiser of their own, which tomesd patches as it patches the UNet:
   share_plan within a level, plan_every across calls. All settings are timed round-robin for --rounds
   rounds (tomesd.bench's timing: windows of whole plan_every periods, the timestep changing at every
   call, the patch applied per window); medians.
3. per-step speed-up on SD 1.5 = 1 / (1 − f + f · t(setting) / t(no ToMe)).

    python benchmarks/bench_modes.py --resolutions 512,768 --extra --out modes.json
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
from tomesd.tools import timing  # noqa: E402

BASE = (  # the grid: name → apply_patch keywords (ratio apart), at --ratios
    ("tokens", dict(mode="tokens")),
    ("tokens+prop", dict(mode="tokens", prop_attn=True)),
    ("kv", dict(mode="kv", prop_attn=False)),
    ("kv+prop", dict(mode="kv", prop_attn=True)),
    ("tokens share_plan", dict(mode="tokens", share_plan=True)),
    ("tokens+prop share_plan", dict(mode="tokens", prop_attn=True, share_plan=True)),
    ("kv+prop share_plan", dict(mode="kv", prop_attn=True, share_plan=True)),
    ("tokens plan_every 2", dict(mode="tokens", plan_every=2)),
    ("tokens plan_every 5", dict(mode="tokens", plan_every=5)),
    ("tokens+prop plan_every 2", dict(mode="tokens", prop_attn=True, plan_every=2)),
    ("tokens+prop plan_every 5", dict(mode="tokens", prop_attn=True, plan_every=5)),
    ("kv+prop plan_every 2", dict(mode="kv", prop_attn=True, plan_every=2)),
    ("kv+prop plan_every 5", dict(mode="kv", prop_attn=True, plan_every=5)),
)
TOK, TOKP, KVP = dict(mode="tokens"), dict(mode="tokens", prop_attn=True), dict(mode="kv", prop_attn=True)
EXTRA = (  # where prop_attn's quality margin can be spent (--extra): name, keywords, ratios
    ("tokens md2", dict(TOK, max_downsample=2), (0.3, 0.5, 0.7)),
    ("tokens+prop md2", dict(TOKP, max_downsample=2), (0.3, 0.5, 0.7)),
    ("kv+prop md2", dict(KVP, max_downsample=2), (0.3, 0.5, 0.7)),
    ("tokens mlp", dict(TOK, merge_mlp=True), (0.5, 0.7)),
    ("tokens+prop mlp", dict(TOKP, merge_mlp=True), (0.5, 0.7)),
    ("kv+prop mlp", dict(KVP, merge_mlp=True), (0.5, 0.7)),
    ("tokens+prop mlp share_plan", dict(TOKP, merge_mlp=True, share_plan=True), (0.5, 0.7)),
    ("kv+prop mlp share_plan", dict(KVP, merge_mlp=True, share_plan=True), (0.5, 0.7)),
    ("tokens+prop sx4", dict(TOKP, sx=4, sy=4), (0.7, 0.8, 0.9)),
    ("kv+prop sx4", dict(KVP, sx=4, sy=4), (0.7, 0.8, 0.9)),
    ("tokens+prop sx4 md2", dict(TOKP, sx=4, sy=4, max_downsample=2), (0.7, 0.8, 0.9)),
    ("kv+prop sx4 md2", dict(KVP, sx=4, sy=4, max_downsample=2), (0.7, 0.8, 0.9)),
    ("tokens+prop sx4 mlp", dict(TOKP, sx=4, sy=4, merge_mlp=True), (0.7, 0.9)),
    ("kv+prop sx4 mlp", dict(KVP, sx=4, sy=4, merge_mlp=True), (0.7, 0.9)),
    ("tokens+prop md2 mlp", dict(TOKP, max_downsample=2, merge_mlp=True), (0.5, 0.7)),
    ("kv+prop md2 mlp", dict(KVP, max_downsample=2, merge_mlp=True), (0.5, 0.7)),
)


class Levels(nn.Module):
    """SD 1.5's Transformer2DModels of the two finest levels (real sizes), as a denoiser of their own:
    forward(sample [B, 320, h, w], timestep, encoder_hidden_states) runs the level-1 down blocks on the
    sample, the level-2 blocks (down then up) on a [B, 640, h/2, w/2] tensor made from it, then the
    level-1 up blocks: the UNet's order. tomesd patches it as it patches the UNet (the levels follow from
    the token counts), so one level's plan is shared across its blocks (share_plan) and plans are reused
    across calls (plan_every) exactly as in the UNet."""

    def __init__(self, unet):
        super().__init__()
        self.down1 = nn.ModuleList(unet.down_blocks[0].attentions)
        self.level2 = nn.ModuleList([*unet.down_blocks[1].attentions, *unet.up_blocks[-2].attentions])
        self.up1 = nn.ModuleList(unet.up_blocks[-1].attentions)
        channels = unet.config.block_out_channels
        self.widen = channels[1] // channels[0]

    def blocks(self, level: int):
        return [*self.down1, *self.up1] if level == 1 else list(self.level2)

    def forward(self, sample, timestep, encoder_hidden_states):
        for block in self.down1:
            sample = block(sample, encoder_hidden_states=encoder_hidden_states).sample
        half = sample[:, :, ::2, ::2].repeat(1, self.widen, 1, 1)
        for block in self.level2:
            half = block(half, encoder_hidden_states=encoder_hidden_states).sample
        for block in self.up1:
            sample = block(sample, encoder_hidden_states=encoder_hidden_states).sample
        return sample, half


def step_speedup(f: float, ms: float, base_ms: float) -> float:
    """Per-step speed-up when a share f of the step takes ms instead of base_ms (the rest unchanged)."""
    return 1.0 / (1.0 - f + f * ms / base_ms)


def level_fractions(unet, cfg, resolution: int, calls: int) -> Dict[str, Any]:
    """Share of unpatched SD 1.5 steps spent in the level-1 and level-2 Transformer2DModels (one warm-up
    call; forward hooks inside the timed steps)."""
    levels = Levels(unet)
    spent = {1: 0.0, 2: 0.0}
    start = {}
    handles = []
    for level in (1, 2):
        for block in levels.blocks(level):
            handles.append(block.register_forward_pre_hook(lambda m, a: start.__setitem__(id(m), time.perf_counter())))
            handles.append(block.register_forward_hook(
                lambda m, a, o, level=level: spent.__setitem__(level, spent[level] + time.perf_counter() - start[id(m)])))
    args, kwargs = bench.unet_inputs(unet, cfg, resolution)
    shares = {1: [], 2: []}
    steps = []
    with torch.inference_mode():
        unet(*args, **kwargs)
        for _ in range(calls):
            spent.update({1: 0.0, 2: 0.0})
            t0 = time.perf_counter()
            unet(*args, **kwargs)
            step = time.perf_counter() - t0
            for level in (1, 2):
                shares[level].append(spent[level] / step)
            steps.append(step * 1000)
    for handle in handles:
        handle.remove()
    return dict(fraction=statistics.median([a + b for a, b in zip(shares[1], shares[2])]),
                level1=statistics.median(shares[1]), level2=statistics.median(shares[2]),
                fractions=[a + b for a, b in zip(shares[1], shares[2])], step_ms=steps)


def level_times(model, unet, cfg, resolution: int, points, rounds: int) -> List[Dict[str, Any]]:
    """Round-robin timing of the level-1 and level-2 blocks unpatched and with every (setting, ratio)."""
    (latent, timestep), kwargs = bench.unet_inputs(unet, cfg, resolution)  # the guided batch and text states
    g = torch.Generator().manual_seed(cfg.seed)
    sample = torch.randn(latent.shape[0], unet.config.block_out_channels[0], *latent.shape[2:], generator=g)
    args, kwargs = (sample, timestep), dict(encoder_hidden_states=kwargs["encoder_hidden_states"])
    points = [("no ToMe", None, {})] + list(points)
    times: List[List[float]] = [[] for _ in points]
    for k in range(rounds):
        for i, (name, ratio, params) in enumerate(points):
            calls = bench.calls_per_window(cfg, params)
            if ratio is not None:
                tomesd.apply_patch(model, ratio=ratio, seed=0, **params)
            try:
                times[i] += timing.time_calls(model, args, kwargs, calls=calls, warmup=1 if k == 0 else 0, steps=1,
                                              first=k * calls, device=cfg.device)
            finally:
                tomesd.remove_patch(model)
        print(f"  {resolution} px: round {k + 1}/{rounds} done", file=sys.stderr, flush=True)
    return [dict(setting=name, ratio=ratio, params=params, ms=statistics.median(t), ms_all=t)
            for (name, ratio, params), t in zip(points, times)]


def refit(path: str, unet, cfg, resolutions, calls: int) -> None:
    """Measure f again (e.g. on a quieter machine) and recompute an earlier output's step speed-ups."""
    with open(path) as fh:
        data = json.load(fh)
    for res in resolutions:
        block = data["resolutions"][str(res)]
        frac = level_fractions(unet, cfg, res, calls)
        f = frac["fraction"]
        print(f"{res} px: f {block['fraction']['fraction']:.1%} → {f:.1%} (level 1 {frac['level1']:.1%}, "
              f"level 2 {frac['level2']:.1%}; steps {', '.join(f'{v:.0f}' for v in frac['step_ms'])} ms)", flush=True)
        block["fraction_before_refit"] = block["fraction"]
        block["fraction"] = dict(frac, load=load())
        base = block["rows"][0]["ms"]
        for row in block["rows"]:
            row["step_speedup"] = step_speedup(f, row["ms"], base)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)


def load() -> Optional[str]:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd15", help="a UNet architecture of tomesd.tools.archs (default sd15; tiny for a smoke run)")
    p.add_argument("--resolutions", default="512,768")
    p.add_argument("--ratios", default="0.3,0.5,0.7", help="ratios of the issue's grid (BASE)")
    p.add_argument("--extra", action="store_true", help="also the EXTRA settings (second level, MLP, 4x4 cells)")
    p.add_argument("--only", help="comma-separated setting names to run (default: all selected)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the settings (median)")
    p.add_argument("--full-calls", type=int, default=2, help="timed SD 1.5 steps per resolution for f")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--refit", metavar="JSON", help="only measure f again at --resolutions and recompute the step "
                   "speed-ups of this earlier output in place (the old f is kept as fraction_before_refit)")
    args = p.parse_args()
    resolutions = [int(v) for v in args.resolutions.split(",")]
    ratios = [float(v) for v in args.ratios.split(",")]
    points = [(name, r, params) for name, params in BASE for r in ratios]
    if args.extra:
        points += [(name, r, params) for name, params, rs in EXTRA for r in rs]
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {name for name, _, _ in points}
        if unknown:
            p.error(f"--only: unknown setting(s) {sorted(unknown)}; known: {sorted({n for n, _, _ in points})}")
        points = [pt for pt in points if pt[0] in keep]
    cfg = bench.default_config("cpu", arch=args.arch, resolutions=tuple(resolutions), ratios=tuple(ratios), isolate=False)
    result: Dict[str, Any] = dict(torch=torch.__version__, threads=torch.get_num_threads(), load_before=load(),
                                  resolutions={})
    unet = bench.load_unet(cfg)
    if args.refit:
        refit(args.refit, unet, cfg, resolutions, args.full_calls)
        return
    model = Levels(unet).eval()
    for res in resolutions:
        frac = level_fractions(unet, cfg, res, args.full_calls)
        print(f"{res} px: level-1 / level-2 transformer blocks take {frac['level1']:.1%} / {frac['level2']:.1%} of an "
              f"SD 1.5 step (sum per step {', '.join(f'{v:.1%}' for v in frac['fractions'])}; steps "
              f"{', '.join(f'{v:.0f}' for v in frac['step_ms'])} ms)", flush=True)
        rows = level_times(model, unet, cfg, res, points, args.rounds)
        base = rows[0]["ms"]
        f = frac["fraction"]
        for row in rows:
            row["blocks_speedup"] = base / row["ms"]
            row["step_speedup"] = step_speedup(f, row["ms"], base)
            print(f"  {row['setting']:28s} {'' if row['ratio'] is None else format(row['ratio'], 'g'):>4s}  "
                  f"blocks {row['ms']:8.1f} ms ({row['blocks_speedup']:.2f}x, "
                  f"{min(row['ms_all']):.1f}-{max(row['ms_all']):.1f})  step {row['step_speedup']:.2f}x", flush=True)
        result["resolutions"][res] = dict(fraction=frac, rows=rows)
        if args.out:  # after every resolution: a partial run still leaves its numbers
            with open(args.out, "w") as fh:
                json.dump(dict(result, load_after=load()), fh, indent=2)
    result["load_after"] = load()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()

"""The CPU default of `python -m tomesd.bench`: where merging pays, timed so that load shows.

Two parts, each a baseline and two settings — apply_patch's defaults (ratio 0.5) and the fast
setting (ratio 0.7, prop_attn, merge_mlp: the fastest at the default's quality on the digits model,
BENCHMARKS.md issue 11; on photographs it loses some quality, so README recommends ratio 0.7 +
prop_attn without merge_mlp where quality comes first):
- "whole step": one guided UNet call of the model at 512 px (what a sampler step costs);
- "finest block": the model's first Transformer2DModel (for SD 1.5 the C=320 block of the /1 level,
  where ToMe merges by default) alone at 1024 px (a 128×128 latent: 16,384 tokens), where attention
  dominates and merging pays most. It is one block, not a whole step, and labelled as such.

Timing is interleaved: round k times one call of every case in turn (patch, call, unpatch), so a
load that comes and goes slows every case alike; the first round also runs `warmup` untimed calls per
case. Per case: median, min and max over rounds; per setting: the speed-up of the medians and its
noise band, the lowest and highest speed-up of a single round (baseline and setting timed in the
same round). A speed-up whose whole band is above 1 is marked "faster", below 1 "slower", else
"within noise". torch's threads are set to the physical cores (threads beyond them only add
contention) and said. A warning is printed when the 1-minute load average exceeds the cores this run
uses, or when a case's rounds differ by more than `SPREAD` of their median. Peak memory is not
measured here (cases share one process); `--resolutions` etc. give the grid of tomesd.bench.measure.
"""
from __future__ import annotations

import statistics
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..tools import timing

STEP_PX, BLOCK_PX = 512, 1024
SETTINGS = (("default", dict(ratio=0.5)), ("fast", dict(ratio=0.7, prop_attn=True, merge_mlp=True)))
SPREAD = 0.25  # rounds of one case differing by more than this fraction of their median: a busy machine


def load_warnings(rows: List[Dict[str, Any]], threads: int, load: Optional[float]) -> List[str]:
    """Why these timings may not be a quiet machine's: a load average above `threads`, or rows whose
    rounds differ by more than SPREAD of their median."""
    out = timing.load_warnings(load, threads)
    noisy = [f"{r['part']} {r['setting']}" for r in rows if r["ms_max"] - r["ms_min"] > SPREAD * r["ms_per_step"]]
    if noisy:
        out.append(f"rounds disagree by more than {SPREAD:.0%} at {', '.join(noisy)}: the machine's load changed "
                   "during the run; rerun on a quiet machine or raise --steps")
    return out


def finest_block(unet):
    """(the first Transformer2DModel of the UNet's down path, its downsample: 1, 2, 4, ...)."""
    for level, down in enumerate(unet.down_blocks):
        for attention in getattr(down, "attentions", None) or ():
            return attention, 2 ** level
    raise ValueError("the UNet has no transformer block in its down path")


def cases(unet, dtype, seed: int = 0) -> List[Tuple[str, int, Any, tuple, dict]]:
    """(part, px, model, args, kwargs) of the two parts: the UNet at STEP_PX (a guided batch of 2)
    and its finest block at BLOCK_PX; the timestep (args[1] or kwargs["timestep"]) is varied by time_calls."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    text = torch.randn(2, 77, cross, generator=g).to(dtype)
    side = STEP_PX // 8
    latent = torch.randn(2, unet.config.in_channels, side, side, generator=g).to(dtype)
    block, down = finest_block(unet)
    side = BLOCK_PX // 8 // down
    hidden = torch.randn(2, block.config.in_channels, side, side, generator=g).to(dtype)
    return [("whole step", STEP_PX, unet, (latent, torch.tensor(500)), dict(encoder_hidden_states=text)),
            ("finest block", BLOCK_PX, block, (),
             dict(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor(500)))]


def measure(parts, rounds: int, warmup: int, progress: Callable[[str], None] = lambda text: None) -> List[Dict[str, Any]]:
    """Interleaved rounds over every (part, setting) case; rows with ms_per_step (median), ms_min,
    ms_max, times (per round), and for settings speedup, speedup_min, speedup_max, verdict."""
    import tomesd

    points = [(part, px, model, args, kwargs, label, params) for part, px, model, args, kwargs in parts
              for label, params in (("baseline", None),) + SETTINGS]
    times: List[List[float]] = [[] for _ in points]
    for k in range(rounds):
        for i, (part, px, model, args, kwargs, label, params) in enumerate(points):
            progress(f"round {k + 1}/{rounds}: {part} {px} px, {label}")
            try:
                if params is not None:
                    tomesd.apply_patch(model, **params)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # diffusers' Transformer2DModelOutput notice
                    times[i] += timing.time_calls(model, args, kwargs, warmup=warmup if k == 0 else 0, steps=1,
                                                  first=k)
            finally:
                tomesd.remove_patch(model)
    rows, base = [], None
    for (part, px, _, _, _, label, params), t in zip(points, times):
        row = dict(part=part, resolution=px, setting=label, params=params, status="ok", times=t,
                   ms_per_step=statistics.median(t), ms_min=min(t), ms_max=max(t))
        if params is None:
            base = row
        else:
            row.update(speedup=base["ms_per_step"] / row["ms_per_step"], **timing.noise_band(base["times"], t))
        rows.append(row)
    return rows


def format_rows(rows: List[Dict[str, Any]]) -> str:
    from ..tools import cli

    lines = [("part", "px", "setting", "ms (median)", "min-max ms", "speedup", "noise band", "")]
    for r in rows:
        setting = r["setting"] if r["params"] is None else f"{r['setting']}: {cli.setting_label(r['params'])}"
        band = "-" if r.get("speedup_min") is None else f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}x"
        lines.append((r["part"], str(r["resolution"]), setting, f"{r['ms_per_step']:.0f}",
                      f"{r['ms_min']:.0f}-{r['ms_max']:.0f}", cli.fmt(r.get("speedup"), ".2f", "x"), band,
                      r.get("verdict", "")))
    return "\n".join(cli.align(lines, left=(0, 2, 7)))


def describe(threads: int, cores: int, requested: bool) -> str:
    why = "as asked (--threads)" if requested else f"= physical cores ({cores})"
    return f"torch threads: {threads} {why}"


def settings_line(names: Sequence[Tuple[str, Dict[str, Any]]] = SETTINGS) -> str:
    return "; ".join(f"{name} = apply_patch({', '.join(f'{k}={v!r}' for k, v in params.items())})" for name, params in names)

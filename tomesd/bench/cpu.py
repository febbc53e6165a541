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
"within noise". torch's threads are the free cores (tomesd.tools.threads, said by the caller). A
warning is given when the 1-minute load average exceeds the cores of this machine, or when a case's
rounds differ by more than `SPREAD` of their median. Peak memory is not measured here (cases share
one process); `--resolutions` etc. give the grid of tomesd.bench.measure.

`run` is the whole of it (python -m tomesd.bench's CPU default and examples/speed_memory.ipynb call
it), `format_rows` the table, `plot` the figure (bench.png): per part, each case's median with its
min-max over rounds, and each setting's speed-up with its noise band.
"""
from __future__ import annotations

import statistics
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..tools import cli, threads, timing
from ..tools.models import DTYPES
from .config import BenchConfig
from .measure import environment, load_unet
from .report import BenchResult

STEP_PX, BLOCK_PX = 512, 1024
SETTINGS = (("default", dict(ratio=0.5)), ("fast", dict(ratio=0.7, prop_attn=True, merge_mlp=True)))
SPREAD = 0.25  # rounds of one case differing by more than this fraction of their median: a busy machine


def load_warnings(rows: List[Dict[str, Any]], cores: int, load: Optional[float]) -> List[str]:
    """Why these timings may not be a quiet machine's: a load average above `cores`, or rows whose
    rounds differ by more than SPREAD of their median."""
    out = timing.load_warnings(load, cores)
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


def cases(unet, dtype, seed: int = 0, step_px: int = STEP_PX, block_px: int = BLOCK_PX) -> List[Tuple[str, int, Any, tuple, dict]]:
    """(part, px, model, args, kwargs) of the two parts: the UNet at step_px (a guided batch of 2)
    and its finest block at block_px; the timestep (args[1] or kwargs["timestep"]) is varied by time_calls."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    text = torch.randn(2, 77, cross, generator=g).to(dtype)
    side = step_px // 8
    latent = torch.randn(2, unet.config.in_channels, side, side, generator=g).to(dtype)
    block, down = finest_block(unet)
    side = block_px // 8 // down
    hidden = torch.randn(2, block.config.in_channels, side, side, generator=g).to(dtype)
    return [("whole step", step_px, unet, (latent, torch.tensor(500)), dict(encoder_hidden_states=text)),
            ("finest block", block_px, block, (),
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


def run(cfg: BenchConfig, rounds: int = 4, warmup: int = 1, progress: Callable[[str], None] = lambda text: None,
        step_px: int = STEP_PX, block_px: int = BLOCK_PX, cores: Optional[int] = None) -> BenchResult:
    """The CPU default on cfg's model (cfg.arch / cfg.model, cfg.dtype, cfg.seed): `rounds` interleaved
    rounds after `warmup` untimed calls per case, with torch's threads as they are. Rows: measure's,
    "times" as "times_ms"; env: environment(cfg) plus the load average (the higher of before and
    after), the threads, what was measured, and "warnings" (load_warnings against `cores`, default
    the cores this process may use, tomesd.tools.threads.usable_cores)."""
    import torch

    load_before = timing.load_average()
    unet = load_unet(cfg)
    rows = measure(cases(unet, DTYPES[cfg.dtype], cfg.seed, step_px, block_px), rounds, warmup, progress)
    loads = [x for x in (load_before, timing.load_average()) if x is not None]
    load = max(loads) if loads else None
    env = environment(cfg)
    env.update(timing=f"perf_counter, {rounds} interleaved rounds (median, min-max)", threads=torch.get_num_threads(),
               load_average=load, memory="not measured",
               cpu_default=dict(step_px=step_px, block_px=block_px, settings=dict(SETTINGS), rounds=rounds, warmup=warmup))
    env["warnings"] = load_warnings(rows, cores or threads.usable_cores(), load)
    return BenchResult(rows=[{k: v for k, v in r.items() if k != "times"} | {"times_ms": r["times"]} for r in rows], env=env)


def format_rows(rows: List[Dict[str, Any]]) -> str:
    lines = [("part", "px", "setting", "ms (median)", "min-max ms", "speedup", "noise band", "")]
    for r in rows:
        setting = r["setting"] if r["params"] is None else f"{r['setting']}: {cli.setting_label(r['params'])}"
        band = "-" if r.get("speedup_min") is None else f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}x"
        lines.append((r["part"], str(r["resolution"]), setting, f"{r['ms_per_step']:.0f}",
                      f"{r['ms_min']:.0f}-{r['ms_max']:.0f}", cli.fmt(r.get("speedup"), ".2f", "x"), band,
                      r.get("verdict", "")))
    return "\n".join(cli.align(lines, left=(0, 2, 7)))


def plot(result: BenchResult, path: Optional[str] = None):
    """Figure: one panel per part, a bar per case (its median ms, whiskers from its fastest to its
    slowest round), each setting labelled with its speed-up, noise band and verdict. Saved as PNG to
    `path` when given; returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    parts = list(dict.fromkeys(r["part"] for r in result.rows))
    fig = Figure(figsize=(5 * len(parts), 3.6), layout="constrained")
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, part in zip(axes, parts):
        rows = [r for r in result.rows if r["part"] == part]
        medians = [r["ms_per_step"] for r in rows]
        spread = [[m - r["ms_min"] for m, r in zip(medians, rows)], [r["ms_max"] - m for m, r in zip(medians, rows)]]
        ax.bar(range(len(rows)), medians, yerr=spread, capsize=4,
               color=["#888888" if r["params"] is None else "#1f77b4" for r in rows])
        labels = []
        for r in rows:
            band = "" if r.get("speedup_min") is None else f"\n{r['speedup_min']:.2f}-{r['speedup_max']:.2f}x"
            labels.append(r["setting"] if r["params"] is None else
                          f"{r['setting']}\n{r['speedup']:.2f}x{band}\n{r.get('verdict', '')}")
        ax.set_xticks(range(len(rows)), labels, fontsize="small")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("ms per call (median, min-max)")
        ax.set_title(f"{part}, {rows[0]['resolution']} px")
        ax.grid(True, axis="y", alpha=0.3)
    env = result.env
    config = env.get("config", {})
    load = env.get("load_average")
    fig.suptitle(f"tomesd.bench (CPU default): {config.get('arch') or config.get('model')}"
                 f"{' (TOY architecture)' if env.get('toy') else ''}, {config.get('dtype')}, {env.get('threads')} threads, "
                 f"load {cli.fmt(load, '.1f')}", fontsize="medium")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def settings_line(names: Sequence[Tuple[str, Dict[str, Any]]] = SETTINGS) -> str:
    return "; ".join(f"{name} = apply_patch({', '.join(f'{k}={v!r}' for k, v in params.items())})" for name, params in names)

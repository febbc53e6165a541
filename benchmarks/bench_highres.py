"""Per-step speed-up and memory of token merging at 1024–2048 px (SD 1.5, SDXL) on a CPU: global against
local matching, tomesd 0.1.3 side by side.

Whole 1536 / 2048 px steps, one per setting and round, are out of reach of a 2-core CPU (an unpatched
SD 1.5 step at 2048 px takes minutes), so a step is split into the part a setting changes and the rest.
Every setting here merges only the highest-resolution transformer level (max_downsample = 1): its L
Transformer2DModels (SD 1.5: 2 down + 3 up, C = 320, one transformer layer each; SDXL: 2 + 3, C = 640,
two layers each) are identical in shape, so

    step(setting) = L · block(setting) + rest,   per-step speed-up = step(no ToMe) / step(setting),

(--level d times the level at downsample d instead, e.g. SDXL's /4 level: 2 + 3 + mid, ten layers each;
--level 2,4 times both levels and composes every pair of settings, one per level:
step = L₂ · block₂(setting at /2) + L₄ · block₄(setting at /4) + rest, rest without either level's modules),

where block is one of those Transformer2DModels taken from the UNet (random weights, real sizes, its text
states [2, 77, cross-attention dim]: the guided batch of 2, fp32) and rest is one unpatched UNet step with
those L modules replaced by identities (measured --rest-calls times, median; all the other work of the
step, which no setting here changes). Block settings are timed round-robin for --rounds rounds (medians),
after one untimed call each when --warmup. Matching's share of a merged block is the plan building alone
(tomesd.ops.build_plan on the block's input, timed the same way) over the block's time.

tomesd 0.1.3 is its algorithm (benchmarks/tomesd013.py: dense [src × dst] scores, argsort, scatter_reduce)
hooked around each layer's attn1, at ratio 0.5 with 2×2 cells as its default. Peak memory (--memory) is
the growth of peak RSS (VmHWM, reset just before) over RSS during one block call, in a fresh process per
setting (Linux; CPU: what the call allocates beyond the model and inputs, not CUDA memory).

    python benchmarks/bench_highres.py --arch sd15 --resolutions 1024,1536,2048 --out highres_sd15.json
    python benchmarks/bench_highres.py --arch sdxl --resolutions 2048 --out highres_sdxl.json
    python benchmarks/bench_highres.py --arch sdxl --level 2,4 --resolutions 1024,1536,2048 --windows 3 \
        --prop-windows '' --only "default (tokens 0.5),4x4 0.9 prop,0.5 prop mlp share" --out sdxl_levels.json

A level's settings patch its Transformer2DModel alone, so share_plan shares a plan among that module's
layers (SDXL: 2 at /2, 10 at /4), not among all the level's modules as in the UNet: the composed step
counts L − 1 plan builds per level more than the UNet makes (a small overestimate; the matching share
says how small).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tomesd  # noqa: E402
from tomesd import bench, matching, ops  # noqa: E402
from tomesd.tools import cli  # noqa: E402

import tomesd013  # noqa: E402  (the reference algorithm, next to this script)

SETTINGS: Tuple[Tuple[str, Dict[str, Any]], ...] = (  # name → apply_patch keywords (match_window apart)
    ("default (tokens 0.5)", dict(ratio=0.5)),
    ("0.7 prop", dict(ratio=0.7, prop_attn=True)),
    ("0.7 prop mlp", dict(ratio=0.7, prop_attn=True, merge_mlp=True)),
    ("kv 0.75 prop", dict(ratio=0.75, mode="kv", prop_attn=True)),
    ("4x4 0.8 prop", dict(ratio=0.8, sx=4, sy=4, prop_attn=True)),
    ("4x4 0.9 prop", dict(ratio=0.9, sx=4, sy=4, prop_attn=True)),
    ("0.5 prop mlp share", dict(ratio=0.5, prop_attn=True, merge_mlp=True, share_plan=True)),
    ("0.7 prop mlp xattn share", dict(ratio=0.7, prop_attn=True, merge_mlp=True, merge_crossattn=True, share_plan=True)),
)
REFERENCE = "tomesd 0.1.3 0.5"
BASELINES = ("no ToMe", REFERENCE)  # timed at every resolution: the speed-ups' baseline and tomesd 0.1.3


def points(windows, prop_windows=(), settings=SETTINGS) -> List[Tuple[str, Optional[Dict[str, Any]]]]:
    """(name, apply_patch keywords; None = no ToMe, REFERENCE = tomesd 0.1.3) in timing order; settings
    with prop_attn also get prop_windows."""
    out: List[Tuple[str, Optional[Dict[str, Any]]]] = [(name, None) for name in BASELINES]
    for name, params in settings:
        for window in [*windows, *(prop_windows if params.get("prop_attn") else ())]:
            out.append((f"{name} {'global' if window is None else f'k={window}'}", dict(params, match_window=window)))
    return out


def setting_of(point: str) -> str:
    """The setting (a name of SETTINGS or BASELINES) a point name belongs to."""
    return point if point in BASELINES else point.rsplit(" ", 1)[0]


def memory_names(pts, only: Optional[List[str]]) -> List[str]:
    """The points whose peak memory is measured: the settings --only names (a baseline only when named
    too), else no ToMe, tomesd 0.1.3 and the default setting's windows."""
    if only is not None:
        return [name for name, _ in pts if setting_of(name) in only]
    return [name for name, _ in pts if name in BASELINES or name.startswith("default")]


class Skip(nn.Module):
    """A Transformer2DModel's stand-in that returns its input (the UNet's blocks call it with
    return_dict=False and take element 0)."""

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,)


def finest_modules(unet, level: Optional[int] = None) -> Tuple[List[Tuple[nn.ModuleList, int]], int]:
    """((ModuleList, index) of every Transformer2DModel at the UNet's highest-resolution transformer
    level (or at downsample `level`), found by one call on a small latent (their input is the largest);
    that level's downsample factor: SD 1.5 1, SDXL 2)."""
    owners = [(name, attentions, i) for name, block in [*(("down", b) for b in unet.down_blocks),
                                                      ("mid", unet.mid_block),
                                                      *(("up", b) for b in unet.up_blocks)]
              for attentions in [getattr(block, "attentions", None) or []] for i in range(len(attentions))]
    sizes: Dict[int, int] = {}
    handles = [attentions[i].register_forward_pre_hook(
        lambda m, a: sizes.__setitem__(id(m), a[0].shape[-1] * a[0].shape[-2])) for _, attentions, i in owners]
    cfg = bench.default_config("cpu", arch=ARCH["name"])
    args, kwargs = bench.unet_inputs(unet, cfg, 128)
    with torch.inference_mode():
        unet(*args, **kwargs)
    for h in handles:
        h.remove()
    top = max(sizes.values()) if level is None else args[0].shape[-1] * args[0].shape[-2] // level ** 2
    downsample = round((args[0].shape[-1] * args[0].shape[-2] / top) ** 0.5)
    return [(attentions, i) for _, attentions, i in owners if sizes.get(id(attentions[i])) == top], downsample


ARCH: Dict[str, Any] = {}


def step_times(unet, cfg, px: int, calls: int, warmup: bool, skipped=()) -> List[float]:
    """Seconds of unpatched UNet steps at px (after one untimed step when warmup), with the
    Transformer2DModels at `skipped` ((ModuleList, index) pairs) replaced by identities."""
    originals = [attentions[i] for attentions, i in skipped]
    for attentions, i in skipped:
        attentions[i] = Skip()
    try:
        args, kwargs = bench.unet_inputs(unet, cfg, px)
        times = []
        with torch.inference_mode():
            if warmup:
                unet(*args, **kwargs)
            for _ in range(calls):
                start = time.perf_counter()
                unet(*args, **kwargs)
                times.append(time.perf_counter() - start)
        return times
    finally:
        for (attentions, i), module in zip(skipped, originals):
            attentions[i] = module


def block_inputs(block, side: int, cross: int, seed: int = 0):
    """(sample [2, C, side, side], text [2, 77, cross]) of one block call."""
    g = torch.Generator().manual_seed(seed + side)
    return (torch.randn(2, block.config.in_channels, side, side, generator=g),
            torch.randn(2, 77, cross, generator=g))


def reference_hooks(block, ratio: float = 0.5) -> List[Any]:
    """Hooks that make `block`'s transformer layers merge as tomesd 0.1.3 does (merge_attn only): the
    plan from each layer's input (dense scores), attn1 on the merged tokens, its output unmerged."""
    handles = []
    for layer in block.transformer_blocks:
        slot: Dict[str, Any] = {}

        def pre_layer(module, args, kwargs, slot=slot):
            x = args[0] if args else kwargs["hidden_states"]
            side = int(round(x.shape[1] ** 0.5))
            slot["m"], slot["u"] = tomesd013.closures(x, side, side, 2, 2, int(x.shape[1] * ratio))

        def pre_attn(module, args, kwargs, slot=slot):
            if args:
                return (slot["m"](args[0]), *args[1:]), kwargs
            return args, dict(kwargs, hidden_states=slot["m"](kwargs["hidden_states"]))

        def post_attn(module, args, kwargs, out, slot=slot):
            return slot["u"](out)

        handles.append(layer.register_forward_pre_hook(pre_layer, with_kwargs=True))
        handles.append(layer.attn1.register_forward_pre_hook(pre_attn, with_kwargs=True))
        handles.append(layer.attn1.register_forward_hook(post_attn, with_kwargs=True))
    return handles


class Variant:
    """One point's patch on the block: apply (untimed) before its call, remove after."""

    def __init__(self, block, name: str, params: Optional[Dict[str, Any]]):
        self.block, self.name, self.params, self.handles = block, name, params, []

    def __enter__(self):
        if self.name == REFERENCE:
            self.handles = reference_hooks(self.block)
        elif self.params is not None:
            tomesd.apply_patch(self.block, seed=1, max_downsample=1, **self.params)
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        tomesd.remove_patch(self.block)


def block_rounds(levels, pts, rounds: int, warmup: bool, progress) -> Dict[Tuple[int, str], List[float]]:
    """Seconds of one call of each level's block ((downsample, block, (sample, text)) in `levels`) per point,
    in interleaved rounds (every level's every point once per round), after an untimed round when warmup."""
    times: Dict[Tuple[int, str], List[float]] = {(d, name): [] for d, _, _ in levels for name, _ in pts}
    with torch.inference_mode():
        for k in range(-1 if warmup else 0, rounds):
            for d, block, (sample, text) in levels:
                for name, params in pts:
                    with Variant(block, name, params):
                        start = time.perf_counter()
                        block(sample, encoder_hidden_states=text)
                        took = time.perf_counter() - start
                    if k >= 0:
                        times[(d, name)].append(took)
            progress(f"round {k + 1}/{rounds} done" if k >= 0 else "warm-up done")
    return times


def plan_seconds(block, sample, params: Dict[str, Any], calls: int) -> float:
    """Median seconds of building the plan of `params` (ratio, sx/sy, match_window) on the block's
    input tokens: partition + matching + slot map (what a patched layer runs once per call)."""
    B, C, h, w = sample.shape
    x = sample.flatten(2).transpose(1, 2).contiguous()
    sx = sy = params.get("sx", 2)
    dst, src = matching.partition(h, w, sx, sy, torch.tensor(12345), "cpu")
    r = min(int(h * w * params["ratio"]), len(src))
    window = params.get("match_window")
    win = None if window is None else matching.LocalWindow(h, w, sx, sy, window)
    times = []
    with torch.inference_mode():
        ops.build_plan(x, dst, src, r, win)
        for _ in range(calls):
            start = time.perf_counter()
            ops.build_plan(x, dst, src, r, win)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_growth(block_dir: str, side: int, cross: int, name: str, params) -> float:
    """GiB: growth of peak RSS over one call of the block (side × side tokens) patched as `name`, in a
    fresh process."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", block_dir, str(side), str(cross),
                          json.dumps([name, params])], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_points(block_dir: str, px: int, side: int, cross: int, pts, names, say) -> Dict[str, float]:
    """Peak RSS growth (GiB) at px of the points `names` (see memory_names)."""
    mem = {}
    for name, params in pts:
        if name in names:
            mem[name] = peak_rss_growth(block_dir, side, cross, name, params)
            say(f"{px} px: {name}: peak RSS +{mem[name]:.2f} GiB")
    return mem


def memory_child(block_dir: str, side: int, cross: int, spec: str) -> None:
    from diffusers import Transformer2DModel

    name, params = json.loads(spec)
    block = Transformer2DModel.from_pretrained(block_dir).eval()
    inputs = block_inputs(block, side, cross)
    with Variant(block, name, params):
        with torch.inference_mode():
            block(*block_inputs(block, 8, cross)[:1], encoder_hidden_states=inputs[1])  # allocator warm-up
            before = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM (this process's peak RSS) to VmRSS
                fh.write("5")
            block(inputs[0], encoder_hidden_states=inputs[1])
            peak = _status_kib("VmHWM")
    print((peak - before) / 2 ** 20)


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (Linux). Not getrusage's ru_maxrss: a child started by fork +
    exec inherits its parent's peak there, which hides the child's own."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


def int_list(noun: str, ok, empty: bool = True):
    """argparse type: comma-separated integers for which ok(v) holds ('' is none when `empty`); one-line
    errors "expected ..." and "V is not NOUN"."""

    def parse(text: str) -> List[int]:
        values = cli.comma_list(int)(text)
        bad = [v for v in values if not ok(v)]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]} is not {noun}")
        if not values and not empty:
            raise argparse.ArgumentTypeError(f"expected at least one value, each {noun}")
        return list(values)

    return parse


def pixel_list(empty: bool = True):
    """argparse type: image sides in px, multiples of 8 (never rounded)."""
    return int_list("a multiple of 8 px ≥ 8 (8 px per latent token; not rounded)", lambda v: v >= 8 and v % 8 == 0,
                    empty)


window_list = int_list("an odd window k ≥ 1 (k × k cells)", lambda v: v >= 1 and v % 2 == 1)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd15", choices=("sd15", "sdxl", "tiny"))
    p.add_argument("--resolutions", type=pixel_list(empty=False), default=[1024, 1536, 2048],
                   help="image sides in px, multiples of 8 (and of 8 × each timed level's downsample)")
    p.add_argument("--windows", type=window_list, default=[3, 5], help="local windows k besides global matching "
                   "(odd, '' = global only)")
    p.add_argument("--prop-windows", type=window_list, default=[9], help="more windows for the settings with prop_attn")
    p.add_argument("--level", type=int_list("a downsample factor ≥ 1", lambda v: v >= 1, empty=False),
                   help="time the Transformer2DModels at this downsample instead of the highest-resolution level "
                   "(SDXL: 4 for its /4 level), or at several (2,4: both SDXL levels, every pair of settings "
                   "composed); the settings merge the timed levels alone")
    p.add_argument("--only", help="comma-separated setting names of SETTINGS (default: all); the memory is measured "
                   f"for these alone, and for {' / '.join(BASELINES)} when named too")
    p.add_argument("--top", type=cli.positive, default=30, help="composed pairs printed (best first; all in --out)")
    p.add_argument("--rounds", type=cli.positive, default=2)
    p.add_argument("--warmup", type=pixel_list(), default=[1024], help="resolutions at which every point gets an "
                   "untimed call first")
    p.add_argument("--rest-calls", type=cli.positive, default=1)
    p.add_argument("--check-full", type=pixel_list(), default=[1024], help="resolutions at which a whole unpatched "
                   "step is timed too (checks step = L · block + rest)")
    p.add_argument("--memory", type=pixel_list(), default=[1024, 2048], help="resolutions at which peak memory is "
                   "measured ('' = none)")
    p.add_argument("--memory-only", action="store_true", help="only the peak memory at --memory (no timing)")
    p.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--out")
    return p, p.parse_args(argv)


def level_rows(pts, times, plans, L: int, layers: int, others: float, rest: float, d: int) -> List[Dict[str, Any]]:
    """Rows of level d's points: block time, speed-ups of the block and of the step with this level's
    setting alone (`others`: the other timed levels' unpatched seconds), matching's share of the block."""
    base = statistics.median(times[(d, "no ToMe")])
    step0 = L * base + others + rest
    rows = []
    for name, params in pts:
        b = statistics.median(times[(d, name)])
        step = L * b + others + rest
        row = dict(setting=name, params=params, block_s=b, block_all=times[(d, name)], block_speedup=base / b,
                   step_s=step, step_speedup=step0 / step)
        if (d, name) in plans:
            builds = 1 if params.get("share_plan") else layers
            row["plan_s"] = plans[(d, name)]
            row["matching_share"] = plans[(d, name)] * builds / b
        rows.append(row)
    return rows


def composed(levels_rows: Dict[int, List[Dict[str, Any]]], counts: Dict[int, int], rest: float) -> List[Dict[str, Any]]:
    """Every combination of one point per level: step = Σ_d L_d · block_d + rest, speed-up against no ToMe
    at every level; best first."""
    base = rest + sum(counts[d] * rows[0]["block_s"] for d, rows in levels_rows.items())
    out = []
    for combo in itertools.product(*levels_rows.values()):
        step = rest + sum(counts[d] * row["block_s"] for d, row in zip(levels_rows, combo))
        out.append(dict(settings={d: row["setting"] for d, row in zip(levels_rows, combo)}, step_s=step,
                        step_speedup=base / step))
    return sorted(out, key=lambda c: -c["step_speedup"])


def main(argv=None) -> None:
    p, args = parse_args(argv)
    if args.memory_child:
        d, side, cross, spec = args.memory_child
        memory_child(d, int(side), int(cross), spec)
        return
    windows: List[Optional[int]] = [None] + args.windows
    settings, only = SETTINGS, None
    if args.only:
        only = [name.strip() for name in args.only.split(",") if name.strip()]
        known = [n for n, _ in SETTINGS] + list(BASELINES)
        unknown = set(only) - set(known)
        if unknown or not only:
            p.error(f"--only: unknown setting(s) {sorted(unknown)}; known: {known}")
        settings = tuple(s for s in SETTINGS if s[0] in only)
    if args.memory_only and not args.memory:
        p.error("--memory-only needs --memory resolutions")
    ARCH["name"] = args.arch
    cfg = bench.default_config("cpu", arch=args.arch, isolate=False)
    unet = bench.load_unet(cfg)
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    levels: Dict[int, Dict[str, Any]] = {}
    asked = args.level or [None]
    if len(set(asked)) < len(asked):
        p.error(f"--level {','.join(map(str, asked))}: a level is given twice")
    for level in asked:
        modules, downsample = finest_modules(unet, level)
        if not modules:
            p.error(f"--level {level}: {args.arch} has no transformer block at that downsample")
        for what in ("resolutions", "memory"):
            odd = [px for px in getattr(args, what) if px % (8 * downsample)]
            if odd:
                p.error(f"--{what}: {odd[0]} px is not a multiple of {8 * downsample} (8 px per latent token × the "
                        f"level's downsample {downsample}); not rounded")
        block = modules[0][0][modules[0][1]]
        block_dir = tempfile.mkdtemp(prefix=f"tomesd_highres_block{downsample}_")
        block.save_pretrained(block_dir)
        levels[downsample] = dict(modules=modules, block=block, dir=block_dir)
    pts = points(windows, args.prop_windows, settings)
    measured = memory_names(pts, only)
    about = {d: dict(modules=len(v["modules"]), channels=v["block"].config.in_channels,
                     layers=len(v["block"].transformer_blocks)) for d, v in levels.items()}
    result: Dict[str, Any] = dict(arch=args.arch, torch=torch.__version__, threads=torch.get_num_threads(),
                                  levels=about, load_before=load(), resolutions={})
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.memory_only:
        memory = {f"{px} px /{d}": memory_points(v["dir"], px, px // 8 // d, cross, pts, measured, say)
                  for px in args.memory for d, v in levels.items()}
        print("| px, level | " + " | ".join(memory[next(iter(memory))]) + " |")
        for key, mem in memory.items():
            print(f"| {key} | " + " | ".join(f"{v:.2f} GiB" for v in mem.values()) + " |")
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(dict(result, memory_gib=memory), fh, indent=1)
        return
    for px in args.resolutions:
        run_resolution(args, px, unet, cfg, cross, levels, pts, measured, result, say)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(dict(result, load_after=load()), fh, indent=1)


def run_resolution(args, px: int, unet, cfg, cross: int, levels, pts, measured, result, say) -> None:
    """Time and report one resolution: rest, every level's blocks, the composed pairs, memory (of the
    points `measured`)."""
    warm = px in args.warmup
    entry: Dict[str, Any] = dict(levels={})
    rest = step_times(unet, cfg, px, args.rest_calls, warm, skipped=[m for v in levels.values() for m in v["modules"]])
    entry["rest_s"] = statistics.median(rest)
    say(f"{px} px: rest of the step {entry['rest_s']:.1f} s ({load()})")
    inputs = {d: block_inputs(v["block"], px // 8 // d, cross) for d, v in levels.items()}
    times = block_rounds([(d, v["block"], inputs[d]) for d, v in levels.items()], pts, args.rounds, warm,
                         lambda t: say(f"{px} px: {t} ({load()})"))
    plans = {(d, n): plan_seconds(v["block"], inputs[d][0], params, 3)
             for d, v in levels.items() for n, params in pts if params is not None}
    counts = {d: len(v["modules"]) for d, v in levels.items()}
    base = {d: statistics.median(times[(d, "no ToMe")]) for d in levels}
    step0 = entry["rest_s"] + sum(counts[d] * base[d] for d in levels)
    for d, v in levels.items():
        others = sum(counts[o] * base[o] for o in levels if o != d)
        rows = level_rows(pts, times, plans, counts[d], len(v["block"].transformer_blocks), others, entry["rest_s"], d)
        entry["levels"][d] = dict(rows=rows, share=counts[d] * base[d] / step0)
        if px in args.memory:
            mem = memory_points(v["dir"], px, px // 8 // d, cross, pts, measured, say)
            for row in rows:
                if row["setting"] in mem:
                    row["peak_rss_growth_gib"] = mem[row["setting"]]
    if len(levels) > 1:
        entry["composed"] = composed({d: entry["levels"][d]["rows"] for d in levels}, counts, entry["rest_s"])
    if px in args.check_full:
        entry["full_step_s"] = statistics.median(step_times(unet, cfg, px, 1, warmup=True))
        say(f"{px} px: whole step {entry['full_step_s']:.1f} s against Σ L · block + rest = {step0:.1f} s")
    result["resolutions"][px] = entry
    report(args.arch, px, entry, counts, base, args.top)


def report(arch: str, px: int, entry: Dict[str, Any], counts, base, top: int) -> None:
    for d, level in entry["levels"].items():
        print(f"\n{arch} {px} px: level /{d} {level['share']:.0%} of an unpatched step ({counts[d]} × {base[d]:.1f} s "
              f"+ rest {entry['rest_s']:.1f} s" + (" + the other levels)" if len(counts) > 1 else ")"), flush=True)
        print("| setting | block (s) | block speed-up | step speed-up | matching share | peak RSS + (GiB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in level["rows"]:
            share = f"{row['matching_share']:.1%}" if "matching_share" in row else "—"
            mem_s = f"{row['peak_rss_growth_gib']:.2f}" if "peak_rss_growth_gib" in row else "—"
            print(f"| {row['setting']} | {row['block_s']:.2f} | {row['block_speedup']:.2f}× | "
                  f"{row['step_speedup']:.2f}× | {share} | {mem_s} |", flush=True)
    if "composed" in entry:
        share = sum(level["share"] for level in entry["levels"].values())
        print(f"\n{arch} {px} px: levels {', '.join(f'/{d}' for d in counts)} together {share:.0%} of a step "
              f"(ceiling {1 / max(1e-9, 1 - share):.2f}×); best {min(top, len(entry['composed']))} of "
              f"{len(entry['composed'])} pairs")
        print("| " + " | ".join(f"setting at /{d}" for d in counts) + " | step speed-up |")
        print("| " + " | ".join("---" for _ in counts) + " | --- |")
        for c in entry["composed"][:top]:
            print("| " + " | ".join(c["settings"][d] for d in counts) + f" | {c['step_speedup']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()

"""Whole UNet steps (no composition): per-step speed-up of token merging settings at high resolution on
a CPU, tomesd 0.1.3 side by side, every setting timed in interleaved rounds.

bench_highres.py composes a step as L · block + rest; this script times the real thing — one
classifier-free-guidance UNet call (2 × --batch latents at px / 8, text states [.., 77, C]) per setting
and round, in turn, after one untimed call per setting when --warmup — so what a setting does outside
its blocks (plan building, merge / unmerge copies, a second merged level) is in the number. The
settings merge at the levels their keywords say (max_downsample None: the finest transformer level).
tomesd 0.1.3 is its algorithm (benchmarks/tomesd013.py) hooked around attn1 of every transformer layer
at the finest level, ratio 0.5, 2×2 cells (its default). Medians per setting; the band is the lowest
and highest single-round speed-up against "no ToMe" of the same round.

    python benchmarks/bench_steps.py --resolutions 1024 --batch 2 --rounds 2 --out steps_1024.json
    python benchmarks/bench_steps.py --resolutions 2048 --rounds 1 --only "no ToMe,default,preset"
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tomesd  # noqa: E402
from tomesd import bench  # noqa: E402
from tomesd.tools import cli  # noqa: E402

import bench_highres  # noqa: E402  (finest_modules, reference_hooks: shared with the composed bench)

NONE, REFERENCE = "no ToMe", "tomesd 0.1.3"
PRESET = dict(ratio=0.9, sx=4, sy=4, prop_attn=True)
SETTINGS: Tuple[Tuple[str, Optional[Dict[str, Any]]], ...] = (  # name → apply_patch keywords
    (NONE, None),
    (REFERENCE, None),
    ("default", dict(ratio=0.5)),
    ("default k=3", dict(ratio=0.5, match_window=3)),
    ("default k=5", dict(ratio=0.5, match_window=5)),
    ("default /2", dict(ratio=0.5, max_downsample=2)),
    ("0.7 prop", dict(ratio=0.7, prop_attn=True)),
    ("0.7 prop k=5", dict(ratio=0.7, prop_attn=True, match_window=5)),
    ("0.7 prop k=9", dict(ratio=0.7, prop_attn=True, match_window=9)),
    ("preset 0.8", dict(PRESET, ratio=0.8)),
    ("preset", dict(PRESET)),
    ("preset k=9", dict(PRESET, match_window=9)),
    ("preset k=17", dict(PRESET, match_window=17)),
    ("preset /2", dict(PRESET, max_downsample=2)),
)


class Setting:
    """One setting's patch on the whole UNet: applied (untimed) before its call, removed after."""

    def __init__(self, unet, finest, name: str, params: Optional[Dict[str, Any]]):
        self.unet, self.finest, self.name, self.params, self.handles = unet, finest, name, params, []

    def __enter__(self):
        if self.name == REFERENCE:
            for attentions, i in self.finest:
                self.handles += bench_highres.reference_hooks(attentions[i])
        elif self.params is not None:
            tomesd.apply_patch(self.unet, seed=1, **self.params)
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        tomesd.remove_patch(self.unet)


def rounds(unet, finest, settings, inputs, count: int, warmup: bool, say) -> Dict[str, List[float]]:
    """Seconds per whole step: every setting once per round, in turn."""
    args, kwargs = inputs
    times: Dict[str, List[float]] = {name: [] for name, _ in settings}
    with torch.inference_mode():
        for k in range(-1 if warmup else 0, count):
            for name, params in settings:
                with Setting(unet, finest, name, params):
                    start = time.perf_counter()
                    unet(*args, **kwargs)
                    took = time.perf_counter() - start
                if k >= 0:
                    times[name].append(took)
                say(f"  {name}: {took:.1f} s{'' if k >= 0 else ' (warm-up)'}")
            say(f"round {k + 1}/{count} done ({load()})" if k >= 0 else f"warm-up done ({load()})")
    return times


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


def table(times: Dict[str, List[float]]) -> List[Dict[str, Any]]:
    base = times[NONE]
    rows = []
    for name, ts in times.items():
        per_round = [b / t for b, t in zip(base, ts)]
        rows.append(dict(setting=name, step_s=statistics.median(ts), all_s=ts,
                         speedup=statistics.median(base) / statistics.median(ts),
                         band=(min(per_round), max(per_round))))
    return rows


def main(argv=None) -> int:
    names = [name for name, _ in SETTINGS]
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd15", choices=("sd15", "sd21", "sdxl", "tiny"))
    p.add_argument("--resolutions", type=cli.comma_list(int), default=[1024], help="image sides in px, multiples of 64")
    p.add_argument("--batch", type=cli.positive, default=1, help="images per step (the UNet sees twice as many)")
    p.add_argument("--rounds", type=cli.positive, default=2)
    p.add_argument("--no-warmup", action="store_true", help="no untimed call per setting first")
    p.add_argument("--only", help=f"comma-separated setting names (default: all): {', '.join(names)}")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    bad = [px for px in args.resolutions if px < 64 or px % 64]
    if bad:
        p.error(f"--resolutions: multiples of 64 px ≥ 64, got {bad}")
    settings = list(SETTINGS)
    if args.only:
        keep = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(keep) - set(names))
        if unknown:
            p.error(f"--only: unknown setting(s) {unknown}; known: {names}")
        settings = [s for s in SETTINGS if s[0] in keep or s[0] == NONE]
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    bench_highres.ARCH["name"] = args.arch
    cfg = bench.default_config("cpu", arch=args.arch, isolate=False, batch=args.batch)
    unet = bench.load_unet(cfg)
    finest, downsample = bench_highres.finest_modules(unet)
    result: Dict[str, Any] = dict(arch=args.arch, batch=args.batch, rows_per_call=2 * args.batch, torch=torch.__version__,
                                  threads=torch.get_num_threads(), finest_downsample=downsample, load_before=load(),
                                  resolutions={})
    say(f"{args.arch}, batch {args.batch} ({2 * args.batch} rows per call), torch threads {torch.get_num_threads()}, "
        f"{len(settings)} settings, {args.rounds} round(s) ({load()})")
    for px in args.resolutions:
        inputs = bench.unet_inputs(unet, cfg, px)
        say(f"{px} px:")
        times = rounds(unet, finest, settings, inputs, args.rounds, not args.no_warmup, say)
        rows = table(times)
        result["resolutions"][px] = rows
        print(f"\n{args.arch} {px} px, batch {args.batch}, {args.rounds} interleaved round(s), whole steps ({load()})")
        print("| setting | step (s) | speed-up | band |")
        print("| --- | --- | --- | --- |")
        for row in rows:
            print(f"| {row['setting']} | {row['step_s']:.1f} | {row['speedup']:.2f}× | "
                  f"{row['band'][0]:.2f}–{row['band'][1]:.2f}× |", flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(dict(result, load_after=load()), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

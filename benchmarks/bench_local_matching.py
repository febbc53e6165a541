"""Matching alone, global against local (match_window=k), and its share of a merged SD 1.5 block, on a CPU.

For each image size (px; the latent grid is px / 8 per side, N = (px / 8)² tokens at SD 1.5's finest
level, C = 320) this times the plan building (partition + matching + slot map: `ops.build_plan`, what a
patched block runs once per call) on a random metric [B, N, C], for global matching and each window.
At the sizes in --block-sizes it also times one forward of an SD 1.5 finest-level Transformer2DModel
(random weights, real sizes: C = 320, 8 heads, text [B, 77, 768]) patched with the same ratio and window,
and reports the matching's share of it. Settings are timed round-robin for --rounds rounds (medians),
after one warm-up each.

    python benchmarks/bench_local_matching.py --sizes 1024,2048 --windows 3,5 --block-sizes 1024 --out local.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tomesd  # noqa: E402
from tomesd import matching, ops  # noqa: E402


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def finest_block(channels: int):
    """SD 1.5's finest-level Transformer2DModel (one BasicTransformerBlock), random weights."""
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    return Transformer2DModel(num_attention_heads=8, attention_head_dim=channels // 8, in_channels=channels,
                              cross_attention_dim=768, norm_num_groups=32).eval()


def plan_timer(batch: int, grid: int, channels: int, ratio: float, window: Optional[int]):
    """(setup, timed) callables: building one plan on a fixed random metric (global matching for window None)."""
    g = torch.Generator().manual_seed(grid)
    metric = torch.randn(batch, grid * grid, channels, generator=g)
    dst, src = matching.partition(grid, grid, 2, 2, torch.tensor(12345), "cpu")
    r = min(int(grid * grid * ratio), len(src))
    win = None if window is None else matching.LocalWindow(grid, grid, 2, 2, window)
    return (lambda: None), (lambda: ops.build_plan(metric, dst, src, r, win))


def block_timer(block, batch: int, grid: int, ratio: float, window: Optional[int]):
    """(setup, timed) callables: patching the block with `ratio` and `window` (ratio 0: unpatched), and
    running it once."""
    g = torch.Generator().manual_seed(grid + 1)
    sample = torch.randn(batch, block.config.in_channels, grid, grid, generator=g)
    text = torch.randn(batch, 77, 768, generator=g)

    def setup():
        tomesd.remove_patch(block)
        if ratio > 0:
            tomesd.apply_patch(block, ratio=ratio, match_window=window, seed=1, max_downsample=1)

    def run():
        with torch.no_grad():
            block(sample, encoder_hidden_states=text)
    return setup, run


def rounds(timers: Dict[str, tuple], count: int) -> Dict[str, float]:
    """Median seconds of each (setup, timed) pair's timed call over `count` interleaved rounds, after one
    warm-up each; setup runs untimed before every call."""
    for setup, fn in timers.values():
        setup()
        fn()
    times: Dict[str, List[float]] = {name: [] for name in timers}
    for _ in range(count):
        for name, (setup, fn) in timers.items():
            setup()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,2048", help="image sides in px (grid = px / 8)")
    parser.add_argument("--windows", default="3,5", help="local windows k to time besides global matching")
    parser.add_argument("--block-sizes", default="1024", help="sizes at which a merged block is timed too ('' = none)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    windows: List[Optional[int]] = [None] + _ints(args.windows)
    names = {w: "global" if w is None else f"local k={w}" for w in windows}
    block = finest_block(args.channels) if args.block_sizes else None
    results = []
    for px in _ints(args.sizes):
        grid = px // 8
        plans = rounds({names[w]: plan_timer(args.batch, grid, args.channels, args.ratio, w) for w in windows},
                       args.rounds)
        blocks = {}
        if block is not None and px in _ints(args.block_sizes):
            timers = {names[w]: block_timer(block, args.batch, grid, args.ratio, w) for w in windows}
            timers["no ToMe"] = block_timer(block, args.batch, grid, 0.0, None)
            blocks = rounds(timers, args.rounds)
        for w in windows:
            row = dict(px=px, tokens=grid * grid, matching=names[w], plan_s=plans[names[w]])
            if blocks:
                row.update(block_s=blocks[names[w]], share=plans[names[w]] / blocks[names[w]],
                           block_no_tome_s=blocks["no ToMe"])
            results.append(row)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    print(f"# {machine}; batch {args.batch}, C = {args.channels}, ratio {args.ratio}, 2x2 cells, fp32, "
          f"medians of {args.rounds} rounds")
    print("| px | N | matching | plan (s) | merged block (s) | share of the block |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in results:
        block_s = f"{row['block_s']:.2f}" if "block_s" in row else "—"
        share = f"{100 * row['share']:.1f}%" if "share" in row else "—"
        print(f"| {row['px']} | {row['tokens']:,} | {row['matching']} | {row['plan_s']:.3f} | {block_s} | {share} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine=machine, args=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()

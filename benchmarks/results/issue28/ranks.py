"""Issue 28: photos-sdxl / photos-flux quality per setting and size, and rank agreement with the photos model.

    python benchmarks/results/issue28/ranks.py --model benchmarks/results/issue28/sdxl/*.json \
        --photos benchmarks/results/issue18/*.json benchmarks/results/issue19/quality/*.json --pair 64:32,128:64,256:128

Prints (1) one markdown table per size: each setting's mean PSNR (pooled over the images, as
tomesd.quality), its worst image (the lowest per-image PSNR and which image: results.json's tile_psnr
and columns), SSIM and classifier accuracy (the unpatched row's accuracy in the heading); (2) per size
pair MODEL:PHOTOS, the Spearman correlation between the PSNR rankings of the settings both models
have, and the settings whose rank moves most. Settings are joined on pareto.py's canonical key
(apply_patch's defaults filled in) plus match_window (benchmarks/photos_ranks.py's join has none).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from pareto import canonical, label  # noqa: E402
from photos_ranks import ranks, spearman  # noqa: E402
from tomesd.tools.cli import fmt  # noqa: E402


def key_of(params: dict) -> Tuple:
    params = dict(params)
    window = params.pop("match_window", None)
    return canonical(params, params.pop("ratio")) + (None if window in (None, "none") else int(window),)


def name(key: Tuple) -> str:
    window = key[-1]
    return label(key[:-1]) + ("" if window is None else f", window {window}")


def load(paths: List[str]) -> Tuple[Dict[int, Dict[Tuple, dict]], Dict[int, dict]]:
    """(size → key → row with 'worst' added, size → the unpatched row), from tomesd.quality results.json files;
    the first file with a key wins."""
    rows: Dict[int, Dict[Tuple, dict]] = {}
    base: Dict[int, dict] = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        size = int(result["environment"]["config"]["height"])
        columns = result["columns"]
        for row, tiles in zip(result["rows"], result["tile_psnr"]):
            if not row["params"]:
                base.setdefault(size, row)
                continue
            worst = min(range(len(tiles)), key=lambda j: tiles[j])
            rows.setdefault(size, {}).setdefault(key_of(row["params"]), dict(row, worst=(tiles[worst], *columns[worst])))
    return rows, base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", required=True, help="tomesd.quality results.json files of photos-sdxl or photos-flux")
    p.add_argument("--photos", nargs="+", required=True, help="results.json files of the photos model (issues 18, 19)")
    p.add_argument("--pair", default="", help="size pairs MODEL:PHOTOS to rank, e.g. 64:32,128:64,256:128")
    p.add_argument("--movers", type=int, default=3)
    args = p.parse_args(argv)
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in args.pair.split(",") if item]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError
    except ValueError:
        p.error(f"argument --pair: expected sizes MODEL:PHOTOS separated by commas, e.g. 64:32,128:64; got {args.pair!r}")
    model, base = load(args.model)
    photos, _ = load(args.photos)
    for size in sorted(model):
        acc = base.get(size, {}).get("accuracy")
        print(f"\n{size} px (unpatched accuracy {fmt(acc, '.2f')}, {base.get(size, {}).get('images', '?')} images)\n")
        print("| setting | PSNR | worst image (PSNR, photograph, seed) | SSIM | accuracy |\n| --- | --- | --- | --- | --- |")
        for key in sorted(model[size], key=lambda k: (k[0], name(k))):
            row = model[size][key]
            psnr, photo, seed = row["worst"]
            print(f"| {name(key)} | {fmt(row['psnr'], '.1f')} | {fmt(psnr, '.1f')} ({photo}, {seed}) | "
                  f"{fmt(row['ssim'], '.3f')} | {fmt(row['accuracy'], '.2f')} |")
    print()
    for mine, theirs in pairs:
        common = [k for k in model.get(mine, {}) if k in photos.get(theirs, {})]
        if len(common) < 3:
            print(f"{mine} px vs photos {theirs} px: {len(common)} settings in common, no correlation")
            continue
        a = [photos[theirs][k]["psnr"] for k in common]
        b = [model[mine][k]["psnr"] for k in common]
        ra, rb = ranks(a), ranks(b)
        moves = sorted(range(len(common)), key=lambda i: -abs(ra[i] - rb[i]))[:args.movers]
        moved = "; ".join(f"{name(common[i])}: {ra[i]:g} → {rb[i]:g}" for i in moves)
        print(f"{mine} px vs photos {theirs} px: Spearman {spearman(a, b):.2f} over {len(common)} settings "
              f"(PSNR rank photos → this model); most moved: {moved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

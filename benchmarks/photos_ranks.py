"""Issue 18: the photos model's quality per setting and size, and its rank agreement with the digits model.

    python benchmarks/photos_ranks.py --photos photos-quality/*/*/results.json \
        --digits benchmarks/results/issue11/quality/*.json

Prints (1) one markdown table: each setting's PSNR / SSIM / classifier accuracy on the photos model at
every size measured, and its PSNR on the digits model; (2) per size, the Spearman correlation between
the PSNR rankings of the settings both models have, and the settings whose rank moves most. Settings
are joined on pareto.py's canonical key (apply_patch defaults filled in).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pareto import canonical, label, load_quality  # noqa: E402
from tomesd.tools.cli import fmt  # noqa: E402


def load_photos(paths: List[str]) -> Dict[int, Dict[Tuple, dict]]:
    """size → canonical key → row, from tomesd.quality results.json files (the size from their config)."""
    out: Dict[int, Dict[Tuple, dict]] = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        size = int(result["environment"]["config"]["height"])
        for row in result["rows"]:
            params = dict(row["params"] or {})
            if "ratio" in params:
                out.setdefault(size, {}).setdefault(canonical(params, params.pop("ratio")), row)
    return out


def ranks(values: List[float]) -> List[float]:
    """1 = highest value; ties share their mean rank."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: List[float], b: List[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", nargs="+", required=True, help="tomesd.quality results.json files of --model photos")
    p.add_argument("--digits", nargs="+", required=True, help="results.json files of the digits model (issue 11)")
    p.add_argument("--movers", type=int, default=3)
    args = p.parse_args(argv)
    photos, digits = load_photos(args.photos), load_quality(args.digits)
    sizes = sorted(photos)
    keys = sorted({k for rows in photos.values() for k in rows}, key=lambda k: (k[0], label(k)))
    head = ["setting", *(f"{s} px PSNR / SSIM / acc" for s in sizes), "digits PSNR"]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for key in keys:
        cells = [label(key)]
        for size in sizes:
            row = photos[size].get(key)
            cells.append("-" if row is None else f"{fmt(row['psnr'], '.1f')} / {fmt(row['ssim'], '.3f')} / {fmt(row['accuracy'], '.2f')}")
        cells.append(fmt(digits[key]["psnr"], '.1f') if key in digits else "-")
        print("| " + " | ".join(cells) + " |")
    print()
    for size in sizes:
        common = [k for k in keys if k in photos[size] and k in digits]
        if len(common) < 3:
            print(f"{size} px: {len(common)} settings in common with the digits model, no correlation")
            continue
        a = [digits[k]["psnr"] for k in common]
        b = [photos[size][k]["psnr"] for k in common]
        rho = spearman(a, b)
        ra, rb = ranks(a), ranks(b)
        moves = sorted(range(len(common)), key=lambda i: -abs(ra[i] - rb[i]))[:args.movers]
        moved = "; ".join(f"{label(common[i])}: {ra[i]:g} → {rb[i]:g}" for i in moves)
        print(f"{size} px: Spearman {rho:.2f} over {len(common)} settings (PSNR rank digits → photos); most moved: {moved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

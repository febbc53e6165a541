"""Speed (tomesd.bench) against quality (tomesd.quality): one table per resolution and its Pareto front.

Reads one bench results.json (speed: per resolution, setting and ratio) and one or more quality
results.json (PSNR / SSIM / accuracy against the unpatched model), matches their settings on
(ratio, mode, prop_attn, share_plan, plan_every) with apply_patch's defaults filled in (prop_attn:
on in kv mode), and prints Markdown: for each resolution of the bench, every setting measured by both,
a mark on those on the Pareto front (no other setting has at least its speedup and at least its PSNR,
one of them higher), and how each compares with tokens mode at ratio 0.5.

    python benchmarks/pareto.py --speed bench/results.json --quality q1/results.json q2/results.json
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Any, Dict, List, Tuple

KEYS = ("mode", "prop_attn", "share_plan", "plan_every")


def canonical(params: Dict[str, Any], ratio: float) -> Tuple:
    """(ratio, mode, prop_attn, share_plan, plan_every) with apply_patch's defaults for a UNet."""
    mode = params.get("mode") or "tokens"
    prop = params.get("prop_attn")
    prop = mode == "kv" if prop is None else bool(prop)
    return (round(float(ratio), 4), mode, prop, bool(params.get("share_plan", False)), int(params.get("plan_every", 1)))


def label(key: Tuple) -> str:
    ratio, mode, prop, share, every = key
    parts = [mode + ("+prop" if prop else (" no prop" if mode == "kv" else ""))]
    if share:
        parts.append("share_plan")
    if every > 1:
        parts.append(f"plan_every {every}")
    return f"{', '.join(parts)} @ {ratio:g}"


def load_quality(paths: List[str]) -> Dict[Tuple, Dict[str, Any]]:
    """canonical key → quality row (the first file that has it wins)."""
    out: Dict[Tuple, Dict[str, Any]] = {}
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["rows"]
        for row in rows:
            params = dict(row["params"] or {})
            if "ratio" not in params:
                continue  # the unpatched row
            out.setdefault(canonical(params, params.pop("ratio")), row)
    return out


def pareto(points: List[Tuple[float, float]]) -> List[bool]:
    """For (speedup, psnr) points, whether each is on the front (maximizing both)."""
    flags = []
    for i, (s, q) in enumerate(points):
        dominated = any(s2 >= s and q2 >= q and (s2 > s or q2 > q) for j, (s2, q2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def _f(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def tables(speed_path: str, quality_paths: List[str]) -> str:
    with open(speed_path) as f:
        speed_rows = json.load(f)["rows"]
    quality = load_quality(quality_paths)
    out = []
    for res in dict.fromkeys(r["resolution"] for r in speed_rows):
        rows = []
        for r in speed_rows:
            if r["resolution"] != res or r["method"] != "tome" or r["speedup"] is None:
                continue
            key = canonical(r["params"] or {}, r["ratio"])
            q = quality.get(key)
            if q is not None:
                rows.append((key, r, q))
        ref = next((r["speedup"] for key, r, _ in rows if key == canonical({}, 0.5)), None)
        front = pareto([(r["speedup"], q["psnr"]) for _, r, q in rows])
        ref_psnr = quality.get(canonical({}, 0.5), {}).get("psnr")
        out.append(f"\n{res} px (speed: SD 1.5 UNet; quality: reference digits model)\n")
        out.append("| setting | ms/step | speedup | ÷ tokens@0.5 speedup | PSNR dB | SSIM | accuracy | Pareto |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        order = sorted(range(len(rows)), key=lambda i: -rows[i][1]["speedup"])
        for i in order:
            key, r, q = rows[i]
            rel = r["speedup"] / ref if ref else None
            mark = "**front**" if front[i] else ""
            if rel is not None and rel >= 1.3 and ref_psnr is not None and q["psnr"] >= ref_psnr:
                mark += " (≥1.3× at ≥ PSNR)"
            out.append(f"| {label(key)} | {_f(r['ms_per_step'], '.0f')} | {_f(r['speedup'], '.2f')}x | {_f(rel, '.2f')}x | "
                       f"{_f(q['psnr'], '.2f')} | {_f(q['ssim'], '.4f')} | {_f(q['accuracy'], '.2f')} | {mark} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speed", required=True, help="tomesd.bench results.json")
    p.add_argument("--quality", nargs="+", required=True, help="tomesd.quality results.json files")
    args = p.parse_args()
    print(tables(args.speed, args.quality))


if __name__ == "__main__":
    main()

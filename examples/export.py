#!/usr/bin/env python
"""Export a patched UNet, run the exported model, compare it to eager, and time it against the unpatched export.

    python examples/export.py --format onnx --arch tiny --size 64                  # seconds to minutes on a CPU
    python examples/export.py --format openvino --arch sd15 --size 512 --patch ratio=0.9,sx=4,sy=4,prop_attn=true
    python examples/export.py --format aoti --arch sd15 --size 1024 --rounds 6

--arch: a built-in UNet with random weights (tomesd.tools.archs: sd15, sd21, or tiny, a toy at 1/10
width); speed does not depend on the weights. --format: torch (torch.export, run as its module), aoti
(AOTInductor, needs a C++ compiler), onnx (onnxruntime) or openvino (the ONNX file on OpenVINO's CPU
plugin); onnx and openvino need `pip install -e ".[export]"`. --patch: apply_patch's keywords
(default: its defaults).

It prints the largest relative difference between the exported patched model and the eager patched
one at two timesteps, then the time per call of the exported unpatched and patched models, measured in
interleaved rounds (every model once per round, in turn), each median with the patched model's speed-up
and its noise band (the lowest and highest speed-up of one round).
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch

import tomesd
from tomesd.tools import archs, cli, deploy, timing

UNETS = ("sd15", "sd21", "tiny")


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--format", choices=deploy.FORMATS, default="torch")
    p.add_argument("--arch", choices=UNETS, default="tiny")
    p.add_argument("--size", type=cli.bounded(int, "a size in px", lambda v: v >= 64 and v % 64 == 0,
                                              "a multiple of 64 (≥ 64)"), default=64, help="image side in px")
    p.add_argument("--batch", type=cli.bounded(int, "a batch size", lambda v: v >= 1, "≥ 1"), default=2,
                   help="default 2: classifier-free guidance's batch")
    p.add_argument("--patch", type=cli.setting, default={}, metavar="KEY=VALUE,...",
                   help="apply_patch keywords, e.g. ratio=0.9,sx=4,sy=4,prop_attn=true")
    p.add_argument("--rounds", type=cli.bounded(int, "a number of rounds", lambda v: v >= 1, "≥ 1"), default=4)
    p.add_argument("--calls", type=cli.bounded(int, "a number of calls", lambda v: v >= 1, "≥ 1"), default=2,
                   help="calls per model per round")
    p.add_argument("--warmup", type=cli.bounded(int, "a number of calls", lambda v: v >= 0, "≥ 0"), default=1)
    p.add_argument("--threads", type=cli.bounded(int, "a number of threads", lambda v: v >= 1, "≥ 1"), default=None,
                   help="torch threads (default: the physical cores)")
    return p


def run(fmt: str, arch: str, size: int, batch: int, patch: dict, rounds: int, calls: int, warmup: int) -> dict:
    """Export the unpatched and the patched UNet to fmt, compare the patched one to eager, time both."""
    spec = archs.ARCHS[arch]
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel(**spec.config).eval().requires_grad_(False)
    patched = UNet2DConditionModel(**spec.config).eval().requires_grad_(False)
    patched.load_state_dict(base.state_dict())
    tomesd.apply_patch(patched, **patch)
    args, kwargs = deploy.unet_call(spec.config, size, batch, spec.text_len)
    with tempfile.TemporaryDirectory() as base_dir, tempfile.TemporaryDirectory() as patched_dir:
        runners = [deploy.build(base, args, kwargs, fmt, base_dir), deploy.build(patched, args, kwargs, fmt, patched_dir)]
        errors = []
        for t in (999, 499):
            call = (args[0], torch.tensor(t)), kwargs
            with torch.no_grad():
                errors.append(deploy.max_rel_error(runners[1](*call[0], **call[1]), patched(*call[0], **call[1]).sample))
        times = deploy.interleaved(runners, args, kwargs, rounds, calls, warmup)
    return dict(format=fmt, arch=arch, size=size, patch=patch, max_rel_error=max(errors), unpatched=times[0],
                patched=times[1])


def report(result: dict, threads: int) -> str:
    base, patched = result["unpatched"], result["patched"]
    band = ("" if patched["speedup_min"] is None
            else f" (noise band {patched['speedup_min']:.2f}–{patched['speedup_max']:.2f}×, {patched['verdict']})")
    label = cli.setting_label(result["patch"]) or cli.DEFAULTS_LABEL
    return "\n".join([
        f"{result['format']}: {result['arch']} UNet at {result['size']} px, {label}, {threads} thread(s)",
        f"  max relative error, exported patched vs eager patched: {result['max_rel_error']:.2e}",
        f"  unpatched export: {base['median_ms']:.1f} ms/call (median)",
        f"  patched export:   {patched['median_ms']:.1f} ms/call, speed-up {patched['speedup']:.2f}×{band}",
    ])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prog = "export.py"
    problem = deploy.missing(args.format)
    if not problem:
        try:
            tomesd.ToMeConfig(**args.patch)
        except (TypeError, ValueError) as error:
            problem = f"--patch: {cli.error_line(error)}"
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    threads = args.threads or timing.physical_cores()
    torch.set_num_threads(threads)
    for line in timing.load_warnings(timing.load_average(), threads):
        print(f"warning: {line}", file=sys.stderr)
    try:
        result = run(args.format, args.arch, args.size, args.batch, args.patch, args.rounds, args.calls, args.warmup)
    except Exception as error:  # noqa: BLE001 - one line, as every problem of the examples
        print(f"{prog}: error: {cli.error_line(error)}", file=sys.stderr)
        return 1
    print(report(result, threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Generate an image with Token Merging and save it with its merges overlaid.

    python examples/visualize_merges.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a corgi on a sofa" \\
        --ratio 0.5 --step 10 --out merges.png --image-out image.png

Each latent token of the chosen block (at --step, the denoising step, counted from 0) is colored by
the destination it merged into: one color per group of merged tokens, grey for tokens left alone.
Groups that follow object parts show where ToMe averages similar content; groups that cross edges
point at where artifacts can come from. --row picks the batch row: -1, the default, is the
conditional half of classifier-free guidance.
"""
from __future__ import annotations

import argparse
import sys

import tomesd
from tomesd import models
from tomesd.cli import error_line
from tomesd.visualize import MergeRecorder, overlay


def _ratio(text: str) -> float:
    try:
        value = float(text)
        tomesd.ToMeConfig(ratio=value)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True,
                   help="local diffusers pipeline directory, hub id, or 'reference' (the digits model: --prompt a digit)")
    p.add_argument("--prompt", default="a photograph of a corgi sitting on a red sofa")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", type=_ratio, default=0.5)
    p.add_argument("--step", type=int, default=None, help="denoising step to show (default: the middle one)")
    p.add_argument("--block", type=int, default=None, help="tomesd block index (default: the first merged one)")
    p.add_argument("--level", type=int, default=None, help="downsample level of the block (1 = latent resolution)")
    p.add_argument("--row", type=int, default=-1, help="batch row (default -1: the conditional pass)")
    p.add_argument("--alpha", type=float, default=0.55, help="opacity of the colors (1: colors only)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default="merges.png", help="PNG of the image with the merges overlaid")
    p.add_argument("--image-out", default=None, help="also save the plain image here")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.height % 8 or args.width % 8 or min(args.height, args.width) < 64:
        parser.error("--height and --width must be multiples of 8, at least 64")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    step = args.steps // 2 if args.step is None else args.step
    if not 0 <= step < args.steps:
        parser.error(f"--step must be in [0, {args.steps}), got {step}")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")

    problem = models.model_problem(args.model, "pipeline", hub=False)
    if problem:
        parser.error(f"--model {problem}")
    if models.reference_dir(args.model) is not None:
        from tomesd.reference import parse_digit

        try:
            parse_digit(args.prompt)
        except ValueError as error:
            parser.error(f"--prompt: {error}")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = models.load_pipeline(args.model, dtype=models.DTYPES["fp16" if device.startswith("cuda") else "fp32"],
                                    device=device)
    except Exception as error:  # noqa: BLE001 - a missing hub id, a broken directory: one line each
        sys.exit(f"error: cannot load --model {args.model!r}: {error_line(error)}")
    tomesd.apply_patch(pipe, ratio=args.ratio, seed=args.seed)
    with MergeRecorder(pipe, steps=[step]) as recorder:
        image = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
    try:
        snapshot = recorder.get(step=step, block=args.block, level=args.level)
    except KeyError as error:
        sys.exit(f"error: {error.args[0]}")
    overlay(image, snapshot, row=args.row, alpha=args.alpha).save(args.out)
    if args.image_out:
        image.save(args.image_out)
    merged = snapshot.merged_tokens(args.row)
    h, w = snapshot.grid
    print(f"{args.out}: step {step}, block {snapshot.block} ({h}x{w} tokens at /{snapshot.downsample}): "
          f"{merged} of {h * w} tokens merged, {h * w - merged} rows left")
    return 0


if __name__ == "__main__":
    sys.exit(main())

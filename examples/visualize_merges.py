#!/usr/bin/env python
"""Generate an image with Token Merging and save it with its merges overlaid.

    python examples/visualize_merges.py --model reference --prompt 3 --out merges.png   # offline, seconds on a CPU
    python examples/visualize_merges.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a corgi on a sofa" \\
        --ratio 0.5 --step 10 --out merges.png --image-out image.png

--model: a shipped model by name (listed under --model), any local diffusers pipeline directory, or a
hub id. Sizes default to the model's own (512 px for SD 1.5, 16 px for the digits
model, 32 px for the photos model) and may be any multiple the model takes (8 px for SD's VAE, 2 px
for the pixel-space reference models); a size a shipped model does not draw well is said. On a CPU
torch's threads are the free cores (--threads to override; tomesd.tools.threads).

Each latent token of the chosen block (at --step, the denoising step, counted from 0) is colored by
the destination it merged into: one color per group of merged tokens, grey for tokens left alone.
Groups that follow object parts show where ToMe averages similar content; groups that cross edges
point at where artifacts can come from. --row picks the batch row (default: the conditional pass
of classifier-free guidance).
"""
from __future__ import annotations

import argparse
import sys

import tomesd
from tomesd.tools import cli, models, threads
from tomesd.visualize import MergeRecorder, overlay


def _ratio(text: str) -> float:
    try:
        value = float(text)
        tomesd.ToMeConfig(ratio=value)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


TEXT_PROMPT = "a photograph of a corgi sitting on a red sofa"


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help=models.model_help())
    p.add_argument("--prompt", default=None, help=f"default: {TEXT_PROMPT!r}; a reference model: its first class")
    p.add_argument("--height", type=int, default=None, help="px (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help="px (default: the model's size)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", type=_ratio, default=0.5)
    p.add_argument("--step", type=int, default=None, help="denoising step to show (default: the middle one)")
    p.add_argument("--block", type=int, default=None, help="tomesd block index (default: the first merged one)")
    p.add_argument("--level", type=int, default=None, help="downsample level of the block (1 = latent resolution)")
    p.add_argument("--row", type=int, default=None, help="batch row (default: the conditional pass of the last "
                   "image: -1 for diffusers pipelines, which put it last, 0 for the reference models, which put it first)")
    p.add_argument("--alpha", type=float, default=0.55, help="opacity of the colors (1: colors only)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default="merges.png", help="PNG of the image with the merges overlaid")
    p.add_argument("--image-out", default=None, help="also save the plain image here")
    p.add_argument("--threads", type=cli.positive, help="torch threads on a CPU (default: OMP_NUM_THREADS when set, "
                   "else the free cores)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = models.load_pipeline(args.model, dtype=models.DTYPES["fp16" if device.startswith("cuda") else "fp32"],
                                    device=device)
    except Exception as error:  # noqa: BLE001 - a missing hub id, a broken directory: one line each
        parser.error(f"--model {args.model}: cannot load it ({cli.error_line(error)})")
    if args.row is None:
        args.row = 0 if models.is_class_pipeline(pipe) else -1
    if args.prompt is None:
        args.prompt = 0 if models.is_class_pipeline(pipe) else TEXT_PROMPT
    size = models.pipeline_size(pipe)
    args.height, args.width = args.height or size, args.width or size
    problem = models.prompt_problem(pipe, args.prompt) or models.size_problem(pipe, args.height, args.width)
    if problem:
        parser.error(problem)
    if not device.startswith("cuda"):
        threads.set_threads(args.threads)  # after every check: an error stays one line
    note = models.size_note(args.model, args.height, args.width)
    if note:
        print(note, file=sys.stderr)
    tomesd.apply_patch(pipe, ratio=args.ratio, seed=args.seed)
    extra = {} if args.guidance is None else {"guidance_scale": args.guidance}
    with MergeRecorder(pipe, steps=[step]) as recorder:
        image = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                     generator=torch.Generator("cpu").manual_seed(args.seed), **extra).images[0]
    try:
        snapshot = recorder.get(step=step, block=args.block, level=args.level)
    except KeyError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
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

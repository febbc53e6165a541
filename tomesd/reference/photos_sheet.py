"""`python -m tomesd.reference.photos_sheet`: what the photos model draws, unpatched, at each size.

Writes a contact sheet (default tomesd/reference/photos_samples.png): one column per photograph, the
first row a held-out crop of it (real pixels, for comparison), then one row of samples per canvas
size (32, 64, 128 px; every tile shown at the same side, so a 32 px sample is enlarged 4× and a
128 px one shows 16× the area at the same pixel scale). Each sample is labelled with the class the
shipped classifier reads on it; the recognition rate per size is printed. `--recognition N` also
samples N images per photograph at 32 px and prints how many the classifier names correctly.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

import torch

from . import HERE, classify
from .photos import CLASSES, SIZES, PhotoCrops, load_classifier, load_pipeline
from .photos_train import held_out_set

SHEET_PATH = os.path.join(HERE, "photos_samples.png")
LABEL_H = 12


@torch.no_grad()
def samples(pipe, size: int, per_class: int, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """[len(CLASSES) · per_class, 3, size, size] in [-1, 1], class-major, image i from seed + i."""
    labels = [c for c in range(len(CLASSES)) for _ in range(per_class)]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    return pipe(class_labels=labels, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                generator=generators, output_type="pt").images


def sheet(rows: List[torch.Tensor], names: List[str], reads: List[List[int]], tile: int):
    """PIL image: rows of images [len(CLASSES), 3, H, W] in [-1, 1], each tile `tile` px with the row name
    and the class the classifier reads (reads[i][j]; -1: none) below it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cols = len(CLASSES)
    out = Image.new("RGB", (cols * (tile + 2), LABEL_H + len(rows) * (tile + LABEL_H)), "white")
    draw = ImageDraw.Draw(out)
    for j, name in enumerate(CLASSES):
        draw.text((j * (tile + 2) + 1, 0), name[:tile // 6], fill="black", font=font)
    for i, (images, row_name) in enumerate(zip(rows, names)):
        arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        y = LABEL_H + i * (tile + LABEL_H)
        for j, array in enumerate(arrays):
            img = Image.fromarray(array)
            img = img.resize((tile, tile), Image.NEAREST if img.width < tile else Image.LANCZOS)
            out.paste(img, (j * (tile + 2) + 1, y))
            read = reads[i][j]
            text = row_name if read < 0 else f"{row_name}: {'ok' if read == j else CLASSES[read][:8]}"
            draw.text((j * (tile + 2) + 1, y + tile), text, fill="black" if read in (-1, j) else "red", font=font)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tomesd.reference.photos_sheet", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=SHEET_PATH)
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="canvas sides in px (default 32,64,128)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--large-steps", type=int, help="DDIM steps above 64 px (default: --steps; on a CPU a 128 px UNet "
                   "call costs about as much as 60 at 32 px)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's, PhotosPipeline.default_guidance_scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=96)
    p.add_argument("--recognition", type=int, default=0, metavar="N", help="also sample N per photograph at 32 px and report the rate")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe, classifier = load_pipeline(), load_classifier()
    if args.guidance is None:
        args.guidance = pipe.default_guidance_scale
    truth = torch.arange(len(CLASSES))
    real, real_y = held_out_set(PhotoCrops(), seed=0)
    rows, names, reads = [real[[int((real_y == c).nonzero()[0]) for c in truth]]], ["held-out crop"], [[-1] * len(CLASSES)]
    for size in (int(s) for s in args.sizes.split(",")):
        steps = args.large_steps if size > 64 and args.large_steps else args.steps
        images = samples(pipe, size, 1, steps, args.guidance, args.seed)
        read = classify(classifier, images)
        print(f"{size} px: classifier names {int((read == truth).sum())}/{len(CLASSES)} sheet samples correctly "
              f"({steps} DDIM steps, guidance {args.guidance:g})", flush=True)
        rows.append(images)
        names.append(f"{size} px")
        reads.append(read.tolist())
    image = sheet(rows, names, reads, args.tile)
    image.save(args.out, format="PNG", optimize=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KiB)")
    if args.recognition:
        images = samples(pipe, SIZES[0], args.recognition, args.steps, args.guidance, args.seed + 1000)
        labels = truth.repeat_interleave(args.recognition)
        right = classify(classifier, images) == labels
        per_class = ", ".join(f"{n} {right[labels == c].float().mean().item():.2f}" for c, n in enumerate(CLASSES))
        print(f"recognition at {SIZES[0]} px: {right.float().mean().item():.3f} of {len(labels)} samples "
              f"({args.recognition} per photograph, seeds {args.seed + 1000}+, {args.steps} DDIM steps, guidance {args.guidance:g}); "
              f"per photograph: {per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

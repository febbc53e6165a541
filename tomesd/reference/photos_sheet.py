"""`python -m tomesd.reference.photos_sheet [--model photos|photos-sdxl|photos-flux]`: what a photos
model draws, unpatched, at each size.

Writes a contact sheet (default tomesd/reference/photos_samples.png; photos_sdxl_samples.png,
photos_flux_samples.png for the others): one column per photograph, the first row a held-out crop of
it at the model's training size (real pixels, for comparison), then one row of samples per canvas
size (photos and photos-flux 32, 64, 128 px; photos-sdxl 64, 128, 256; every tile shown at the same
side, so the largest canvas shows 16× the area of the smallest at the same pixel scale). Each sample
is labelled with the class the model's classifier (pipe.reference_classifier) reads on it; the
recognition rate per size is printed. `--recognition N` also samples N images per photograph at the
training size and prints how many the classifier names correctly.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

import torch

from . import HERE, classify, photos, photos_flux, photos_sdxl
from .photos import CLASSES, PhotoCrops
from .photos_train import held_out_set

SHEET_PATH = os.path.join(HERE, "photos_samples.png")
# --model → (the module with its load_pipeline and SIZES, the sheet's default path)
MODELS = {
    "photos": (photos, SHEET_PATH),
    "photos-sdxl": (photos_sdxl, os.path.join(HERE, "photos_sdxl_samples.png")),
    "photos-flux": (photos_flux, os.path.join(HERE, "photos_flux_samples.png")),
}
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
    p.add_argument("--model", choices=tuple(MODELS), default="photos")
    p.add_argument("--out", help="PNG path (default: the model's sheet in tomesd/reference/)")
    p.add_argument("--sizes", help="canvas sides in px (default: the model's, photos 32,64,128)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--large-steps", type=int, help="sampler steps above twice the training size (photos: above 64 px; "
                   "default: --steps; on a CPU a 128 px UNet call costs about as much as 60 at 32 px)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's, PhotosPipeline.default_guidance_scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=96)
    p.add_argument("--recognition", type=int, default=0, metavar="N", help="also sample N per photograph at 32 px and report the rate")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    module, sheet_path = MODELS[args.model]
    try:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(module.SIZES)
    except ValueError:
        p.error(f"argument --sizes: expected comma-separated sides in px, e.g. {','.join(map(str, module.SIZES))}; got {args.sizes!r}")
    torch.set_num_threads(args.threads)
    pipe = module.load_pipeline()
    classifier = pipe.reference_classifier()
    if args.guidance is None:
        args.guidance = pipe.default_guidance_scale
    truth = torch.arange(len(CLASSES))
    real, real_y = held_out_set(PhotoCrops(size=module.SIZE), seed=0)
    rows, names, reads = [real[[int((real_y == c).nonzero()[0]) for c in truth]]], ["held-out crop"], [[-1] * len(CLASSES)]
    for size in sizes:
        steps = args.large_steps if size > 2 * module.SIZE and args.large_steps else args.steps
        images = samples(pipe, size, 1, steps, args.guidance, args.seed)
        read = classify(classifier, images)
        print(f"{size} px: classifier names {int((read == truth).sum())}/{len(CLASSES)} sheet samples correctly "
              f"({steps} steps, guidance {args.guidance:g})", flush=True)
        rows.append(images)
        names.append(f"{size} px")
        reads.append(read.tolist())
    image = sheet(rows, names, reads, args.tile)
    out = args.out or sheet_path
    image.save(out, format="PNG", optimize=True)
    print(f"wrote {out} ({os.path.getsize(out) // 1024} KiB)")
    if args.recognition:
        images = samples(pipe, module.SIZE, args.recognition, args.steps, args.guidance, args.seed + 1000)
        labels = truth.repeat_interleave(args.recognition)
        right = classify(classifier, images) == labels
        per_class = ", ".join(f"{n} {right[labels == c].float().mean().item():.2f}" for c, n in enumerate(CLASSES))
        print(f"recognition at {module.SIZE} px: {right.float().mean().item():.3f} of {len(labels)} samples "
              f"({args.recognition} per photograph, seeds {args.seed + 1000}+, {args.steps} steps, guidance {args.guidance:g}); "
              f"per photograph: {per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m tomesd.quality`: what ToMe settings cost in image quality, against the unpatched image.

For a pipeline, a list of prompts and seeds, and a grid of `tomesd.apply_patch` settings, every
(prompt, seed) image is generated without ToMe and with each setting from the same seed, and each
setting gets:
- s_per_image: wall time of its pipeline calls / images (after one untimed warm-up call), speedup,
  and its noise band: images are made in interleaved rounds (round k makes the k-th --batch of
  images with every setting in turn), the band is the lowest and highest single-round speed-up, and
  the verdict says "faster" / "slower" only when the whole band is past 1 ("within noise" else); on
  a CPU torch's threads are the free cores (tomesd.tools.threads, --threads to override), and a load
  average above the cores is said (timings then are not a quiet machine's);
- closeness to the unpatched images: PSNR over all its images (pooled squared error, dB; inf when
  bit-identical) and the lowest per-image PSNR, SSIM (mean over images), both from torchmetrics with
  data range 1; LPIPS (AlexNet) only when torchvision and its AlexNet weights are already on disk —
  nothing is downloaded, a skipped LPIPS says why;
- accuracy, for the reference models (digits, photos) at their own size (16 / 32 px, what their
  classifiers judge; elsewhere left out, and said): how often the classifier reads the requested class.

`--sizes 32,64,128` repeats the whole run at each square size (a table per size, results in
`<out>/<size>px/`): the photos model samples larger canvases, 1,024 to 16,384 finest-level tokens.

The grid is the product of the value lists of every apply_patch keyword given (`--ratios`,
`--max-downsample`, `--merge-crossattn`, `--merge-mlp`, `--merge` sub-layer sets, and `--set
KEY=V1,V2` for any other keyword, so options added to apply_patch need no change here). Writes
results.json, results.csv and contact_sheet.png (one row per setting, the unpatched row first, one
column per prompt/seed, each tile labelled with its setting, time and PSNR).

API: `QualityConfig`, `grid_settings`, `run`, `format_table`, `contact_sheet`, `write_results`.
The rooms: `generate` (the configuration, generating and timing the images; `timed_chunk` is its timing seam), `metrics` (PSNR, SSIM,
LPIPS), `report` (`QualityResult`, the table, the contact sheet, JSON/CSV), `command` (the command
line: it calls `generate.run` and `generate.missing_dependencies`, the seams tests replace); the argument types and the settings grid are tomesd.tools.cli, the model loader
tomesd.tools.models.
"""
from __future__ import annotations

from ..tools.cli import grid_settings
from .command import build_parser, config_from_args, main
from .metrics import Metrics, lpips_metric
from .report import (
                     ROW_FIELDS,
                     SHEET_HEAD_H,
                     SHEET_LINE_H,
                     SHEET_PAD,
                     SHEET_TEXT_H,
                     QualityResult,
                     contact_sheet,
                     format_table,
                     write_results,
)
from .generate import QualityConfig, check_settings, run, setting_label

__all__ = [
    "QualityConfig", "QualityResult", "Metrics", "lpips_metric", "grid_settings", "setting_label", "run",
    "check_settings", "format_table", "contact_sheet", "write_results", "build_parser", "config_from_args", "main",
    "ROW_FIELDS", "SHEET_PAD", "SHEET_HEAD_H", "SHEET_LINE_H", "SHEET_TEXT_H",
]

"""Reading a `tomesd.quality` run: `QualityResult`, the text table, the contact sheet (one row per
setting, the unpatched row first, one column per prompt/seed) and the files (results.json,
results.csv, contact_sheet.png)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..tools import cli

ROW_FIELDS = (
    "setting", "images", "s_per_image", "speedup", "speedup_min", "speedup_max", "verdict", "psnr", "psnr_min", "ssim", "lpips", "accuracy", "identical", "params",
)
SHEET_PAD, SHEET_HEAD_H, SHEET_LINE_H = 4, 16, 11  # contact sheet layout, px
SHEET_TEXT_H = 4 * SHEET_LINE_H + 2  # under each tile: the setting (two lines), s/img, PSNR


@dataclass
class QualityResult:
    """rows: one dict per setting (keys ROW_FIELDS), the unpatched row first; tiles: per row, the
    uint8 images [H, W, C] of the columns; tile_psnr: per row, per-image PSNR; env: versions, settings."""

    rows: List[Dict[str, Any]]
    tiles: List[List[Any]]
    tile_psnr: List[List[float]]
    columns: List[Tuple[str, int]]
    env: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def format_table(result: QualityResult) -> str:
    """The rows as an aligned text table; the accuracy column only where some row has one (the
    reference models at their own size: the run's notes say why it is left out)."""
    accuracy = any(r.get("accuracy") is not None for r in result.rows)
    header = ("setting", "s/img", "speedup", "noise band", "", "PSNR dB", "min PSNR", "SSIM", "LPIPS") + (
        ("accuracy",) if accuracy else ())
    lines = [header]
    for r in result.rows:
        band = "-" if r.get("speedup_min") is None else f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}x"
        lines.append((r["setting"], cli.fmt(r["s_per_image"], ".3f"), cli.fmt(r["speedup"], ".2f") + "x",
                      band, r.get("verdict") or "",
                      cli.fmt(r["psnr"], ".2f"), cli.fmt(r["psnr_min"], ".2f"), cli.fmt(r["ssim"], ".4f"),
                      cli.fmt(r["lpips"], ".4f")) + ((cli.fmt(r["accuracy"], ".3f"),) if accuracy else ()))
    return "\n".join(cli.align(lines, left=(0,)))


def contact_sheet(result: QualityResult, path: Optional[str] = None, tile: int = 128, max_columns: int = 10):
    """PIL image: one row per setting (the unpatched row first), one column per prompt/seed (the
    first max_columns), each image scaled to tile × tile px with its setting, s/img and PSNR below,
    the prompt and seed above each column. Saved as PNG to `path` when given."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cols = min(len(result.columns), max_columns)
    pad, text_h, head_h = SHEET_PAD, SHEET_TEXT_H, SHEET_HEAD_H
    cell_w, cell_h = tile + 2 * pad, tile + text_h + pad
    sheet = Image.new("RGB", (cols * cell_w, head_h + len(result.rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (prompt, seed) in enumerate(result.columns[:cols]):
        draw.text((j * cell_w + pad, 2), _clip(f"{prompt} | seed {seed}", tile), fill="black", font=font)
    for i, row in enumerate(result.rows):
        for j in range(cols):
            array = result.tiles[i][j]
            img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
            small = img.width < tile
            img = img.resize((tile, tile), Image.NEAREST if small else Image.LANCZOS)
            x, y = j * cell_w + pad, head_h + i * cell_h
            sheet.paste(img, (x, y))
            psnr = result.tile_psnr[i][j]
            lines = (*_wrap(row["setting"], tile, 2), f"{row['s_per_image']:.3f} s/img",
                     "PSNR inf" if math.isinf(psnr) else f"PSNR {psnr:.1f} dB")
            for k, text in enumerate(lines):
                draw.text((x, y + tile + 1 + SHEET_LINE_H * k), text, fill="black", font=font)
    if path is not None:
        sheet.save(path, format="PNG")
    return sheet


def _clip(text: str, width_px: int) -> str:
    limit = max(4, width_px // 6)  # the default font is about 6 px per character
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _wrap(text: str, width_px: int, max_lines: int) -> List[str]:
    """text in at most max_lines lines of width_px, broken at spaces; the last line clipped."""
    limit = max(4, width_px // 6)
    lines: List[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= limit:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [_clip(line, width_px) for line in lines]


def write_results(result: QualityResult, out_dir: str, tile: int = 128, max_columns: int = 10) -> Dict[str, str]:
    """Write results.json, results.csv and contact_sheet.png into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("results.json", "results.csv", "contact_sheet.png")}
    cli.write_json(paths["results.json"],
                   dict(rows=result.rows, columns=result.columns, tile_psnr=result.tile_psnr, environment=result.env))
    cli.write_csv(paths["results.csv"], result.rows, ROW_FIELDS)
    contact_sheet(result, paths["contact_sheet.png"], tile=tile, max_columns=max_columns)
    return paths

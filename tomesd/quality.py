"""`python -m tomesd.quality`: what ToMe settings cost in image quality, against the unpatched image.

For a pipeline, a list of prompts and seeds, and a grid of `tomesd.apply_patch` settings, every
(prompt, seed) image is generated without ToMe and with each setting from the same seed, and each
setting gets:
- s_per_image: wall time of its pipeline calls / images (after one untimed warm-up call), speedup;
- closeness to the unpatched images: PSNR over all its images (pooled squared error, dB; inf when
  bit-identical) and the lowest per-image PSNR, SSIM (mean over images), both from torchmetrics with
  data range 1; LPIPS (AlexNet) only when torchvision and its AlexNet weights are already on disk —
  nothing is downloaded, a skipped LPIPS says why;
- accuracy, for the reference digits model: how often its classifier reads the requested digit.

The grid is the product of the value lists of every apply_patch keyword given (`--ratios`,
`--max-downsample`, `--merge-crossattn`, `--merge-mlp`, `--merge` sub-layer sets, and `--set
KEY=V1,V2` for any other keyword, so options added to apply_patch need no change here). Writes
results.json, results.csv and contact_sheet.png (one row per setting, the unpatched row first, one
column per prompt/seed, each tile labelled with its setting, time and PSNR).

API: `QualityConfig`, `grid_settings`, `run`, `format_table`, `contact_sheet`, `write_results`.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

NEEDS = ("diffusers", "torchmetrics", "tqdm", "PIL")
ROW_FIELDS = (
    "setting", "images", "s_per_image", "speedup", "psnr", "psnr_min", "ssim", "lpips", "accuracy", "identical", "params",
)
SUBLAYERS = ("attn", "crossattn", "mlp")
SHEET_PAD, SHEET_HEAD_H, SHEET_LINE_H = 4, 16, 11  # contact sheet layout, px
SHEET_TEXT_H = 4 * SHEET_LINE_H + 2  # under each tile: the setting (two lines), s/img, PSNR
MERGE_AXIS = "merge"  # grid key whose values are {merge_attn, merge_crossattn, merge_mlp} dicts
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_NOT_GRID = {"model"}  # apply_patch parameters that are not settings


def missing_dependencies() -> List[str]:
    """The modules this tool needs that are not installed."""
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def patch_keywords() -> Tuple[str, ...]:
    """The keyword arguments tomesd.apply_patch takes: what a grid may vary."""
    import tomesd

    return tuple(name for name in inspect.signature(tomesd.apply_patch).parameters if name not in _NOT_GRID)


@dataclass
class QualityConfig:
    """One run. model: "reference", a local pipeline directory or a hub id (tomesd.models).
    prompts × seeds are the columns; grid: apply_patch keyword → the values to try (their product
    is the set of settings, each compared with the unpatched pipeline). height/width/steps/
    guidance_scale: None leaves the pipeline's default. batch: images per pipeline call."""

    model: str = "reference"
    prompts: Tuple[str, ...] = ()
    seeds: Tuple[int, ...] = (0,)
    grid: Dict[str, Tuple[Any, ...]] = field(default_factory=lambda: {"ratio": (0.3, 0.5, 0.7)})
    steps: Optional[int] = 20
    height: Optional[int] = None
    width: Optional[int] = None
    guidance_scale: Optional[float] = None
    batch: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    patch_seed: int = 0
    warmup: int = 1

    def __post_init__(self):
        self.prompts = tuple(self.prompts)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.grid = {k: tuple(v) for k, v in self.grid.items()}
        problems = []
        if not self.prompts:
            problems.append("give at least one prompt")
        if not self.seeds:
            problems.append("give at least one seed")
        known = patch_keywords()
        unknown = sorted(set(self.grid) - set(known) - {MERGE_AXIS})
        if unknown:
            problems.append(f"not apply_patch keywords: {', '.join(unknown)} (it takes {', '.join(known)})")
        empty = sorted(k for k, v in self.grid.items() if not v)
        if empty:
            problems.append(f"no values for {', '.join(empty)}")
        if not self.grid:
            problems.append("the grid is empty: give --ratios or --set")
        for name in ("steps", "height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be ≥ 1, got {value}")
        if self.batch < 1 or self.warmup < 0:
            problems.append("batch must be ≥ 1 and warmup ≥ 0")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def columns(self) -> List[Tuple[str, int]]:
        """(prompt, seed) of each image, seed-major: the contact sheet's first columns show every prompt."""
        return [(p, s) for s in self.seeds for p in self.prompts]


def grid_settings(grid: Dict[str, Sequence[Any]]) -> List[Dict[str, Any]]:
    """apply_patch keyword dicts: the product of the grid's value lists, in the order given (the last
    key varies fastest). A value that is a dict (a MERGE_AXIS entry) contributes all its keywords."""
    keys = list(grid)
    settings = []
    for values in itertools.product(*(grid[k] for k in keys)):
        params: Dict[str, Any] = {}
        for key, value in zip(keys, values):
            params.update(value if isinstance(value, dict) else {key: value})
        settings.append(params)
    return settings


def setting_label(params: Dict[str, Any]) -> str:
    """Short name of a setting: 'r0.5 md2 attn+mlp'."""
    parts = []
    if "ratio" in params:
        parts.append(f"r{params['ratio']:g}" if isinstance(params["ratio"], (int, float)) else f"r{params['ratio']}")
    if "max_downsample" in params:
        parts.append(f"md{params['max_downsample']}" if params["max_downsample"] is not None else "md-")
    if any(f"merge_{s}" in params for s in SUBLAYERS):
        on = [s for s in SUBLAYERS if params.get(f"merge_{s}", s == "attn")]
        parts.append("+".join(on) if on else "none")
    parts += [f"{k}={v}" for k, v in params.items() if k not in ("ratio", "max_downsample", *(f"merge_{s}" for s in SUBLAYERS))]
    return " ".join(parts)


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


def lpips_metric(device: str):
    """(callable(a, b) → LPIPS per image, None) when torchvision and its AlexNet weights are already
    installed, else (None, why). Never downloads."""
    if importlib.util.find_spec("torchvision") is None:
        return None, "LPIPS skipped: torchvision is not installed"
    try:
        import torch
        import torchvision

        url = torchvision.models.AlexNet_Weights.DEFAULT.url
        weights = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.isfile(weights):
            return None, f"LPIPS skipped: the AlexNet weights are not at {weights} (tomesd never downloads them)"
        from torchmetrics.functional.image import learned_perceptual_image_patch_similarity as lpips
    except (ImportError, AttributeError) as error:
        return None, f"LPIPS skipped: {error}"

    def measure(a, b):  # [B, C, H, W] in [0, 1]; one channel is repeated to three
        a, b = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x for x in (a, b))
        return lpips(a.to(device), b.to(device), net_type="alex", reduction="mean", normalize=True)

    return measure, None


class _Metrics:
    """PSNR / SSIM / LPIPS of images [B, C, H, W] in [0, 1] against the unpatched ones."""

    def __init__(self, device: str):
        self.device = device
        self.lpips, self.lpips_note = lpips_metric(device)

    def __call__(self, images, base) -> Dict[str, Any]:
        import torch
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        x, y = images.double(), base.double()
        per_image = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
        out = dict(
            psnr=float(peak_signal_noise_ratio(x, y, data_range=1.0)),
            psnr_min=float(per_image.min()),
            ssim=float(structural_similarity_index_measure(x, y, data_range=1.0)),
            identical=bool(torch.equal(images, base)),
            tile_psnr=[float(v) for v in per_image],
            lpips=None,
        )
        if self.lpips is not None:
            try:
                out["lpips"] = float(self.lpips(images.float(), base.float()))
            except (RuntimeError, ValueError) as error:  # e.g. images too small for AlexNet
                self.lpips, self.lpips_note = None, f"LPIPS skipped: {str(error).splitlines()[0]}"
        return out


def _sync(device: str):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _generate(pipe, cfg: QualityConfig, columns: List[Tuple[str, int]]):
    """Images [B, C, H, W] float32 in [0, 1] (on the CPU) for (prompt, seed) columns, in cfg.batch-sized calls."""
    import numpy as np
    import torch

    kwargs: Dict[str, Any] = dict(output_type="np")
    for name in ("height", "width", "guidance_scale"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    if cfg.steps is not None:
        kwargs["num_inference_steps"] = cfg.steps
    out = []
    for i in range(0, len(columns), cfg.batch):
        chunk = columns[i:i + cfg.batch]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk]
        images = pipe(prompt=[p for p, _ in chunk], generator=generators, **kwargs).images
        out.append(torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2))
    return torch.cat(out)


def _timed(pipe, cfg: QualityConfig, columns, bar) -> Tuple[Any, float]:
    images, seconds = [], 0.0
    for i in range(0, len(columns), cfg.batch):
        chunk = columns[i:i + cfg.batch]
        _sync(cfg.device)
        t0 = time.perf_counter()
        images.append(_generate(pipe, cfg, chunk))
        _sync(cfg.device)
        seconds += time.perf_counter() - t0
        bar.update(len(chunk))
    import torch

    return torch.cat(images), seconds / len(columns)


def _to_uint8(images) -> List[Any]:
    """[B, C, H, W] in [0, 1] → list of uint8 arrays [H, W, C]."""
    import torch

    return list((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def check_settings(pipe, cfg: QualityConfig) -> None:
    """Apply and remove every setting once, before any image is made: a bad value fails now with
    apply_patch's own message (ValueError / TypeError)."""
    import tomesd

    try:
        for params in grid_settings(cfg.grid):
            try:
                tomesd.apply_patch(pipe, **{"seed": cfg.patch_seed, **params})
            except (ValueError, TypeError) as error:
                raise type(error)(f"setting {setting_label(params)}: {error}") from None
    finally:
        tomesd.remove_patch(pipe)


def environment(cfg: QualityConfig) -> Dict[str, Any]:
    import diffusers
    import torch

    import tomesd

    return dict(
        tomesd=tomesd.__version__, torch=torch.__version__, diffusers=diffusers.__version__,
        python=platform.python_version(), platform=platform.platform(), device=cfg.device,
        gpu=torch.cuda.get_device_name(cfg.device) if str(cfg.device).startswith("cuda") else None,
        cpu_threads=torch.get_num_threads(), config=asdict(cfg),
    )


def run(cfg: QualityConfig, pipe=None, progress: bool = True, classifier=None) -> QualityResult:
    """Generate and compare every setting of cfg. pipe: an already loaded pipeline (else
    tomesd.models.load_pipeline(cfg.model)); classifier: a digit classifier for DigitsPipeline
    (default: the shipped one)."""
    import torch
    from tqdm import tqdm

    import tomesd
    from tomesd import models

    dtype = getattr(torch, DTYPES[cfg.dtype])
    if pipe is None:
        pipe = models.load_pipeline(cfg.model, dtype=dtype, device=cfg.device)
    labels = None
    from tomesd.reference import DigitsPipeline, classify, load_classifier, parse_digit

    if isinstance(pipe, DigitsPipeline):
        classifier = classifier or load_classifier(device=cfg.device)
        labels = torch.tensor([parse_digit(p) for p, _ in cfg.columns])
    check_settings(pipe, cfg)
    settings = grid_settings(cfg.grid)
    columns = cfg.columns
    metrics = _Metrics(cfg.device)
    env = environment(cfg)
    for _ in range(cfg.warmup):
        _generate(pipe, cfg, columns[:cfg.batch])
    bar = tqdm(total=len(columns) * (1 + len(settings)), desc="tomesd.quality", unit="img", disable=not progress, file=sys.stderr)
    rows, tiles, tile_psnr = [], [], []
    base = None
    try:
        for params in [None, *settings]:
            label = "no ToMe" if params is None else setting_label(params)
            bar.set_postfix_str(label)
            if params is not None:
                tomesd.apply_patch(pipe, **{"seed": cfg.patch_seed, **params})
            try:
                images, s_per_image = _timed(pipe, cfg, columns, bar)
            finally:
                tomesd.remove_patch(pipe)
            if base is None:
                base = images
            m = metrics(images, base)
            row = dict(setting=label, images=len(columns), s_per_image=s_per_image, params=params or {},
                       **{k: m[k] for k in ("psnr", "psnr_min", "ssim", "lpips", "identical")})
            row["speedup"] = rows[0]["s_per_image"] / s_per_image if rows else 1.0
            row["accuracy"] = float((classify(classifier, images * 2 - 1) == labels).float().mean()) if labels is not None else None
            rows.append({k: row.get(k) for k in ROW_FIELDS})
            tiles.append(_to_uint8(images))
            tile_psnr.append(m["tile_psnr"])
    finally:
        bar.close()
    notes = [metrics.lpips_note] if metrics.lpips_note else []
    if labels is None:
        notes.append("accuracy: only for the reference digits model")
    env["notes"] = notes
    return QualityResult(rows=rows, tiles=tiles, tile_psnr=tile_psnr, columns=columns, env=env, notes=notes)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def format_table(result: QualityResult) -> str:
    """The rows as an aligned text table."""
    header = ("setting", "s/img", "speedup", "PSNR dB", "min PSNR", "SSIM", "LPIPS", "accuracy")
    lines = [header]
    for r in result.rows:
        lines.append((r["setting"], _fmt(r["s_per_image"], ".3f"), _fmt(r["speedup"], ".2f") + "x",
                      _fmt(r["psnr"], ".2f"), _fmt(r["psnr_min"], ".2f"), _fmt(r["ssim"], ".4f"),
                      _fmt(r["lpips"], ".4f"), _fmt(r["accuracy"], ".3f")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


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
    with open(paths["results.json"], "w") as f:
        json.dump(dict(rows=result.rows, columns=result.columns, tile_psnr=result.tile_psnr, environment=result.env),
                  f, indent=2, default=str)
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows({**r, "params": json.dumps(r["params"])} for r in result.rows)
    contact_sheet(result, paths["contact_sheet.png"], tile=tile, max_columns=max_columns)
    return paths


def parse_value(text: str) -> Any:
    """'true'/'false' → bool, 'none' → None, integers, floats, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null", "default"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _values(kind=None):
    """argparse type: a comma-separated list of values (parse_value, or `kind`)."""

    def parse(text: str) -> tuple:
        parts = [v for v in text.split(",") if v.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
        values = tuple(parse_value(v) for v in parts)
        if kind is bool and not all(isinstance(v, bool) for v in values):
            raise argparse.ArgumentTypeError(f"expected true/false values, got {text!r}")
        if kind is float and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        if kind is int and not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers (or none), got {text!r}")
        return values

    return parse


def _assignment(text: str) -> Tuple[str, tuple]:
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=V1[,V2...], got {text!r}")
    return key.strip().replace("-", "_"), _values()(values)


def _sublayer_sets(text: str) -> tuple:
    """'attn,attn+crossattn' → ({merge_attn: True, merge_crossattn: False, merge_mlp: False}, ...)."""
    out = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        names = [n.strip() for n in item.split("+") if n.strip()]
        bad = [n for n in names if n not in SUBLAYERS]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"sub-layer sets are {'/'.join(SUBLAYERS)} joined by '+', got {item!r}")
        out.append({f"merge_{s}": s in names for s in SUBLAYERS})
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated sub-layer sets, got {text!r}")
    return tuple(out)


def _seeds(text: str) -> tuple:
    """'0,1,5' or '0-9' (inclusive) or a mix."""
    seeds = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, dash, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2 or 0-9, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {text!r}")
    return tuple(seeds)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tomesd-quality",
        description="Image quality of Token Merging settings against the unpatched pipeline, from the same "
        "seeds: time per image, PSNR, SSIM (LPIPS when its weights are installed), classifier accuracy "
        "on the reference digits model. Writes results.json, results.csv and contact_sheet.png.",
        epilog="The grid is the product of every list given. Example (the BENCHMARKS.md table): "
        "tomesd-quality --model reference --seeds 0-9 --ratios 0.3,0.5,0.7 "
        "--merge attn,attn+crossattn,attn+crossattn+mlp --max-downsample 1,2",
    )
    p.add_argument("--model", default="reference",
                   help="'reference' (the shipped digits model, default), a local diffusers pipeline directory, or a hub id")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more); reference model: a digit")
    p.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line ('#' comments and blank lines skipped)")
    p.add_argument("--seeds", type=_seeds, default=(0,), help="seeds per prompt: 0,1,2 or 0-9 (default 0)")
    p.add_argument("--steps", type=_positive, default=20, help="inference steps (default 20)")
    p.add_argument("--height", type=_positive)
    p.add_argument("--width", type=_positive)
    p.add_argument("--guidance-scale", type=float)
    g = p.add_argument_group("ToMe grid (each a comma-separated list; the grid is their product)")
    g.add_argument("--ratios", type=_values(float), default=(0.3, 0.5, 0.7), help="default 0.3,0.5,0.7")
    g.add_argument("--max-downsample", type=_values(int), help="e.g. 1,2 (none: the highest-resolution transformer level)")
    g.add_argument("--merge", type=_sublayer_sets, help="sub-layer sets, e.g. attn,attn+crossattn,attn+crossattn+mlp")
    g.add_argument("--merge-attn", type=_values(bool), help="true,false")
    g.add_argument("--merge-crossattn", type=_values(bool), help="true,false")
    g.add_argument("--merge-mlp", type=_values(bool), help="true,false")
    g.add_argument("--set", dest="assign", action="append", type=_assignment, default=[], metavar="KEY=V1[,V2]",
                   help="any other apply_patch keyword and its values, e.g. --set sx=2,4 --set use_rand=false")
    p.add_argument("--patch-seed", type=int, default=0, help="apply_patch's seed (random dst choice), unless --set seed=...")
    p.add_argument("--batch", type=_positive, default=1, help="images per pipeline call (default 1)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default fp16 on a GPU, fp32 on a CPU")
    p.add_argument("--warmup", type=int, default=1, help="untimed pipeline calls before the first timed one")
    p.add_argument("--out", default="tomesd-quality-results", help="directory for results.json, results.csv, contact_sheet.png")
    p.add_argument("--tile", type=_positive, default=128, help="contact sheet tile side in px (default 128)")
    p.add_argument("--sheet-columns", type=_positive, default=10, help="prompt/seed columns on the contact sheet (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _read_prompts(parser, args) -> List[str]:
    prompts = list(args.prompt)
    if args.prompts:
        try:
            with open(args.prompts) as f:
                prompts += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except OSError as error:
            parser.error(f"--prompts {args.prompts}: {error.strerror}")
    return prompts


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> QualityConfig:
    """Validate the parsed arguments into a QualityConfig (parser.error on a problem)."""
    from tomesd import models

    grid: Dict[str, tuple] = {"ratio": args.ratios}
    for key in ("max_downsample", "merge_attn", "merge_crossattn", "merge_mlp"):
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    for key, values in args.assign:
        if key in grid:
            parser.error(f"--set {key}: already given")
        grid[key] = values
    if args.merge is not None:
        clash = [k for k in ("merge_attn", "merge_crossattn", "merge_mlp") if k in grid]
        if clash:
            parser.error(f"--merge sets the sub-layers; do not also give {', '.join('--' + k.replace('_', '-') for k in clash)}")
        grid[MERGE_AXIS] = args.merge
    prompts = _read_prompts(parser, args)
    reference = models.reference_dir(args.model) is not None
    if not prompts:
        if not reference:
            parser.error("give --prompt (repeatable) or --prompts FILE")
        prompts = [str(d) for d in range(10)]
    if reference:
        from tomesd.reference import parse_digit

        try:
            [parse_digit(p) for p in prompts]
        except ValueError as error:
            parser.error(str(error))
    device = args.device
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device is available")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    try:
        return QualityConfig(
            model=args.model, prompts=prompts, seeds=args.seeds, grid=grid, steps=args.steps,
            height=args.height, width=args.width, guidance_scale=args.guidance_scale, batch=args.batch,
            device=device, dtype=dtype, patch_seed=args.patch_seed, warmup=args.warmup,
        )
    except ValueError as error:
        parser.error(str(error))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_dependencies()
    if missing:
        parser.error(f"needs {', '.join(missing)}: pip install 'tomesd[quality]'")
    cfg = config_from_args(parser, args)
    print(f"tomesd.quality: {cfg.model}, {len(cfg.columns)} images per setting ({len(cfg.prompts)} prompts × "
          f"{len(cfg.seeds)} seeds), {len(grid_settings(cfg.grid))} settings + no ToMe, {cfg.dtype} on {cfg.device}",
          file=sys.stderr)
    from tomesd import models
    import torch

    pipe = models.load_pipeline(cfg.model, dtype=getattr(torch, DTYPES[cfg.dtype]), device=cfg.device)
    try:
        check_settings(pipe, cfg)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    result = run(cfg, pipe=pipe, progress=not args.no_progress)
    for note in result.notes:
        print(note, file=sys.stderr)
    env = result.env
    print(f"torch {env['torch']}, diffusers {env['diffusers']}, tomesd {env['tomesd']}, "
          f"{env['gpu'] or 'CPU ' + str(env['cpu_threads']) + ' threads'}")
    print(format_table(result))
    paths = write_results(result, args.out, tile=args.tile, max_columns=args.sheet_columns)
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

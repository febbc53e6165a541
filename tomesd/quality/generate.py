"""Generating every prompt × seed without ToMe and with each setting, interleaved, and scoring them (see
tomesd.quality)."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..tools import cli, models, threads, timing
from ..tools.cli import grid_settings
from .metrics import Metrics
from .report import (
    ROW_FIELDS,
    QualityResult,
)

NEEDS = ("diffusers", "torchmetrics", "tqdm", "PIL")
SUBLAYERS = ("attn", "crossattn", "mlp")
MERGE_AXIS = "merge"  # grid key whose values are {merge_attn, merge_crossattn, merge_mlp} dicts
VARIANT_AXIS = "variant"  # grid key whose values are whole settings (dicts of apply_patch keywords)
DEFAULT_RATIOS = (0.3, 0.5, 0.7)


def missing_dependencies() -> List[str]:
    """The modules this tool needs that are not installed."""
    return [name for name in NEEDS if not cli.available(name)]


@dataclass
class QualityConfig:
    """One run. model: "reference", a local pipeline directory or a hub id (tomesd.tools.models).
    prompts × seeds are the columns; grid: apply_patch keyword → the values to try (their product
    is the set of settings, each compared with the unpatched pipeline; a value of MERGE_AXIS or
    VARIANT_AXIS is a dict of keywords, a sub-layer set or a whole setting). height/width/steps/
    guidance_scale: None leaves the pipeline's default. batch: images per pipeline call."""

    model: str = "reference"
    prompts: Tuple[str, ...] = ()
    seeds: Tuple[int, ...] = (0,)
    grid: Dict[str, Tuple[Any, ...]] = field(default_factory=lambda: {"ratio": DEFAULT_RATIOS})
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
        known = cli.patch_keywords()
        given = set(self.grid) - {MERGE_AXIS, VARIANT_AXIS}
        given |= {k for v in self.grid.get(VARIANT_AXIS, ()) for k in v}
        unknown = sorted(given - set(known))
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
        if self.dtype not in models.DTYPES:
            problems.append(f"dtype must be one of {tuple(models.DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def columns(self) -> List[Tuple[str, int]]:
        """(prompt, seed) of each image, seed-major: the contact sheet's first columns show every prompt."""
        return [(p, s) for s in self.seeds for p in self.prompts]


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
    parts.append(cli.setting_label({k: v for k, v in params.items()
                                    if k not in ("ratio", "max_downsample", *(f"merge_{s}" for s in SUBLAYERS))}))
    return " ".join(filter(None, parts))


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


def timed_chunk(pipe, cfg: QualityConfig, chunk) -> Tuple[Any, float]:
    """(images, seconds) of one pipeline call on a chunk of (prompt, seed) columns. The timing seam:
    run() calls it as `quality.timed_chunk(...)`, so a test can script the seconds."""
    _sync(cfg.device)
    t0 = time.perf_counter()
    images = _generate(pipe, cfg, chunk)
    _sync(cfg.device)
    return images, time.perf_counter() - t0


def _interleaved(pipe, cfg: QualityConfig, settings, bar) -> Tuple[List[Any], List[List[float]]]:
    """Per setting (None: no ToMe): its images and its seconds per image in each round. Round k makes
    chunk k (cfg.batch columns) with every setting in turn (patch, call, unpatch), so a load that comes
    and goes slows every setting alike and round k's times compare settings on the same images."""
    import torch

    import tomesd

    columns = cfg.columns
    images: List[List[Any]] = [[] for _ in settings]
    seconds: List[List[float]] = [[] for _ in settings]
    for start in range(0, len(columns), cfg.batch):
        chunk = columns[start:start + cfg.batch]
        for i, params in enumerate(settings):
            bar.set_postfix_str("no ToMe" if params is None else setting_label(params))
            if params is not None:
                tomesd.apply_patch(pipe, **{"seed": cfg.patch_seed, **params})
            try:
                made, secs = timed_chunk(pipe, cfg, chunk)
            finally:
                tomesd.remove_patch(pipe)
            images[i].append(made)
            seconds[i].append(secs / len(chunk))
            bar.update(len(chunk))
    return [torch.cat(parts) for parts in images], seconds


def _to_uint8(images) -> List[Any]:
    """[B, C, H, W] in [0, 1] → list of uint8 arrays [H, W, C]."""
    import torch

    return list((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def check_settings(pipe, cfg: QualityConfig) -> None:
    """Apply and remove every setting once, before any image is made: a bad value fails now with
    apply_patch's own message (ValueError / TypeError)."""
    cli.check_settings(pipe, grid_settings(cfg.grid), base={"seed": cfg.patch_seed}, label=setting_label)


def environment(cfg: QualityConfig) -> Dict[str, Any]:
    """Versions, device and the settings of the run."""
    return dict(cli.environment(cfg.device), config=asdict(cfg))


def run(cfg: QualityConfig, pipe=None, progress: bool = True, classifier=None) -> QualityResult:
    """Generate and compare every setting of cfg. pipe: an already loaded pipeline (else
    tomesd.tools.models.load_pipeline(cfg.model)); classifier: for a reference pipeline (digits or photos),
    its classifier (default: the shipped one, pipe.reference_classifier)."""
    import torch
    from tqdm import tqdm

    if pipe is None:
        pipe = models.load_pipeline(cfg.model, dtype=models.DTYPES[cfg.dtype], device=cfg.device)
    labels = None
    from tomesd.reference import DigitsPipeline, classify

    own = models.pipeline_size(pipe)
    at_own_size = (cfg.height or own, cfg.width or own) == (own, own)
    if isinstance(pipe, DigitsPipeline) and at_own_size:  # the digits and photos reference models
        classifier = classifier or pipe.reference_classifier(cfg.device)
        labels = torch.tensor([pipe.class_id(p) for p, _ in cfg.columns])
    check_settings(pipe, cfg)
    settings = grid_settings(cfg.grid)
    columns = cfg.columns
    metrics = Metrics(cfg.device)
    env = environment(cfg)
    for _ in range(cfg.warmup):
        _generate(pipe, cfg, columns[:cfg.batch])
    bar = tqdm(total=len(columns) * (1 + len(settings)), desc="tomesd.quality", unit="img", disable=not progress, file=sys.stderr)
    load_before = timing.load_average()
    try:
        made, seconds = _interleaved(pipe, cfg, [None, *settings], bar)
    finally:
        bar.close()
    load = max((x for x in (load_before, timing.load_average()) if x is not None), default=None)
    rows, tiles, tile_psnr = [], [], []
    base = made[0]
    for params, images, secs in zip([None, *settings], made, seconds):
        m = metrics(images, base)
        row = dict(setting="no ToMe" if params is None else setting_label(params), images=len(columns),
                   s_per_image=sum(secs) / len(secs), params=params or {},
                   **{k: m[k] for k in ("psnr", "psnr_min", "ssim", "lpips", "identical")})
        row["speedup"] = rows[0]["s_per_image"] / row["s_per_image"] if rows else 1.0
        if params is not None:
            row.update(timing.noise_band(seconds[0], secs))
        row["accuracy"] = float((classify(classifier, images * 2 - 1) == labels).float().mean()) if labels is not None else None
        rows.append({k: row.get(k) for k in ROW_FIELDS})
        tiles.append(_to_uint8(images))
        tile_psnr.append(m["tile_psnr"])
    notes = [metrics.lpips_note] if metrics.lpips_note else []
    notes += timing.load_warnings(load, threads.usable_cores())
    if len(columns) <= cfg.batch:
        notes.append("one timing round (every image in one call): the speed-up has no noise band; use a smaller "
                     "--batch for several rounds")
    if not isinstance(pipe, DigitsPipeline):
        notes.append("accuracy: only for the reference models (digits, photos)")
    elif labels is None:
        notes.append(f"accuracy: left out at {cfg.width or own}x{cfg.height or own} px: the classifier judges the "
                     f"model's own {own} px images")
    else:
        notes.append("accuracy: how often the classifier reads the requested class, a check that the images "
                     "still show it; compare each row with no ToMe's (on few images it moves in large steps)")
    env["notes"] = notes
    return QualityResult(rows=rows, tiles=tiles, tile_psnr=tile_psnr, columns=columns, env=env, notes=notes)



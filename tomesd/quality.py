"""`python -m tomesd.quality`: what ToMe settings cost in image quality, against the unpatched image.

For a pipeline, a list of prompts and seeds, and a grid of `tomesd.apply_patch` settings, every
(prompt, seed) image is generated without ToMe and with each setting from the same seed, and each
setting gets:
- s_per_image: wall time of its pipeline calls / images (after one untimed warm-up call), speedup,
  and its noise band: images are made in interleaved rounds (round k makes the k-th --batch of
  images with every setting in turn), the band is the lowest and highest single-round speed-up, and
  the verdict says "faster" / "slower" only when the whole band is past 1 ("within noise" else); a
  load average above the threads in use is said (timings then are not a quiet machine's);
- closeness to the unpatched images: PSNR over all its images (pooled squared error, dB; inf when
  bit-identical) and the lowest per-image PSNR, SSIM (mean over images), both from torchmetrics with
  data range 1; LPIPS (AlexNet) only when torchvision and its AlexNet weights are already on disk —
  nothing is downloaded, a skipped LPIPS says why;
- accuracy, for the reference models (digits, photos): how often the model's classifier reads the
  requested class.

`--sizes 32,64,128` repeats the whole run at each square size (a table per size, results in
`<out>/<size>px/`): the photos model samples larger canvases, 1,024 to 16,384 finest-level tokens.

The grid is the product of the value lists of every apply_patch keyword given (`--ratios`,
`--max-downsample`, `--merge-crossattn`, `--merge-mlp`, `--merge` sub-layer sets, and `--set
KEY=V1,V2` for any other keyword, so options added to apply_patch need no change here). Writes
results.json, results.csv and contact_sheet.png (one row per setting, the unpatched row first, one
column per prompt/seed, each tile labelled with its setting, time and PSNR).

API: `QualityConfig`, `grid_settings`, `run`, `format_table`, `contact_sheet`, `write_results`
(the last three, and `QualityResult`, live in tomesd.quality_report; the metrics in
tomesd.quality_metrics; the argument types and the settings grid in tomesd.cli; the model loader is
tomesd.models).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import cli, models, timing
from .cli import grid_settings
from .quality_metrics import Metrics, lpips_metric
from .quality_report import (ROW_FIELDS, SHEET_HEAD_H, SHEET_LINE_H, SHEET_PAD, SHEET_TEXT_H, QualityResult, contact_sheet,
                             format_table, write_results)

__all__ = [
    "QualityConfig", "QualityResult", "Metrics", "lpips_metric", "grid_settings", "setting_label", "run",
    "check_settings", "format_table", "contact_sheet", "write_results", "build_parser", "config_from_args", "main",
    "ROW_FIELDS", "SHEET_PAD", "SHEET_HEAD_H", "SHEET_LINE_H", "SHEET_TEXT_H",
]

NEEDS = ("diffusers", "torchmetrics", "tqdm", "PIL")
SUBLAYERS = ("attn", "crossattn", "mlp")
MERGE_AXIS = "merge"  # grid key whose values are {merge_attn, merge_crossattn, merge_mlp} dicts
DEFAULT_RATIOS = (0.3, 0.5, 0.7)


def missing_dependencies() -> List[str]:
    """The modules this tool needs that are not installed."""
    return [name for name in NEEDS if not cli.available(name)]


@dataclass
class QualityConfig:
    """One run. model: "reference", a local pipeline directory or a hub id (tomesd.models).
    prompts × seeds are the columns; grid: apply_patch keyword → the values to try (their product
    is the set of settings, each compared with the unpatched pipeline). height/width/steps/
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
    tomesd.models.load_pipeline(cfg.model)); classifier: for a reference pipeline (digits or photos),
    its classifier (default: the shipped one, pipe.reference_classifier)."""
    import torch
    from tqdm import tqdm

    if pipe is None:
        pipe = models.load_pipeline(cfg.model, dtype=models.DTYPES[cfg.dtype], device=cfg.device)
    labels = None
    from tomesd.reference import DigitsPipeline, classify

    if isinstance(pipe, DigitsPipeline):  # the digits and photos reference models
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
    notes += timing.load_warnings(load, torch.get_num_threads())
    if len(columns) <= cfg.batch:
        notes.append("one timing round (every image in one call): the speed-up has no noise band; use a smaller "
                     "--batch for several rounds")
    if labels is None:
        notes.append("accuracy: only for the reference models (digits, photos)")
    env["notes"] = notes
    return QualityResult(rows=rows, tiles=tiles, tile_psnr=tile_psnr, columns=columns, env=env, notes=notes)


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


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="tomesd-quality",
        description="Image quality of Token Merging settings against the unpatched pipeline, from the same "
        "seeds: time per image, PSNR, SSIM (LPIPS when its weights are installed), classifier accuracy "
        "on the reference models (digits, photos). Writes results.json, results.csv and contact_sheet.png.",
        epilog="The grid is the product of every list given. Example (the BENCHMARKS.md table): "
        "tomesd-quality --model reference --seeds 0-9 --ratios 0.3,0.5,0.7 "
        "--merge attn,attn+crossattn,attn+crossattn+mlp --max-downsample 1,2",
    )
    p.add_argument("--model", default="reference",
                   help="'reference' (the shipped digits model, default), 'photos' (the shipped photographs model), "
                   "a local diffusers pipeline directory, or a hub id")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeat for more); reference models: a class (a digit, a photograph's name; default: every class)")
    p.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line ('#' comments and blank lines skipped)")
    p.add_argument("--seeds", type=_seeds, default=(0,), help="seeds per prompt: 0,1,2 or 0-9 (default 0)")
    p.add_argument("--steps", type=cli.positive, default=20, help="inference steps (default 20)")
    p.add_argument("--height", type=cli.positive)
    p.add_argument("--width", type=cli.positive)
    p.add_argument("--sizes", type=cli.values(int), help="square sizes in px, one run each, e.g. 32,64,128 (not with --height/--width)")
    p.add_argument("--guidance-scale", type=float)
    g = p.add_argument_group("ToMe grid (each a comma-separated list; the grid is their product)")
    g.add_argument("--ratios", type=cli.values(float), help="default 0.3,0.5,0.7 (unless --set ratio=...)")
    g.add_argument("--max-downsample", type=cli.values(int), help="e.g. 1,2 (none: the highest-resolution transformer level)")
    g.add_argument("--merge", type=_sublayer_sets, help="sub-layer sets, e.g. attn,attn+crossattn,attn+crossattn+mlp")
    g.add_argument("--merge-attn", type=cli.values(bool), help="true,false")
    g.add_argument("--merge-crossattn", type=cli.values(bool), help="true,false")
    g.add_argument("--merge-mlp", type=cli.values(bool), help="true,false")
    g.add_argument("--set", dest="assign", action="append", type=cli.assignment, default=[], metavar="KEY=V1[,V2]",
                   help="any other apply_patch keyword and its values, e.g. --set sx=2,4 --set use_rand=false")
    p.add_argument("--patch-seed", type=int, default=0, help="apply_patch's seed (random dst choice), unless --set seed=...")
    p.add_argument("--batch", type=cli.positive, default=1, help="images per pipeline call (default 1)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=tuple(models.DTYPES), help="default fp16 on a GPU, fp32 on a CPU")
    p.add_argument("--warmup", type=int, default=1, help="untimed pipeline calls before the first timed one")
    p.add_argument("--out", default="tomesd-quality-results", help="directory for results.json, results.csv, contact_sheet.png")
    p.add_argument("--tile", type=cli.positive, default=128, help="contact sheet tile side in px (default 128)")
    p.add_argument("--sheet-columns", type=cli.positive, default=10, help="prompt/seed columns on the contact sheet (default 10)")
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
    problem = models.model_problem(args.model, "pipeline", hub=False)
    if problem:
        parser.error(f"--model {problem}")
    grid: Dict[str, tuple] = {}
    if args.ratios is not None or "ratio" not in {key for key, _ in args.assign}:
        grid["ratio"] = DEFAULT_RATIOS if args.ratios is None else args.ratios
    flags = {key: "--" + key.replace("_", "-") for key in ("ratio", "max_downsample", "merge_attn", "merge_crossattn", "merge_mlp")}
    flags["ratio"] = "--ratios"
    for key in ("max_downsample", "merge_attn", "merge_crossattn", "merge_mlp"):
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    cli.add_axes(parser, grid, args.assign, given_by={k: flags[k] for k in grid})
    if args.merge is not None:
        clash = [k for k in ("merge_attn", "merge_crossattn", "merge_mlp") if k in grid]
        if clash:
            parser.error(f"--merge sets the sub-layers; do not also give {', '.join('--' + k.replace('_', '-') for k in clash)}")
        grid[MERGE_AXIS] = args.merge
    if args.sizes is not None and (args.height or args.width or min(args.sizes) < 1):
        parser.error("--sizes: positive sizes, and not with --height/--width")
    prompts = _read_prompts(parser, args)
    reference = models.reference_pipeline_class(args.model)
    if not prompts:
        if reference is None:
            parser.error("give --prompt (repeatable) or --prompts FILE")
        prompts = list(reference.class_names)
    if reference is not None:
        try:
            [reference.class_id(p) for p in prompts]
        except ValueError as error:
            parser.error(str(error))
    problem = cli.cuda_problem(args.device)
    if problem:
        parser.error(problem)
    device = cli.default_device(args.device)
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
    if not cfg.device.startswith("cuda"):
        import torch

        torch.set_num_threads(timing.physical_cores())  # threads beyond the cores only add contention
        print(f"torch threads: {torch.get_num_threads()} = physical cores", file=sys.stderr)
    print(f"tomesd.quality: {cfg.model}, {len(cfg.columns)} images per setting ({len(cfg.prompts)} prompts × "
          f"{len(cfg.seeds)} seeds), {len(grid_settings(cfg.grid))} settings + no ToMe, {cfg.dtype} on {cfg.device}",
          file=sys.stderr)
    try:
        pipe = models.load_pipeline(cfg.model, dtype=models.DTYPES[cfg.dtype], device=cfg.device)
    except Exception as error:  # noqa: BLE001 - a hub id that is not there, a broken directory: one line each
        parser.error(f"--model {cfg.model}: cannot load it ({cli.error_line(error)})")
    try:
        check_settings(pipe, cfg)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    for size in args.sizes or (None,):
        sized = cfg if size is None else replace(cfg, height=size, width=size)
        result = run(sized, pipe=pipe, progress=not args.no_progress)
        for note in result.notes:
            print(note, file=sys.stderr)
        env = result.env
        if size is not None:
            print(f"\n{size}×{size} px")
        print(f"torch {env['torch']}, diffusers {env['diffusers']}, tomesd {env['tomesd']}, "
              f"{env['gpu'] or 'CPU ' + str(env['cpu_threads']) + ' threads'}")
        print(format_table(result))
        out = args.out if size is None else os.path.join(args.out, f"{size}px")
        paths = write_results(result, out, tile=args.tile, max_columns=args.sheet_columns)
        print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

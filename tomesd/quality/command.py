"""`python -m tomesd.quality` / `tomesd-quality`: the command line of the quality tool (see tomesd.quality)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

from ..tools import cli, models, threads
from ..tools.cli import grid_settings
from .report import format_table, write_results
from . import generate
from .generate import DEFAULT_RATIOS, MERGE_AXIS, SUBLAYERS, VARIANT_AXIS, QualityConfig, check_settings

SUBLAYERS_KEYS = ("merge_attn", "merge_crossattn", "merge_mlp")


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
    p.add_argument("--model", default="reference", help=models.model_help() + " (default: reference)")
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
    g.add_argument("--variant", action="append", type=cli.setting, default=[], metavar="KEY=V[,KEY=V]",
                   help="one whole setting, e.g. --variant ratio=0.9,sx=4,sy=4,prop_attn=true (repeat for more; the "
                   "other axes multiply them; with a variant that sets ratio, --ratios has no default)")
    p.add_argument("--patch-seed", type=int, default=0, help="apply_patch's seed (random dst choice), unless --set seed=...")
    p.add_argument("--batch", type=cli.positive, default=1, help="images per pipeline call (default 1)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=tuple(models.DTYPES), help="default fp16 on a GPU, fp32 on a CPU")
    p.add_argument("--warmup", type=int, default=1, help="untimed pipeline calls before the first timed one")
    p.add_argument("--threads", type=cli.positive, help="torch threads on a CPU (default: OMP_NUM_THREADS when set, else "
                   "the cores free now: physical cores within the affinity mask and cgroup quota, less the load average)")
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
    in_variants = set().union(*args.variant) if args.variant else set()
    if args.ratios is not None or "ratio" not in {key for key, _ in args.assign} | in_variants:
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
    both = sorted(in_variants & (set(grid) | (set(SUBLAYERS_KEYS) if MERGE_AXIS in grid else set())))
    if both:
        parser.error(f"{', '.join(both)}: both a grid axis and in a --variant; give each keyword one way")
    if args.variant:
        grid = {VARIANT_AXIS: tuple(args.variant), **grid}
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
    missing = generate.missing_dependencies()
    if missing:
        parser.error(f"needs {', '.join(missing)}: pip install 'tomesd[quality]'")
    cfg = config_from_args(parser, args)
    if not cfg.device.startswith("cuda"):
        threads.set_threads(args.threads)  # threads beyond the free cores only add contention; said on stderr
    print(f"tomesd.quality: {cfg.model}, {len(cfg.columns)} images per setting ({len(cfg.prompts)} prompts × "
          f"{len(cfg.seeds)} seeds), {len(grid_settings(cfg.grid))} settings + no ToMe, {cfg.dtype} on {cfg.device}",
          file=sys.stderr)
    try:
        pipe = models.load_pipeline(cfg.model, dtype=models.DTYPES[cfg.dtype], device=cfg.device)
    except Exception as error:  # noqa: BLE001 - a hub id that is not there, a broken directory: one line each
        parser.error(f"--model {cfg.model}: cannot load it ({cli.error_line(error)})")
    default = models.pipeline_size(pipe)
    asked = [(s, s, ("--sizes", "--sizes")) for s in args.sizes or ()] or [
        (cfg.height or default, cfg.width or default, ("--height", "--width"))]
    problem = next(filter(None, (models.size_problem(pipe, *size) for size in asked)), "")
    if problem:  # e.g. SD 3 / Flux at a multiple of 8 that is none of 16
        parser.error(problem)
    try:
        check_settings(pipe, cfg)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    for size in args.sizes or (None,):
        sized = cfg if size is None else replace(cfg, height=size, width=size)
        result = generate.run(sized, pipe=pipe, progress=not args.no_progress)
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


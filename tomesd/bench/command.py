"""`python -m tomesd.bench` / `tomesd-bench`: the command line of the benchmark (see tomesd.bench)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..tools import cli, models, threads
from ..tools.archs import ARCHS, TRANSFORMER_ARCHS
from . import cpu as bench_cpu
from .config import (
    ATTENTION,
    BACKENDS,
    BenchConfig,
    default_config,
    denoiser_batch,
    grid,
)
from .report import (
    TOY_NOTE,
    format_table,
    format_target,
    noisy_rows,
    write_results,
)
from . import measure
from .measure import check_settings, environment


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="tomesd-bench",
        description="Speed and peak memory of one UNet step (classifier-free-guidance batch), baseline "
        "against Token Merging, over resolutions and ratios. Built-in architectures use random weights "
        "(speed and memory do not depend on them): nothing is downloaded.",
        epilog="Defaults: the SD 1.5 UNet (--arch sd15). On a GPU the grid --resolutions 512,1024,2048 --ratios "
        "0.3,0.5,0.7 --dtype fp16 --steps 10. On a CPU, unless a grid argument is given: interleaved rounds (--steps, "
        "default 4) of a whole step at 512 px and of the finest-level block at 1024 px, apply_patch's defaults "
        "against ratio 0.7 + prop_attn + merge_mlp, with noise bands and load warnings (tomesd.bench.cpu). "
        "--arch tiny is a toy at 1/10 width for quick checks: its speed-ups are not SD 1.5's.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--arch", choices=sorted(ARCHS) + sorted(TRANSFORMER_ARCHS),
                       help="built-in model with random weights (default sd15; tiny is a toy for quick checks; "
                       "sd3 = SD 3.5 Medium and flux = Flux.1 dev transformers, see --layers)")
    which.add_argument("--model", help=models.model_help("a local UNet directory"))
    p.add_argument("--resolutions", type=cli.comma_list(int), help="image sides in px, comma-separated")
    p.add_argument("--ratios", type=cli.comma_list(float), help="ToMe ratios, comma-separated")
    p.add_argument("--batch", type=cli.positive, default=1, help="images per step; the UNet sees twice as many (CFG)")
    p.add_argument("--dtype", choices=tuple(models.DTYPES))
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--attention", choices=ATTENTION, default="sdpa",
                   help="diffusers attention processor: sdpa (AttnProcessor2_0) or math (AttnProcessor)")
    p.add_argument("--backend", choices=BACKENDS, help="tomesd ops backend (default: $TOMESD_BACKEND, else auto)")
    p.add_argument("--steps", type=cli.positive, help="timed windows per point (median reported); a window is --calls UNet calls")
    p.add_argument("--warmup", type=int, help="untimed calls before them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=cli.positive, help="with --arch sd3 / flux: keep K blocks of each kind (every block "
                   "runs at the full token grid, so the per-block speed-up is the full model's; Flux.1 dev needs "
                   "~48 GB in fp32)")
    g = p.add_argument_group("ToMe settings (other apply_patch keywords; every setting runs at every --ratios value)")
    g.add_argument("--set", dest="assign", action="append", type=cli.assignment, default=[], metavar="KEY=V1[,V2]",
                   help="an axis: an apply_patch keyword and its values, e.g. --set mode=tokens,kv --set plan_every=1,2,5 "
                   "(repeat for more axes; the settings are their product)")
    g.add_argument("--variant", action="append", type=cli.setting, default=[], metavar="KEY=V[,KEY=V]",
                   help="one setting, e.g. --variant mode=kv,prop_attn=false (repeat for more; --set axes multiply them)")
    g.add_argument("--calls", type=cli.positive, help="consecutive UNet calls per timed window (default 1; raised to "
                   "a multiple of each setting's plan_every)")
    p.add_argument("--interleave", action="store_true",
                   help="measure round-robin in one process (window 1 of every point, then window 2, ...): load "
                   "changes hit all points alike; peak memory only on a GPU")
    p.add_argument("--target-speedup", type=cli.positive_number, metavar="X",
                   help="print, per resolution, the smallest ratio of --ratios (and the setting) whose speedup "
                   "reaches X, as a mapping for apply_patch(ratio=...); also in results.json")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="measure each point in a fresh child process (default: on for a CPU, where peak RSS "
                   "only grows within a process)")
    p.add_argument("--threads", type=cli.positive, help="torch threads (default on a CPU: OMP_NUM_THREADS when set, else "
                   "the cores free now: physical cores within the affinity mask and cgroup quota, less the load average)")
    p.add_argument("--out", default="tomesd-bench-results", help="directory for results.json, results.csv, bench.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not cli.available("diffusers"):
        parser.error("needs diffusers: pip install 'tomesd[bench]'")
    if args.backend is None:
        from .. import ops

        try:
            args.backend = ops.requested_backend()
        except ValueError as error:
            parser.error(str(error))
    if args.model is not None:
        problem = models.model_problem(args.model, "unet")
        if problem:
            parser.error(f"--model {problem}")
    overrides = {k: getattr(args, k) for k in (
        "arch", "model", "resolutions", "ratios", "dtype", "steps", "warmup", "isolate", "calls", "target_speedup",
        "layers")
        if getattr(args, k) is not None}
    axes = cli.add_axes(parser, {}, args.assign)
    problem = cli.cuda_problem(args.device)
    if problem:
        parser.error(problem)
    set_threads(args)
    if not cli.available("matplotlib"):
        print("tomesd.bench: matplotlib is not installed: writing results.json and results.csv only "
              "(pip install matplotlib, or 'tomesd[bench]', for bench.png)", file=sys.stderr)
    try:
        cfg = default_config(args.device, batch=args.batch, attention=args.attention, backend=args.backend,
                             seed=args.seed, grid=axes, variants=args.variant, interleave=args.interleave, **overrides)
        check_settings(cfg)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    if cpu_default(args, cfg):
        return run_cpu_default(args, cfg)
    where = cfg.model or f"--arch {cfg.arch} ({'TOY architecture, ' if cfg.toy else ''}random weights)"
    print(f"tomesd.bench: {where}, {cfg.dtype} on {cfg.device}, batch {cfg.batch} ({denoiser_batch(cfg)} rows per call), "
          f"{cfg.warmup} warmup calls + {cfg.steps} timed windows of {cfg.calls}+ calls per point, {len(grid(cfg))} "
          f"points{', interleaved' if cfg.interleave else ''}", file=sys.stderr)
    try:
        env = environment(cfg)
    except RuntimeError as error:  # e.g. --backend cuda where the kernels cannot load
        parser.error(str(error))
    result = measure.run(cfg, progress=not args.no_progress, env=env)  # measure.run: the grid's seam
    print(f"torch {env['torch']}, diffusers {env['diffusers']}, tomesd {env['tomesd']}, backend {env['backend']}, "
          f"{env['gpu'] or 'CPU ' + str(env['cpu_threads']) + ' threads'}; memory: {env['memory']}")
    print(format_table(result))
    if result.target is not None:
        print(format_target(result.target))
    noisy = noisy_rows(result)
    if noisy:
        where = ", ".join(f"{r['resolution']} px {r['setting']}" for r in noisy)
        print(f"warning: step times varied by more than 50% at {where}: something else was using the "
              f"{'GPU' if cfg.on_gpu else 'CPU'}; rerun on an idle machine or raise --steps", file=sys.stderr)
    paths = write_results(result, args.out)
    print("wrote " + ", ".join(paths.values()))
    return 0


GRID_ARGS = ("model", "resolutions", "ratios", "calls", "isolate", "target_speedup", "layers")


def cpu_default(args: argparse.Namespace, cfg: BenchConfig) -> bool:
    """The CPU default (tomesd.bench.cpu) runs on a CPU when no grid was asked for."""
    asked = any(getattr(args, k) is not None for k in GRID_ARGS) or args.assign or args.variant or args.interleave
    return not cfg.on_gpu and not asked and cfg.arch not in TRANSFORMER_ARCHS


def set_threads(args: argparse.Namespace) -> None:
    """On a CPU, torch's threads = --threads, else OMP_NUM_THREADS, else the free cores
    (tomesd.tools.threads), said on stderr; the line in args.threads_line, the cores in args.cores."""
    args.threads_line, args.cores = "", None
    if not cli.default_device(args.device).startswith("cuda"):
        choice = threads.set_threads(args.threads)
        args.threads_line, args.cores = choice.line, choice.cores


def run_cpu_default(args: argparse.Namespace, cfg: BenchConfig) -> int:
    """tomesd.bench.cpu.run: prints the table and the load warnings, writes results.json/csv and bench.png."""
    rounds, warmup = args.steps or 4, 1 if args.warmup is None else args.warmup
    print(f"tomesd.bench (CPU default): {cfg.arch}{' (TOY architecture)' if cfg.toy else ''}, random weights, "
          f"{cfg.dtype}; {rounds} interleaved rounds after {warmup} warmup call(s) per case", file=sys.stderr)
    print(f"  settings: {bench_cpu.settings_line()}", file=sys.stderr)
    show = (lambda text: print(f"  {text}", file=sys.stderr, flush=True)) if not args.no_progress else (lambda text: None)
    result = bench_cpu.run(cfg, rounds, warmup, show, cores=args.cores)
    env = result.env
    env["threads_line"] = args.threads_line
    print(f"torch {env['torch']}, diffusers {env['diffusers']}, tomesd {env['tomesd']}, backend {env['backend']}, "
          f"{args.threads_line}")
    if cfg.toy:
        print(f"[{TOY_NOTE}]")
    print(bench_cpu.format_rows(result.rows))
    block_px = env["cpu_default"]["block_px"]
    print(f"'finest block' is the model's first transformer block alone ({block_px} px: a "
          f"{block_px // 8}x{block_px // 8} latent), not a whole step; peak memory is not measured "
          "here (run with --resolutions for the grid with memory)")
    for line in env["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    paths = write_results(result, args.out, plotter=bench_cpu.plot)
    print("wrote " + ", ".join(paths.values()))
    return 0

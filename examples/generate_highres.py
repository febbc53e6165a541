#!/usr/bin/env python
"""Text-to-image at any resolution with Token Merging (Stable Diffusion 1.x, 2.x, XL, 3 / 3.5, Flux, and the shipped reference models).

    python examples/generate_highres.py --model photos --prompt chelsea --height 64 --width 64   # offline, a CPU, seconds

    # the high-resolution preset by default on UNet pipelines (README.md "High resolution"): 4x4 cells,
    # ratio 0.8 -> 0.9 by image side, prop_attn; --ratio / --cells / --match-window / --no-prop-attn change it
    python examples/generate_highres.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompt "a castle on a hill" --height 2048 --width 2048

    # generate at 768 px, upscale ×2 and refine with img2img (the hires pass merges at the 1536 px ratio)
    python examples/generate_highres.py --model DIR --height 768 --width 768 --hires-fix 2 --ratio "768:0.4,1536:0.6"

    # split the prompts across processes, each writing its share (one per GPU; --cpu: CPU processes)
    accelerate launch --num_processes 2 --cpu examples/generate_highres.py --model DIR --prompt "a" --prompt "b"

--model: a shipped model by name (listed under --model, with the sizes each draws well), any local
diffusers pipeline directory, or a hub id. --height/--width default to the model's size and may be
any multiple it takes (8 px for SD 1.x / 2.x / XL's VAE, 16 for SD 3 and Flux: the VAE's 8 × their patch
size 2, 2 for the pixel-space reference models); a size a shipped model does not draw well is said.
--hires-fix needs an img2img pipeline (the SD and Flux families have one; the reference models do not);
its size is rounded to that multiple.

Several processes: accelerate starts them itself on several GPUs; where it starts one (fewer than two
GPUs, or --cpu without MPI) this script runs again as --num_processes torchrun workers
(tomesd.tools.launch). On a CPU torch's threads are the free cores shared between the processes
(OMP_NUM_THREADS, which the launchers set, or --threads wins; tomesd.tools.threads).

--ratio is a float or `side:ratio` pairs, linearly interpolated in the image side sqrt(H·W) px and
resolved at every UNet call, so one mapping serves both passes of --hires-fix. Each image gets the
seed --seed + its index, whatever the number of processes. Prints time and peak memory per image
(GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS so far, which only grows).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import sys
import time

import tomesd
from tomesd.tools import cli, launch, models, threads


# The high-resolution preset for UNet pipelines (README.md "High resolution", measured on SD 1.5 in
# BENCHMARKS.md "High resolution"): one dst per 4x4 cell, ratio 0.8 up to 512 px rising to 0.9 at 1024 px
# and above, proportional attention, global matching. Transformer pipelines (SD 3, Flux), where it was
# not measured, keep apply_patch's defaults unless told otherwise.
PRESET = dict(ratio="512:0.8,1024:0.9", cells=4, prop_attn=True, match_window=None)


def _ratio_value(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"a ratio must be a number in [0, 1), got {text.strip()}")
    return value


def parse_ratio(text: str):
    """'0.5' → 0.5; '512:0.3,1024:0.5' → {512.0: 0.3, 1024.0: 0.5}: ratios in [0, 1), image sides > 0, each
    side once. Its bound, 1 − 1/cells², is checked once the cells are known (parse_args, load_pipelines)."""
    try:
        if ":" not in text:
            return _ratio_value(text)
        ratio = {}
        for item in (item for item in text.split(",") if item.strip()):
            side, sep, value = item.partition(":")
            if not sep:
                raise ValueError(f"expected side:ratio pairs, got {item.strip()!r}")
            side = float(side)
            if not (math.isfinite(side) and side > 0):
                raise ValueError(f"an image side must be a number of pixels > 0, got {item.split(':')[0].strip()}")
            if side in ratio:
                raise ValueError(f"image side {side:g} is given twice")
            ratio[side] = _ratio_value(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return ratio


def parse_window(text: str):
    """'none' → None (global matching); '5' → 5; checked by tomesd.ToMeConfig."""
    try:
        window = None if text.strip().lower() == "none" else int(text)
        tomesd.ToMeConfig(match_window=window)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return window


def _number(kind, low, high=math.inf, low_open=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value < low or (low_open and value == low) or value > high:
            bounds = f"{'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True,
                   help=models.model_help() + " (SD 1.x, 2.x, XL, 3 / 3.5, Flux); loaded by tomesd.tools.models")
    p.add_argument("--prompt", action="append", help="repeat for several prompts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--images-per-prompt", type=_number(int, 1), default=1)
    p.add_argument("--height", type=_number(int, 1), help="px (default: the model's size; a multiple it takes)")
    p.add_argument("--width", type=_number(int, 1), help="px (default: the model's size; a multiple it takes)")
    p.add_argument("--steps", type=_number(int, 1), default=30)
    p.add_argument("--guidance", type=_number(float, 0.0), help="guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=_number(int, 0), default=0)
    p.add_argument("--dtype", choices=sorted(models.DTYPES), help="default: fp16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", help="default: the accelerate process's device (cuda when available, else cpu)")
    p.add_argument("--out", default="highres.png", help="PNG path; several images are numbered (out-000.png, ...)")
    p.add_argument("--ratio", type=parse_ratio,
                   help=f"ToMe ratio: a float or side:ratio pairs (default on UNet pipelines {PRESET['ratio']}, the "
                   "high-resolution preset of README.md; elsewhere apply_patch's 0.5)")
    p.add_argument("--cells", type=_number(int, 1), metavar="N",
                   help=f"one dst token per N x N cell (sx = sy = N; default {PRESET['cells']} on UNet pipelines, else 2)")
    p.add_argument("--match-window", type=parse_window, metavar="K",
                   help="local matching: an odd k >= 1 (a src compares with the dst of the k x k cells around it), "
                   "or 'none' for global matching (the default)")
    p.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="proportional attention (default on UNet pipelines: on; elsewhere apply_patch's: on in kv mode)")
    p.add_argument("--hires-fix", type=_number(float, 1.0, 8.0, low_open=True), metavar="FACTOR",
                   help="upscale the image by FACTOR and refine it with an img2img pass")
    p.add_argument("--strength", type=_number(float, 0.0, 1.0, low_open=True), default=0.5,
                   help="img2img strength of the --hires-fix pass")
    p.add_argument("--mode", choices=("tokens", "kv"), default=None,
                   help="tomesd merging mode (default: the model's: tokens, kv on Flux)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet / transformer (after patching)")
    p.add_argument("--no-tome", action="store_true", help="baseline: do not apply tomesd")
    p.add_argument("--threads", type=_number(int, 1), help="torch threads per process on a CPU (default: "
                   "OMP_NUM_THREADS when set, else the free cores shared between the processes)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [name for name in ("diffusers", "transformers", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"needs {', '.join(missing)}: pip install 'tomesd[examples]'")
    if args.ratio is not None:  # against --cells, or the largest cells a default takes (the preset's)
        cells = args.cells or PRESET["cells"]
        given = f"--cells {cells}" if args.cells else (f"the default cells ({cells}x{cells} on UNet pipelines, "
                                                        "2x2 on SD 3 / Flux; --cells changes them)")
        try:
            tomesd.ToMeConfig(ratio=args.ratio, sx=cells, sy=cells)
        except (ValueError, TypeError) as error:
            parser.error(f"argument --ratio: too large for {given}: {error}")
    problem = models.model_problem(args.model, "pipeline", hub=False)
    if problem:
        parser.error(f"--model {problem}")
    return args


def fail(message: str):
    """Exit with `message` as the one-line error of this command (after parsing, e.g. once the model is loaded)."""
    build_parser().error(message)


def jobs(prompts, images_per_prompt: int, seed: int):
    """One (index, prompt, seed) per image, in output order; the seed does not depend on the process."""
    flat = [p for p in prompts for _ in range(images_per_prompt)]
    return [(i, prompt, seed + i) for i, prompt in enumerate(flat)]


def output_path(out: str, index: int, total: int) -> str:
    if total == 1:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}-{index:03d}{ext or '.png'}"


def hires_size(height: int, width: int, factor: float, step: int = 8):
    """(height, width) × factor, rounded to multiples of `step` (the sizes the pipeline takes)."""
    return max(step, round(height * factor / step) * step), max(step, round(width * factor / step) * step)


TEXT_PROMPT = "a photograph of an astronaut riding a horse on the moon"


def load_pipelines(args, device: str):
    """(pipeline, img2img pipeline sharing its components or None); fills in the model's defaults
    (size, prompt) and checks them against it, one line on a problem."""
    dtype = models.DTYPES[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    try:
        pipe = models.load_pipeline(args.model, dtype=dtype, device=device)
    except Exception as error:  # noqa: BLE001 - a missing hub id, a broken directory: one line each
        fail(f"--model {args.model}: cannot load it ({cli.error_line(error)})")
    size = models.pipeline_size(pipe)
    args.height, args.width = args.height or size, args.width or size
    if args.prompt is None:
        args.prompt = ["0"] if models.is_class_pipeline(pipe) else [TEXT_PROMPT]
    problems = [models.prompt_problem(pipe, p) for p in args.prompt] + [models.size_problem(pipe, args.height, args.width)]
    if args.negative_prompt is not None and models.is_class_pipeline(pipe):
        problems.append(f"--negative-prompt: {type(pipe).__name__} takes none")
    img2img = None
    if args.hires_fix:
        from diffusers import AutoPipelineForImage2Image

        try:
            img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        except ValueError:
            problems.append(f"--hires-fix: {type(pipe).__name__} has no img2img pipeline to refine with")
    problem = next((p for p in problems if p), "")
    if problem:
        fail(problem)
    if img2img is not None:
        img2img.set_progress_bar_config(disable=True)
    resolve_preset(args, hasattr(pipe, "unet"))
    if not args.no_tome:
        tome = dict(ratio=args.ratio, sx=args.cells, sy=args.cells, seed=args.seed, mode=args.mode,
                    match_window=args.match_window, prop_attn=args.prop_attn)
        try:  # e.g. --ratio 0.9 with --cells 2, or a mode the model refuses (--mode tokens on Flux)
            tomesd.apply_patch(pipe, **tome)
            if img2img is not None and not tomesd.is_patched(img2img):  # from_pipe shares the (patched) UNet
                tomesd.apply_patch(img2img, **tome)
        except (ValueError, TypeError) as error:
            fail(f"tomesd settings: {cli.error_line(error)}")
    if args.compile:
        (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).compile()
    return pipe, img2img


def resolve_preset(args, unet: bool) -> None:
    """Fill the ToMe settings not given on the command line: the high-resolution PRESET on UNet
    pipelines, apply_patch's defaults elsewhere."""
    preset = dict(PRESET, ratio=parse_ratio(PRESET["ratio"])) if unet else dict(ratio=0.5, cells=2)
    for name in ("ratio", "cells", "prop_attn"):
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name))


def describe_ratio(ratio, height: int, width: int, cells: int = 2) -> str:
    resolved = tomesd.ToMeConfig(ratio=ratio, sx=cells, sy=cells).schedule.resolve(height, width, 1)
    return f"ratio {resolved:.3g} at {width}x{height}"


def peak_memory(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    import resource

    return f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def generate(pipe, img2img, args, prompt: str, seed: int, device: str):
    import torch
    from PIL import Image

    common = dict(prompt=prompt, num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(seed))
    if args.negative_prompt is not None:
        common["negative_prompt"] = args.negative_prompt
    if args.guidance is not None:
        common["guidance_scale"] = args.guidance
    image = pipe(height=args.height, width=args.width, **common).images[0]
    if img2img is not None:
        height, width = hires_size(args.height, args.width, args.hires_fix, models.size_multiple(pipe))
        upscaled = image.resize((width, height), Image.LANCZOS)
        common["generator"] = torch.Generator("cpu").manual_seed(seed)
        if "height" in inspect.signature(img2img.__call__).parameters:  # SD 3 / Flux: else their default size
            common.update(height=height, width=width)
        image = img2img(image=upscaled, strength=args.strength, **common).images[0]
    return image


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from accelerate import PartialState

    # On a CPU (--device cpu, `accelerate launch --cpu`, or no GPU), processes talk over gloo.
    use_cpu = (args.device or "").startswith("cpu") or not torch.cuda.is_available() or \
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    if launch.simple_launcher_asked(os.environ):  # accelerate launch --num_processes N started one process
        processes = launch.asked_processes(launch.parent_argv())
        if processes != 1:
            problem = launch.relaunch_problem(processes, use_cpu, torch.cuda.device_count())
            if problem:
                fail(problem)
            print(f"accelerate launch started one process for --num_processes {processes}: running {processes} "
                  "torchrun workers", file=sys.stderr, flush=True)
            return launch.relaunch(processes, os.path.abspath(__file__), sys.argv[1:] if argv is None else argv)
    state = PartialState(cpu=use_cpu)
    device = args.device or str(state.device)
    pipe, img2img = load_pipelines(args, device)
    if not device.startswith("cuda"):  # after load_pipelines' checks: an error stays one line
        threads.set_threads(args.threads, processes=state.num_processes, say=state.is_main_process)
    todo = jobs(args.prompt, args.images_per_prompt, args.seed)
    note = models.size_note(args.model, args.height, args.width)
    if note and state.is_main_process:
        print(note, file=sys.stderr)
    if state.is_main_process:
        hires = hires_size(args.height, args.width, args.hires_fix, models.size_multiple(pipe)) if img2img else None
        sizes = [(args.height, args.width)] + ([hires] if hires else [])
        tome = "no tomesd" if args.no_tome else "; ".join(describe_ratio(args.ratio, h, w, args.cells) for h, w in sizes) + (
            f"; {args.cells}x{args.cells} cells, match_window {args.match_window or 'none (global)'}, prop_attn "
            f"{'default' if args.prop_attn is None else 'on' if args.prop_attn else 'off'}")
        print(f"{len(todo)} image(s) on {state.num_processes} process(es); {tome}", flush=True)
    with state.split_between_processes(todo) as mine:
        for index, prompt, seed in mine:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(device)
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            image = generate(pipe, img2img, args, prompt, seed, device)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            path = output_path(args.out, index, len(todo))
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            image.save(path)
            print(f"[process {state.process_index}] {path} ({image.width}x{image.height}, seed {seed}): "
                  f"{seconds:.2f} s, {peak_memory(device)}", flush=True)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m tomesd.bench`: speed and memory of one UNet step, baseline against ToMe.

One grid point is (resolution, ratio or baseline, setting). A setting is a dict of other
`tomesd.apply_patch` keywords (mode, prop_attn, share_plan, plan_every, ...): the product of the
`--set KEY=V1,V2` axes (as `tomesd.quality` takes them) over the `--variant KEY=V,KEY=V` list (each
one setting; none: apply_patch's defaults); every setting runs at every ratio. At each point, the
denoiser runs `warmup` untimed calls, then `steps` timed windows of consecutive calls on a
classifier-free-guidance batch (2 × --batch latents at resolution/8, a 77-token text state, SDXL's
pooled text and time ids), with the timestep changing at every call as in a sampler. A window is
`--calls` calls, raised to a multiple of the setting's plan_every, so a reused plan counts at its
real rate (one build per plan_every calls). It records:
- ms_per_step: median over windows of the window's time / its calls (CUDA events on a GPU,
  perf_counter on a CPU);
- peak_mem_mib: on a GPU torch.cuda.max_memory_allocated (reset per point): weights, inputs and
  activations; on a CPU the process's peak RSS (libraries, weights and activations);
- speedup = baseline ms / ms, mem_ratio = peak / baseline peak, at the same resolution.

Peak RSS never goes down within a process, so on a CPU each grid point runs in its own child
process (multiprocessing "forkserver": the server imports torch and diffusers once, before any
OpenMP thread exists, so each child starts in milliseconds and inherits no peak from an earlier
point). The children all start from the same server, so their peaks differ only by what the point
itself allocates. `--no-isolate` measures in-process instead; peaks are then the running maximum.

`--interleave` measures every point in one process, round-robin: window 1 of every point, then
window 2 of every point, and so on, so a machine whose load changes during the run slows all points
alike (the medians compare settings side by side). The patch is applied before each window and
removed after it. Peak memory is then measured on a GPU only (a CPU's peak RSS cannot be split
between points of one process).

`--target-speedup X` reads the measured grid: for each setting and resolution, the smallest ratio of
--ratios whose speedup reaches X (a grid search, not a bisection: the answer is one of the ratios
given, so give a finer --ratios for a finer answer). It prints the result as a mapping for
`apply_patch(ratio=...)`, the setting that reaches X with the smallest ratios, and, plainly, each
resolution where no ratio of the grid reaches X; results.json holds it under "target".

Out of memory at one point (a CUDA OOM, a failed CPU allocation, or a child killed by the kernel)
marks that row "OOM" and the grid goes on. Other errors stop the run.

The UNet is a built-in architecture with random weights (`--arch`, tomesd.tools.archs) or a model
(`--model`: "reference", the shipped digits model; a local pipeline or UNet directory; a hub id),
loaded by tomesd.tools.models. Every setting is applied once at every ratio to the model (without
weights) before any timing: a setting the model refuses is a one-line error, not a failed run.

The default is the real SD 1.5 UNet on a GPU and on a CPU alike: the speed-ups it shows are the ones
a user gets. On a GPU it is the grid above (512/1024/2048 px, ratios 0.3/0.5/0.7). On a CPU, when no
grid is asked for (no --model, --resolutions, --ratios, --set, --variant, --interleave,
--target-speedup, --calls, --isolate), it is tomesd.bench.cpu: interleaved rounds of a whole step at
512 px and of the finest-level block at 1024 px, apply_patch's defaults against the fast
setting (ratio 0.7 + prop_attn + merge_mlp), medians with their noise band, torch threads = the free cores
(tomesd.tools.threads), bench.png (tomesd.bench.cpu.plot), and a warning when the
machine is loaded (a few minutes on 2 cores). `--arch tiny` is a
toy (SD 1.5's layout at 1/10 width) whose attention dominates far more than SD 1.5's, so its
speed-ups are larger; it is labelled as such wherever its results appear.

matplotlib (bench.png) and tqdm (progress bar) are optional: without them the run says so up front
and writes results.json and results.csv only.

API (used by examples/speed_memory.ipynb): `BenchConfig`, `default_config`, `run`, `format_table`,
`plot`, `write_results`, `target_ratios`, and the CPU default's `cpu.run`, `cpu.format_rows`, `cpu.plot`. The rooms: `config` (the run's settings and grid),
`measure` (measuring), `report` (reading a run), `cpu` (the CPU default's interleaved rounds), `command` (the
command line); timing windows and isolation are tomesd.tools.timing. Seams for tests: `measure.run` (the
grid the command line runs), tomesd.tools.timing.time_calls (every timing window).
"""
from __future__ import annotations

from ..tools.timing import is_oom, timesteps
from .command import build_parser, cpu_default, main
from .config import (
                     CPU_DEFAULTS,
                     GPU_DEFAULTS,
                     BenchConfig,
                     calls_per_window,
                     default_config,
                     denoiser_batch,
                     grid,
                     settings,
                     unet_inputs,
)
from .report import (
                     TOY_NOTE,
                     BenchResult,
                     format_table,
                     format_target,
                     noisy_rows,
                     plot,
                     target_ratios,
                     write_results,
)
from .measure import ROW_FIELDS, check_settings, environment, load_unet, measure_point, run

__all__ = [
    "BenchConfig", "BenchResult", "default_config", "run", "format_table", "format_target", "plot", "write_results",
    "target_ratios", "noisy_rows", "grid", "settings", "calls_per_window", "denoiser_batch", "unet_inputs", "load_unet",
    "measure_point", "check_settings", "environment", "timesteps", "is_oom", "TOY_NOTE", "ROW_FIELDS", "GPU_DEFAULTS",
    "CPU_DEFAULTS", "main", "build_parser", "cpu_default",
]

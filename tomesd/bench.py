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

The default is the real SD 1.5 UNet on a GPU and on a CPU alike (on a CPU at small sizes, so it ends
in about 5 minutes on 2 cores): the speed-ups it shows are the ones a user gets. `--arch tiny` is a
toy (SD 1.5's layout at 1/10 width) whose attention dominates far more than SD 1.5's, so its
speed-ups are larger; it is labelled as such wherever its results appear.

matplotlib (bench.png) and tqdm (progress bar) are optional: without them the run says so up front
and writes results.json and results.csv only.

API (used by examples/speed_memory.ipynb): `BenchConfig`, `default_config`, `run`, `format_table`,
`plot`, `write_results`, `target_ratios`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .archs import ARCHS, TRANSFORMER_ARCHS, build_transformer, transformer_inputs
from .config import ToMeConfig, max_ratio
from .quality import _assignment, parse_value

DTYPES = ("fp16", "bf16", "fp32")
ATTENTION = ("sdpa", "math")
BACKENDS = ("auto", "torch", "cuda")
GPU_DEFAULTS = dict(arch="sd15", resolutions=(512, 1024, 2048), ratios=(0.3, 0.5, 0.7), dtype="fp16", steps=10, warmup=3)
CPU_DEFAULTS = dict(arch="sd15", resolutions=(256, 512), ratios=(0.3, 0.5, 0.7), dtype="fp32", steps=3, warmup=1)
ROW_FIELDS = (
    "resolution", "method", "ratio", "setting", "status", "ms_per_step", "ms_min", "ms_max", "speedup",
    "peak_mem_mib", "start_mem_mib", "mem_ratio", "batch", "steps", "calls", "params",
)
_NOT_SETTINGS = ("model", "ratio", "patch_controlnet")  # the UNet; --ratios; a bench UNet has no ControlNet
_MIB = float(1 << 20)


@dataclass
class BenchConfig:
    """One benchmark run. `arch` (a name in tomesd.archs.ARCHS) or `model` (a local diffusers model
    directory, a UNet directory, or a hub id) gives the UNet; resolutions are image sides in px
    (multiples of 8); ratios are the ToMe ratios compared with the baseline at each resolution.
    batch: images per step (the UNet sees 2 × batch for classifier-free guidance).
    isolate: None → on for a CPU (see the module docstring), off for a GPU (and with interleave).
    grid: apply_patch keyword → values, one axis each (their product); variants: settings (dicts of
    apply_patch keywords) the axes multiply, () for apply_patch's defaults. Neither sets the ratio.
    calls: consecutive UNet calls per timed window (raised to a multiple of each setting's plan_every);
    steps: timed windows per point. interleave: round-robin over the points, in one process.
    target_speedup: also find, per setting and resolution, the smallest ratio reaching it.
    layers: for an MMDiT arch (sd3, flux), keep this many blocks of each kind (None: all); every block
    runs at the full token grid, so a cut model has the full model's per-block speed-up. Flux is not
    guided: its denoiser sees `batch` images, not 2 × batch.
    """

    arch: Optional[str] = "sd15"
    model: Optional[str] = None
    resolutions: Tuple[int, ...] = CPU_DEFAULTS["resolutions"]
    ratios: Tuple[float, ...] = CPU_DEFAULTS["ratios"]
    batch: int = 1
    dtype: str = "fp32"
    device: str = "cpu"
    attention: str = "sdpa"
    backend: str = "auto"
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    isolate: Optional[bool] = None
    grid: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)
    variants: Tuple[Dict[str, Any], ...] = ()
    calls: int = 1
    interleave: bool = False
    target_speedup: Optional[float] = None
    layers: Optional[int] = None

    def __post_init__(self):
        self.resolutions = tuple(int(r) for r in self.resolutions)
        self.ratios = tuple(float(r) for r in self.ratios)
        self.grid = {k: tuple(v) for k, v in self.grid.items()}
        self.variants = tuple(dict(v) for v in self.variants)
        problems = []
        if (self.arch is None) == (self.model is None):
            problems.append("give exactly one of arch and model")
        if self.arch is not None and self.arch not in ARCHS and self.arch not in TRANSFORMER_ARCHS:
            problems.append(f"arch must be one of {sorted(ARCHS) + sorted(TRANSFORMER_ARCHS)}, got {self.arch!r}")
        if self.layers is not None and (self.arch not in TRANSFORMER_ARCHS or self.layers < 1):
            problems.append(f"layers must be ≥ 1 and needs an MMDiT arch ({', '.join(sorted(TRANSFORMER_ARCHS))}), "
                            f"got layers={self.layers} with arch={self.arch!r}")
        if self.arch in TRANSFORMER_ARCHS and self.attention != "sdpa":
            problems.append(f"attention must be 'sdpa' for the {self.arch} transformer")
        if not self.resolutions or any(r < 64 or r % 8 for r in self.resolutions):
            problems.append(f"resolutions must be multiples of 8, at least 64, got {self.resolutions}")
        hi = max_ratio(2, 2)
        if not self.ratios or any(not 0 < r <= hi for r in self.ratios):
            problems.append(f"ratios must be in (0, {hi:g}], got {self.ratios}")
        for name, choices in (("dtype", DTYPES), ("attention", ATTENTION), ("backend", BACKENDS)):
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.batch < 1 or self.steps < 1 or self.warmup < 0 or self.calls < 1:
            problems.append("batch, steps and calls must be ≥ 1 and warmup ≥ 0")
        if self.backend == "cuda" and not str(self.device).startswith("cuda"):
            problems.append("backend 'cuda' needs a cuda device")
        if self.interleave and self.isolate:
            problems.append("interleave measures every point in one process: it cannot isolate them")
        if self.target_speedup is not None and not self.target_speedup > 0:
            problems.append(f"target_speedup must be > 0, got {self.target_speedup}")
        problems += self._setting_problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _setting_problems(self) -> List[str]:
        """Unknown keywords, empty axes, keys given twice, and values apply_patch would refuse (checked
        by ToMeConfig, without a model, at every ratio)."""
        known = patch_keywords()
        keys = set(self.grid).union(*self.variants)
        unknown = sorted(keys - set(known))
        if unknown:
            return [f"not apply_patch keywords the bench can vary: {', '.join(unknown)} (it varies "
                    f"{', '.join(known)}; the ratio comes from --ratios)"]
        problems = [f"no values for {k}" for k, v in self.grid.items() if not v]
        twice = sorted(set(self.grid).intersection(set().union(*self.variants)))
        problems += [f"{k} is both a --set axis and in a --variant" for k in twice]
        if problems:
            return problems
        for params in settings(self):
            try:
                for ratio in self.ratios:
                    ToMeConfig(ratio=ratio, **{"seed": self.seed, **params})
            except (ValueError, TypeError) as error:
                return [f"setting {setting_label(params)}: {error}"]
        return []

    @property
    def on_gpu(self) -> bool:
        return str(self.device).startswith("cuda")

    @property
    def toy(self) -> bool:
        """A built-in toy architecture: its speed-ups are not those of a real model."""
        return self.arch in ARCHS and ARCHS[self.arch].toy

    @property
    def isolated(self) -> bool:
        if self.isolate is not None:
            return self.isolate
        return not self.on_gpu and not self.interleave and _forkserver_available()


def patch_keywords() -> Tuple[str, ...]:
    """The tomesd.apply_patch keywords a bench setting may vary."""
    import inspect

    import tomesd

    return tuple(name for name in inspect.signature(tomesd.apply_patch).parameters if name not in _NOT_SETTINGS)


def settings(cfg: BenchConfig) -> List[Dict[str, Any]]:
    """The settings of cfg (dicts of apply_patch keywords, ratio apart): each variant (or {}) times
    the product of the grid axes, variants first, the last axis varying fastest."""
    axes = list(cfg.grid)
    out = []
    for variant in cfg.variants or ({},):
        for values in itertools.product(*(cfg.grid[k] for k in axes)):
            out.append({**variant, **dict(zip(axes, values))})
    return out


def setting_label(params: Dict[str, Any]) -> str:
    """'mode=kv prop_attn=False' ('' for apply_patch's defaults)."""
    return " ".join(f"{k}={v}" for k, v in params.items())


def calls_per_window(cfg: BenchConfig, params: Dict[str, Any]) -> int:
    """cfg.calls raised to a multiple of the setting's plan_every: each window holds whole plan periods."""
    every = int(params.get("plan_every", 1))
    return -(-cfg.calls // every) * every


@dataclass
class BenchResult:
    """rows: one dict per grid point (keys ROW_FIELDS); env: versions, device, backend, settings;
    target: target_ratios(...) when the run had a target speedup."""

    rows: List[Dict[str, Any]]
    env: Dict[str, Any] = field(default_factory=dict)
    target: Optional[Dict[str, Any]] = None


def default_config(device: Optional[str] = None, **overrides) -> BenchConfig:
    """The defaults for `device` (None: cuda when available): the SD 1.5 UNet, at 512/1024/2048 px in
    fp16 on a GPU, at 256/512 px in fp32 on a CPU (about 5 minutes on 2 idle cores)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base = GPU_DEFAULTS if str(device).startswith("cuda") else CPU_DEFAULTS
    values = dict(base, device=device)
    if overrides.get("model") is not None:
        values["arch"] = None
    values.update(overrides)
    return BenchConfig(**values)


def _forkserver_available() -> bool:
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods()


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_unet(cfg: BenchConfig):
    """The UNet of `cfg`: a built-in architecture with random weights, or cfg.model's UNet, on
    cfg.device in cfg.dtype with the chosen attention processor, in eval mode."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    dtype = _torch_dtype(cfg.dtype)
    if cfg.arch in TRANSFORMER_ARCHS:
        torch.manual_seed(cfg.seed)
        with torch.device(cfg.device), _quiet_diffusers():
            model = build_transformer(TRANSFORMER_ARCHS[cfg.arch], layers=cfg.layers).to(dtype)
        return model.eval().requires_grad_(False)
    if cfg.model is not None:
        with warnings.catch_warnings():  # newer diffusers call it `dtype`; 0.32 knows only `torch_dtype`
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            unet = UNet2DConditionModel.from_pretrained(cfg.model, subfolder=_unet_subfolder(cfg.model), torch_dtype=dtype)
        unet = unet.to(cfg.device)
    else:
        torch.manual_seed(cfg.seed)
        with torch.device(cfg.device):  # initialize on the device: SDXL has 2.6B parameters
            unet = UNet2DConditionModel(**ARCHS[cfg.arch].config)
        if dtype != torch.float32:
            with _quiet_diffusers():  # random weights: no "modules to keep in float32" to worry about
                unet = unet.to(dtype)
    unet.set_attn_processor(AttnProcessor2_0() if cfg.attention == "sdpa" else AttnProcessor())
    return unet.eval().requires_grad_(False)


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def _unet_subfolder(model: str) -> Optional[str]:
    """'unet' for a pipeline (directory with unet/ or a hub id), None for a UNet directory."""
    if os.path.isfile(os.path.join(model, "config.json")) and not os.path.isdir(os.path.join(model, "unet")):
        return None
    return "unet"


def unet_inputs(unet, cfg: BenchConfig, resolution: int, text_len: int = 77) -> Tuple[tuple, dict]:
    """(args, kwargs) of one guided UNet step: latent [2·batch, C, res/8, res/8], timestep, text
    states [2·batch, text_len, cross_attention_dim]; SDXL-style models also get pooled text and
    six time ids."""
    import torch

    if cfg.arch in TRANSFORMER_ARCHS:
        arch = TRANSFORMER_ARCHS[cfg.arch]
        kwargs = transformer_inputs(arch, denoiser_batch(cfg), resolution, resolution, _torch_dtype(cfg.dtype), cfg.device,
                                    seed=cfg.seed)
        return (), kwargs
    config = unet.config
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    dtype, device = _torch_dtype(cfg.dtype), cfg.device
    batch, side = 2 * cfg.batch, resolution // 8

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cross = config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    kwargs: Dict[str, Any] = dict(encoder_hidden_states=randn(batch, text_len, cross))
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
        kwargs["added_cond_kwargs"] = dict(text_embeds=randn(batch, pooled), time_ids=time_ids.repeat(batch, 1))
    sample = randn(batch, config.in_channels, side, side)
    timestep = torch.tensor(500, device=device)
    return (sample, timestep), kwargs


def denoiser_batch(cfg: BenchConfig) -> int:
    """Rows per denoiser call: 2 × batch (classifier-free guidance), batch for the unguided Flux."""
    guided = not (cfg.arch in TRANSFORMER_ARCHS and TRANSFORMER_ARCHS[cfg.arch].family == "flux")
    return 2 * cfg.batch if guided else cfg.batch


def _text_len(cfg: BenchConfig) -> int:
    return ARCHS[cfg.arch].text_len if cfg.arch in ARCHS else 77


def is_oom(error: BaseException) -> bool:
    """True for CUDA and CPU out-of-memory errors."""
    import torch

    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def backend_env(backend: str):
    """Set TOMESD_BACKEND (read by tomesd.ops at each call) for the duration of the block."""
    previous = os.environ.get("TOMESD_BACKEND")
    os.environ["TOMESD_BACKEND"] = backend
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOMESD_BACKEND"]
        else:
            os.environ["TOMESD_BACKEND"] = previous


def _rss_mib() -> Optional[float]:
    """Current resident set size of this process (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MIB
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_mib() -> Optional[float]:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MIB if sys.platform == "darwin" else peak / 1024.0


def timesteps(first: int, count: int) -> List[int]:
    """Timesteps of calls first .. first + count − 1: a 50-step sampler's, from 999 down, cycling."""
    return [999 - 20 * (i % 50) for i in range(first, first + count)]


def _time_calls(unet, args, kwargs, cfg: BenchConfig, calls: int = 1, warmup: Optional[int] = None,
                steps: Optional[int] = None, first: int = 0) -> List[float]:
    """Milliseconds per call of each of `steps` (default cfg.steps) timed windows of `calls`
    consecutive calls, after `warmup` (default cfg.warmup) untimed calls. args = (sample, timestep),
    or () with the timestep in kwargs (MMDiT archs; Flux's scaled to [0, 1]): call i of the run gets
    timesteps(first, ...)[i]."""
    import torch

    warmup = cfg.warmup if warmup is None else warmup
    steps = cfg.steps if steps is None else steps
    timestep = args[1] if args else kwargs["timestep"]
    scale = 1000.0 if cfg.arch in TRANSFORMER_ARCHS and TRANSFORMER_ARCHS[cfg.arch].family == "flux" else 1
    ts = [torch.full_like(torch.as_tensor(timestep), t / scale) for t in timesteps(first, warmup + steps * calls)]
    if args:
        per_call = iter([((args[0], t, *args[2:]), kwargs) for t in ts])
    else:
        per_call = iter([((), {**kwargs, "timestep": t}) for t in ts])
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            a, kw = next(per_call)
            unet(*a, **kw)
        window = [[next(per_call) for _ in range(calls)] for _ in range(steps)]
        if cfg.on_gpu:
            torch.cuda.synchronize(cfg.device)
        for call_args in window:
            if cfg.on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for a, kw in call_args:
                    unet(*a, **kw)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / calls)
            else:
                t0 = time.perf_counter()
                for a, kw in call_args:
                    unet(*a, **kw)
                times.append((time.perf_counter() - t0) * 1000.0 / calls)
    return times


Point = Tuple[int, Optional[float], Dict[str, Any]]


def _new_row(cfg: BenchConfig, resolution: int, ratio: Optional[float], params: Dict[str, Any]) -> Dict[str, Any]:
    label = "baseline" if ratio is None else " ".join(filter(None, (f"tome {ratio:g}", setting_label(params))))
    return dict(resolution=resolution, method="baseline" if ratio is None else "tome", ratio=ratio, setting=label,
                status="ok", batch=denoiser_batch(cfg), steps=cfg.steps,
                calls=cfg.calls if ratio is None else calls_per_window(cfg, params),
                params=None if ratio is None else dict(params))


def _measure(unet, cfg: BenchConfig, row: Dict[str, Any], warmup: int, steps: int, first: int = 0,
             memory: bool = True) -> Dict[str, Any]:
    """Patch `unet` with the row's setting (none for the baseline), time `steps` windows, unpatch.
    Returns times (ms per call, one per window) and, when `memory`, start_mem_mib and peak_mem_mib."""
    import torch

    import tomesd

    inputs = None
    out: Dict[str, Any] = {}
    try:
        if row["ratio"] is not None:
            tomesd.apply_patch(unet, ratio=row["ratio"], **{"seed": cfg.seed, **row["params"]})
        if cfg.on_gpu:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(cfg.device)
        inputs = unet_inputs(unet, cfg, row["resolution"], _text_len(cfg))
        if memory:
            out["start_mem_mib"] = torch.cuda.memory_allocated(cfg.device) / _MIB if cfg.on_gpu else _rss_mib()
        with backend_env(cfg.backend):
            out["times"] = _time_calls(unet, *inputs, cfg, calls=row["calls"], warmup=warmup, steps=steps, first=first)
        if memory:
            out["peak_mem_mib"] = torch.cuda.max_memory_allocated(cfg.device) / _MIB if cfg.on_gpu else _peak_rss_mib()
    finally:
        tomesd.remove_patch(unet)
        del inputs
        if cfg.on_gpu:
            gc.collect()
            torch.cuda.empty_cache()
    return out


def _summarize(row: Dict[str, Any], times: List[float]) -> None:
    row.update(ms_per_step=statistics.median(times), ms_min=min(times), ms_max=max(times))


def measure_point(unet, cfg: BenchConfig, resolution: int, ratio: Optional[float],
                  params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One grid row: patch `unet` with `ratio` (None: baseline) and the setting `params`, time
    cfg.steps windows after cfg.warmup calls, unpatch. OOM → status "OOM"."""
    row = _new_row(cfg, resolution, ratio, params or {})
    try:
        measured = _measure(unet, cfg, row, cfg.warmup, cfg.steps)
    except Exception as error:  # noqa: BLE001 - only OOM is absorbed; everything else is re-raised
        if not is_oom(error):
            raise
        row["status"] = "OOM"
        return row
    _summarize(row, measured.pop("times"))
    row.update(measured)
    return row


def _child(cfg: BenchConfig, point: Point, conn) -> None:
    """Forkserver child: build the UNet, measure one point, send ("ok", row) or ("error", text)."""
    try:
        unet = load_unet(cfg)
        conn.send(("ok", measure_point(unet, cfg, *point)))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which decides
        kind = "oom" if is_oom(error) else "error"
        conn.send((kind, "".join(traceback.format_exception(type(error), error, error.__traceback__))))
    finally:
        conn.close()


_PRELOADED = False


def _isolated_point(cfg: BenchConfig, point: Point) -> Dict[str, Any]:
    import multiprocessing

    global _PRELOADED
    ctx = multiprocessing.get_context("forkserver")
    if not _PRELOADED:
        ctx.set_forkserver_preload(["torch", "diffusers", "tomesd", "tomesd.archs"])
        _PRELOADED = True
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(cfg, point, send), daemon=True)
    child.start()
    send.close()
    try:
        kind, payload = receive.recv()
    except EOFError:  # the child died without a word: the kernel's OOM killer, most likely
        kind, payload = None, None
    child.join()
    if kind == "ok":
        return payload
    row = _new_row(cfg, *point)
    if kind == "error":
        raise RuntimeError(f"tomesd.bench: {row['resolution']} px, {row['setting']}: the measurement failed:\n{payload}")
    row["status"] = "OOM"
    if kind is None:
        row["note"] = f"child process ended with exit code {child.exitcode}"
    return row


def grid(cfg: BenchConfig) -> List[Point]:
    """(resolution, ratio or None for the baseline, setting) in run order: per resolution, the
    baseline, then every setting at every ratio (setting-major)."""
    return [(res, ratio, params) for res in cfg.resolutions
            for ratio, params in [(None, {})] + [(r, p) for p in settings(cfg) for r in cfg.ratios]]


def _run_interleaved(cfg: BenchConfig, points: List[Point], progress: bool) -> List[Dict[str, Any]]:
    """Round-robin: window k of every point, for k = 1 .. cfg.steps (cfg.warmup calls before a point's
    first window), in this process; OOM at a point ends that point only."""
    unet = load_unet(cfg)
    rows = [_new_row(cfg, *point) for point in points]
    times: List[List[float]] = [[] for _ in points]
    peaks: List[List[float]] = [[] for _ in points]
    bar = _progress([(k, i) for k in range(cfg.steps) for i in range(len(points))], progress and available("tqdm"))
    for k, i in bar:
        row = rows[i]
        bar.set_postfix_str(f"{row['resolution']}px {row['setting']} window {k + 1}")
        if row["status"] != "ok":
            continue
        try:
            measured = _measure(unet, cfg, row, cfg.warmup if k == 0 else 0, 1, first=k * row["calls"],
                                memory=cfg.on_gpu)
        except Exception as error:  # noqa: BLE001 - only OOM is absorbed; everything else is re-raised
            if not is_oom(error):
                raise
            row["status"] = "OOM"
            continue
        times[i] += measured["times"]
        if cfg.on_gpu:
            peaks[i].append(measured["peak_mem_mib"])
            row.setdefault("start_mem_mib", measured["start_mem_mib"])
    bar.close()
    for row, t, peak in zip(rows, times, peaks):
        if row["status"] == "ok":
            _summarize(row, t)
            row["peak_mem_mib"] = max(peak) if peak else None
    return rows


def _add_ratios(rows: List[Dict[str, Any]]) -> None:
    baselines = {row["resolution"]: row for row in rows if row["method"] == "baseline" and row["status"] == "ok"}
    for row in rows:
        base = baselines.get(row["resolution"])
        ok = base is not None and row["status"] == "ok"
        row["speedup"] = base["ms_per_step"] / row["ms_per_step"] if ok else None
        peak, base_peak = row.get("peak_mem_mib"), base and base.get("peak_mem_mib")
        row["mem_ratio"] = peak / base_peak if ok and peak and base_peak else None


def environment(cfg: BenchConfig) -> Dict[str, Any]:
    """Versions, device, the tomesd backend a tensor of this device and dtype gets (and why others
    were refused), and the settings of the run."""
    import diffusers
    import torch

    import tomesd
    from tomesd import ops

    probe = torch.empty(1, device=cfg.device, dtype=_torch_dtype(cfg.dtype))
    with backend_env(cfg.backend):
        backend, refused = ops.choose_backend(probe)
    env = dict(
        tomesd=tomesd.__version__, torch=torch.__version__, diffusers=diffusers.__version__,
        python=platform.python_version(), platform=platform.platform(), cuda=torch.version.cuda,
        device=cfg.device, gpu=torch.cuda.get_device_name(cfg.device) if cfg.on_gpu else None,
        cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
        backend=backend, backend_refused=refused,
        memory="torch.cuda.max_memory_allocated" if cfg.on_gpu else (
            "peak RSS of a fresh child process per point" if cfg.isolated else
            "not measured (interleaved points share one process)" if cfg.interleave else
            "peak RSS of this process (running max)"),
        timing=("CUDA events" if cfg.on_gpu else "perf_counter") + ", median over windows of consecutive calls"
        + (", interleaved round-robin" if cfg.interleave else ""),
        config=asdict(cfg),
    )
    if cfg.arch is not None:
        arch = ARCHS.get(cfg.arch) or TRANSFORMER_ARCHS[cfg.arch]
        env["arch"] = arch.description + (f" (cut to {cfg.layers} block(s) of each kind)" if cfg.layers else "")
        env["toy"] = cfg.toy
    return env


def run(cfg: BenchConfig, progress: bool = True, env: Optional[Dict[str, Any]] = None) -> BenchResult:
    """Measure every grid point of `cfg`; a tqdm bar on stderr when `progress` (and tqdm is
    installed). env: what `environment(cfg)` returned, if the caller already has it."""
    env = environment(cfg) if env is None else env
    points = grid(cfg)
    if cfg.interleave:
        rows = _run_interleaved(cfg, points, progress)
    else:
        rows = []
        unet = None
        bar = _progress(points, progress and available("tqdm"))
        for point in bar:
            bar.set_postfix_str(f"{point[0]}px {_new_row(cfg, *point)['setting']}")
            if cfg.isolated:
                rows.append(_isolated_point(cfg, point))
                continue
            if unet is None:
                unet = load_unet(cfg)
            rows.append(measure_point(unet, cfg, *point))
        bar.close()
    _add_ratios(rows)
    result = BenchResult(rows=[{k: row.get(k) for k in (*ROW_FIELDS, *sorted(set(row) - set(ROW_FIELDS)))} for row in rows], env=env)
    if cfg.target_speedup is not None:
        result.target = target_ratios(result, cfg.target_speedup)
    return result


def target_ratios(result: BenchResult, target: float) -> Dict[str, Any]:
    """For each setting and resolution of `result`, the smallest measured ratio whose speedup reaches
    `target` (a grid search over the ratios run). Returns {"speedup": target, "settings": [{"params",
    "setting", "ratio": {resolution: ratio}, "not_reached": {resolution: {"best_speedup", "at_ratio"}}}],
    "best": the entry reaching the target at the most resolutions with the smallest ratios, or None
    when no setting reaches it anywhere}. A resolution where no ratio could be measured (OOM, no
    baseline) is in not_reached with best_speedup None."""
    resolutions = list(dict.fromkeys(row["resolution"] for row in result.rows))
    tome = [row for row in result.rows if row["method"] == "tome"]
    entries = []
    for params in [p for i, p in enumerate(r["params"] for r in tome) if p not in [r["params"] for r in tome[:i]]]:
        entry: Dict[str, Any] = dict(params=params, setting=" ".join(filter(None, ("tome", setting_label(params)))),
                                     ratio={}, not_reached={})
        for res in resolutions:
            rows = [r for r in tome if r["params"] == params and r["resolution"] == res and r["speedup"] is not None]
            hits = sorted(r["ratio"] for r in rows if r["speedup"] >= target)
            if hits:
                entry["ratio"][res] = hits[0]
            else:
                best = max(rows, key=lambda r: r["speedup"], default=None)
                entry["not_reached"][res] = dict(best_speedup=best and best["speedup"], at_ratio=best and best["ratio"])
        entries.append(entry)
    reaching = [e for e in entries if e["ratio"]]
    best = min(reaching, key=lambda e: (-len(e["ratio"]), sum(e["ratio"].values()) / len(e["ratio"])), default=None)
    return dict(speedup=target, settings=entries, best=best)


def format_target(target: Dict[str, Any]) -> str:
    """The target_ratios result in words: one mapping per setting, the resolutions it misses, and the
    apply_patch call of the best setting."""
    x = target["speedup"]
    lines = [f"target speedup {x:g}x: smallest ratio of the grid reaching it, per resolution (px):"]
    width = max(len(e["setting"]) for e in target["settings"]) if target["settings"] else 0
    for e in target["settings"]:
        text = f"  {e['setting'].ljust(width)}  {_mapping(e['ratio']) if e['ratio'] else '-'}"
        misses = [f"{res} px (best {_fmt(m['best_speedup'], '.2f', 'x')}" + (
            f" at ratio {m['at_ratio']:g})" if m["at_ratio"] is not None else ")") for res, m in e["not_reached"].items()]
        if misses:
            text += f"   not reached at {', '.join(misses)}"
        lines.append(text)
    best = target["best"]
    if best is None:
        lines.append(f"no setting reaches {x:g}x at any resolution: raise --ratios or lower the target")
        return "\n".join(lines)
    kwargs = "".join(f", {k}={v!r}" for k, v in best["params"].items())
    lines.append(f"use: apply_patch(model, ratio={_mapping(best['ratio'])}{kwargs})")
    if best["not_reached"]:
        lines.append(f"  it does not reach {x:g}x at {', '.join(str(r) for r in best['not_reached'])} px, where the "
                     "mapping gives the ratio of its nearest size")
    return "\n".join(lines)


def _mapping(ratios: Dict[int, float]) -> str:
    return "{" + ", ".join(f"{res}: {ratio:g}" for res, ratio in ratios.items()) + "}"


class _NoBar(list):
    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(points, show: bool):
    if not show:
        return _NoBar(points)
    from tqdm import tqdm

    return tqdm(points, desc="tomesd.bench", unit="point", file=sys.stderr)


def available(module: str) -> bool:
    """Whether an optional dependency can be imported."""
    return importlib.util.find_spec(module) is not None


def noisy_rows(result: BenchResult, spread: float = 0.5) -> List[Dict[str, Any]]:
    """Rows whose timed steps differ by more than `spread` × their median: a busy machine."""
    return [row for row in result.rows if row["status"] == "ok" and row.get("ms_max") is not None
            and row["ms_max"] - row["ms_min"] > spread * row["ms_per_step"]]


def _fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


TOY_NOTE = "toy architecture (--arch tiny): its speed-ups are larger than SD 1.5's; run without --arch for real ones"


def format_table(result: BenchResult) -> str:
    """The rows as an aligned text table (under a warning line for a toy architecture); a "calls"
    column (UNet calls per timed window) when some window holds more than one."""
    show_calls = any((row.get("calls") or 1) > 1 for row in result.rows)
    header = ("res px", "method", "ms/step", "speedup", "peak MiB", "mem ratio") + (("calls",) if show_calls else ())
    lines = [header]
    for row in result.rows:
        method = row.get("setting") or ("baseline" if row["method"] == "baseline" else f"tome {row['ratio']:g}")
        calls = (str(row.get("calls") or 1),) if show_calls else ()
        if row["status"] != "ok":
            lines.append((str(row["resolution"]), method, row["status"], "-", "-", "-") + calls)
            continue
        lines.append((
            str(row["resolution"]), method, _fmt(row["ms_per_step"], ".1f"), _fmt(row["speedup"], ".2f", "x"),
            _fmt(row["peak_mem_mib"], ".0f"), _fmt(row["mem_ratio"], ".2f"),
        ) + calls)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.rjust(w) if i != 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    if result.env.get("toy"):
        out.insert(0, f"[{TOY_NOTE}]")
    return "\n".join(out)


def plot(result: BenchResult, path: Optional[str] = None):
    """Figure: ms/step and peak memory against resolution, one line per ratio and setting (and the baseline).
    OOM points are left out. Saved as PNG to `path` when given; returns the matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_time, ax_mem = fig.subplots(1, 2)
    for label in dict.fromkeys(row["setting"] for row in result.rows):
        rows = [r for r in result.rows if r["setting"] == label and r["status"] == "ok"]
        is_tome = label != "baseline"
        style = dict(marker="o", label=label, linestyle="-" if is_tome else "--", color=None if is_tome else "black")
        ax_time.plot([r["resolution"] for r in rows], [r["ms_per_step"] for r in rows], **style)
        mem = [(r["resolution"], r["peak_mem_mib"]) for r in rows if r["peak_mem_mib"] is not None]
        ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], **style)
    env = result.env
    where = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
    ax_time.set_yscale("log")
    ax_time.yaxis.set_major_formatter(ScalarFormatter())
    for ax, ylabel in ((ax_time, "ms per UNet step (median, log scale)"), (ax_mem, "peak memory (MiB)")):
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({row["resolution"] for row in result.rows}))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    config = env.get("config", {})
    name = config.get("arch") or config.get("model")
    name = f"{name} (TOY architecture)" if env.get("toy") else name
    fig.suptitle(f"tomesd.bench: {name}, {config.get('dtype')}, {where}")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def write_results(result: BenchResult, out_dir: str, png: Optional[bool] = None) -> Dict[str, str]:
    """Write results.json (rows, environment, and target when the run had one), results.csv (params as
    JSON) and (png; None: when matplotlib is installed) bench.png into out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    png = available("matplotlib") if png is None else png
    names = ("results.json", "results.csv") + (("bench.png",) if png else ())
    paths = {name: os.path.join(out_dir, name) for name in names}
    with open(paths["results.json"], "w") as f:
        data = dict(rows=result.rows, environment=result.env)
        if result.target is not None:
            data["target"] = result.target
        json.dump(data, f, indent=2, default=str)
    columns = list(dict.fromkeys(k for row in result.rows for k in row))
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({**row, "params": json.dumps(row.get("params"))} for row in result.rows)
    if png:
        plot(result, paths["bench.png"])
    return paths


def _comma_list(kind):
    """argparse type: comma-separated values of `kind`; their ranges are checked by BenchConfig."""
    noun = "integers" if kind is int else "numbers"

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {noun}, got {text!r}") from None

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {text}")
    return value


def _variant(text: str) -> Dict[str, Any]:
    """argparse type: one setting, 'mode=kv,prop_attn=false' → {"mode": "kv", "prop_attn": False}."""
    params: Dict[str, Any] = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
        if key in params:
            raise argparse.ArgumentTypeError(f"{key} given twice in {text!r}")
        params[key] = parse_value(value)
    if not params:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return params


def _speedup(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 1.5, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tomesd-bench",
        description="Speed and peak memory of one UNet step (classifier-free-guidance batch), baseline "
        "against Token Merging, over resolutions and ratios. Built-in architectures use random weights "
        "(speed and memory do not depend on them): nothing is downloaded.",
        epilog="Defaults: the SD 1.5 UNet (--arch sd15), ratios 0.3,0.5,0.7; on a GPU --resolutions "
        "512,1024,2048 --dtype fp16 --steps 10; on a CPU --resolutions 256,512 --dtype fp32 --steps 3 (about 5 "
        "minutes on 2 cores). --arch tiny is a toy at 1/10 width for quick checks: its speed-ups are not SD 1.5's.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--arch", choices=sorted(ARCHS) + sorted(TRANSFORMER_ARCHS),
                       help="built-in model with random weights (default sd15; tiny is a toy for quick checks; "
                       "sd3 = SD 3.5 Medium and flux = Flux.1 dev transformers, see --layers)")
    which.add_argument("--model", help="local diffusers model directory (or UNet directory), or a hub id")
    p.add_argument("--resolutions", type=_comma_list(int), help="image sides in px, comma-separated")
    p.add_argument("--ratios", type=_comma_list(float), help="ToMe ratios, comma-separated")
    p.add_argument("--batch", type=_positive, default=1, help="images per step; the UNet sees twice as many (CFG)")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--attention", choices=ATTENTION, default="sdpa",
                   help="diffusers attention processor: sdpa (AttnProcessor2_0) or math (AttnProcessor)")
    p.add_argument("--backend", choices=BACKENDS, help="tomesd ops backend (default: $TOMESD_BACKEND, else auto)")
    p.add_argument("--steps", type=_positive, help="timed windows per point (median reported); a window is --calls UNet calls")
    p.add_argument("--warmup", type=int, help="untimed calls before them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=_positive, help="with --arch sd3 / flux: keep K blocks of each kind (every block "
                   "runs at the full token grid, so the per-block speed-up is the full model's; Flux.1 dev needs "
                   "~48 GB in fp32)")
    g = p.add_argument_group("ToMe settings (other apply_patch keywords; every setting runs at every --ratios value)")
    g.add_argument("--set", dest="assign", action="append", type=_assignment, default=[], metavar="KEY=V1[,V2]",
                   help="an axis: an apply_patch keyword and its values, e.g. --set mode=tokens,kv --set plan_every=1,2,5 "
                   "(repeat for more axes; the settings are their product)")
    g.add_argument("--variant", action="append", type=_variant, default=[], metavar="KEY=V[,KEY=V]",
                   help="one setting, e.g. --variant mode=kv,prop_attn=false (repeat for more; --set axes multiply them)")
    g.add_argument("--calls", type=_positive, help="consecutive UNet calls per timed window (default 1; raised to "
                   "a multiple of each setting's plan_every)")
    p.add_argument("--interleave", action="store_true",
                   help="measure round-robin in one process (window 1 of every point, then window 2, ...): load "
                   "changes hit all points alike; peak memory only on a GPU")
    p.add_argument("--target-speedup", type=_speedup, metavar="X",
                   help="print, per resolution, the smallest ratio of --ratios (and the setting) whose speedup "
                   "reaches X, as a mapping for apply_patch(ratio=...); also in results.json")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="measure each point in a fresh child process (default: on for a CPU, where peak RSS "
                   "only grows within a process)")
    p.add_argument("--out", default="tomesd-bench-results", help="directory for results.json, results.csv, bench.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def model_problem(model: str) -> str:
    """Why `model` cannot give a UNet, in one line ("" if it looks usable): a local directory must
    hold a diffusers pipeline (unet/config.json) or a UNet (config.json); anything else must be a
    hub id (owner/name) whose config loads (from the cache or the hub)."""
    if os.path.isdir(model):
        if os.path.isfile(os.path.join(model, "unet", "config.json")) or os.path.isfile(os.path.join(model, "config.json")):
            return ""
        return f"{model} is a directory but holds no diffusers model (no unet/config.json or config.json)"
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return f"{model}: no such model directory (and not a hub id owner/name)"
    from diffusers import UNet2DConditionModel

    try:
        UNet2DConditionModel.load_config(model, subfolder=_unet_subfolder(model))
    except Exception as error:  # noqa: BLE001 - any failure is reported in one line
        text = str(error).strip().splitlines()
        return f"{model}: cannot load its UNet config ({type(error).__name__}: {text[0] if text else ''})"
    return ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not available("diffusers"):
        parser.error("needs diffusers: pip install 'tomesd[bench]'")
    if args.backend is None:
        from . import ops

        try:
            args.backend = ops.requested_backend()
        except ValueError as error:
            parser.error(str(error))
    if args.model is not None:
        problem = model_problem(args.model)
        if problem:
            parser.error(f"--model {problem}")
    overrides = {k: getattr(args, k) for k in (
        "arch", "model", "resolutions", "ratios", "dtype", "steps", "warmup", "isolate", "calls", "target_speedup",
        "layers")
        if getattr(args, k) is not None}
    axes: Dict[str, tuple] = {}
    for key, values in args.assign:
        if key in axes:
            parser.error(f"--set {key}: already given")
        axes[key] = values
    device = args.device
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {device}: no CUDA device is available")
    try:
        cfg = default_config(device, batch=args.batch, attention=args.attention, backend=args.backend,
                             seed=args.seed, grid=axes, variants=args.variant, interleave=args.interleave, **overrides)
    except ValueError as error:
        parser.error(str(error))
    where = cfg.model or f"--arch {cfg.arch} ({'TOY architecture, ' if cfg.toy else ''}random weights)"
    print(f"tomesd.bench: {where}, {cfg.dtype} on {cfg.device}, batch {cfg.batch} ({denoiser_batch(cfg)} rows per call), "
          f"{cfg.warmup} warmup calls + {cfg.steps} timed windows of {cfg.calls}+ calls per point, {len(grid(cfg))} "
          f"points{', interleaved' if cfg.interleave else ''}", file=sys.stderr)
    if not available("matplotlib"):
        print("tomesd.bench: matplotlib is not installed: writing results.json and results.csv only "
              "(pip install matplotlib, or 'tomesd[bench]', for bench.png)", file=sys.stderr)
    try:
        env = environment(cfg)
    except RuntimeError as error:  # e.g. --backend cuda where the kernels cannot load
        parser.error(str(error))
    result = run(cfg, progress=not args.no_progress, env=env)
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


if __name__ == "__main__":
    sys.exit(main())

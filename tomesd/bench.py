"""`python -m tomesd.bench`: speed and memory of one UNet step, baseline against ToMe.

One grid point is (resolution, ratio or baseline). At each, the denoiser runs `warmup` + `steps`
forward passes on a classifier-free-guidance batch (2 × --batch latents at resolution/8, a 77-token
text state, SDXL's pooled text and time ids) and records:
- ms_per_step: median latency (CUDA events on a GPU, perf_counter on a CPU);
- peak_mem_mib: on a GPU torch.cuda.max_memory_allocated (reset per point): weights, inputs and
  activations; on a CPU the process's peak RSS (libraries, weights and activations);
- speedup = baseline ms / ms, mem_ratio = peak / baseline peak, at the same resolution.

Peak RSS never goes down within a process, so on a CPU each grid point runs in its own child
process (multiprocessing "forkserver": the server imports torch and diffusers once, before any
OpenMP thread exists, so each child starts in milliseconds and inherits no peak from an earlier
point). The children all start from the same server, so their peaks differ only by what the point
itself allocates. `--no-isolate` measures in-process instead; peaks are then the running maximum.

Out of memory at one point (a CUDA OOM, a failed CPU allocation, or a child killed by the kernel)
marks that row "OOM" and the grid goes on. Other errors stop the run.

The default is the real SD 1.5 UNet on a GPU and on a CPU alike (on a CPU at small sizes, so it ends
in about 5 minutes on 2 cores): the speed-ups it shows are the ones a user gets. `--arch tiny` is a
toy (SD 1.5's layout at 1/10 width) whose attention dominates far more than SD 1.5's, so its
speed-ups are larger; it is labelled as such wherever its results appear.

matplotlib (bench.png) and tqdm (progress bar) are optional: without them the run says so up front
and writes results.json and results.csv only.

API (used by examples/speed_memory.ipynb): `BenchConfig`, `default_config`, `run`, `format_table`,
`plot`, `write_results`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .archs import ARCHS
from .config import max_ratio

DTYPES = ("fp16", "bf16", "fp32")
ATTENTION = ("sdpa", "math")
BACKENDS = ("auto", "torch", "cuda")
GPU_DEFAULTS = dict(arch="sd15", resolutions=(512, 1024, 2048), ratios=(0.3, 0.5, 0.7), dtype="fp16", steps=10, warmup=3)
CPU_DEFAULTS = dict(arch="sd15", resolutions=(256, 512), ratios=(0.3, 0.5, 0.7), dtype="fp32", steps=3, warmup=1)
ROW_FIELDS = (
    "resolution", "method", "ratio", "status", "ms_per_step", "ms_min", "ms_max", "speedup",
    "peak_mem_mib", "start_mem_mib", "mem_ratio", "batch", "steps",
)
_MIB = float(1 << 20)


@dataclass
class BenchConfig:
    """One benchmark run. `arch` (a name in tomesd.archs.ARCHS) or `model` (a local diffusers model
    directory, a UNet directory, or a hub id) gives the UNet; resolutions are image sides in px
    (multiples of 8); ratios are the ToMe ratios compared with the baseline at each resolution.
    batch: images per step (the UNet sees 2 × batch for classifier-free guidance).
    isolate: None → on for a CPU (see the module docstring), off for a GPU.
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

    def __post_init__(self):
        self.resolutions = tuple(int(r) for r in self.resolutions)
        self.ratios = tuple(float(r) for r in self.ratios)
        problems = []
        if (self.arch is None) == (self.model is None):
            problems.append("give exactly one of arch and model")
        if self.arch is not None and self.arch not in ARCHS:
            problems.append(f"arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        if not self.resolutions or any(r < 64 or r % 8 for r in self.resolutions):
            problems.append(f"resolutions must be multiples of 8, at least 64, got {self.resolutions}")
        hi = max_ratio(2, 2)
        if not self.ratios or any(not 0 < r <= hi for r in self.ratios):
            problems.append(f"ratios must be in (0, {hi:g}], got {self.ratios}")
        for name, choices in (("dtype", DTYPES), ("attention", ATTENTION), ("backend", BACKENDS)):
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.batch < 1 or self.steps < 1 or self.warmup < 0:
            problems.append("batch and steps must be ≥ 1 and warmup ≥ 0")
        if self.backend == "cuda" and not str(self.device).startswith("cuda"):
            problems.append("backend 'cuda' needs a cuda device")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def on_gpu(self) -> bool:
        return str(self.device).startswith("cuda")

    @property
    def toy(self) -> bool:
        """A built-in toy architecture: its speed-ups are not those of a real model."""
        return self.arch is not None and ARCHS[self.arch].toy

    @property
    def isolated(self) -> bool:
        if self.isolate is not None:
            return self.isolate
        return not self.on_gpu and _forkserver_available()


@dataclass
class BenchResult:
    """rows: one dict per grid point (keys ROW_FIELDS); env: versions, device, backend, settings."""

    rows: List[Dict[str, Any]]
    env: Dict[str, Any] = field(default_factory=dict)


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


def _text_len(cfg: BenchConfig) -> int:
    return ARCHS[cfg.arch].text_len if cfg.arch is not None else 77


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


def _time_calls(unet, args, kwargs, cfg: BenchConfig) -> List[float]:
    """Milliseconds of each of cfg.steps timed calls, after cfg.warmup untimed ones."""
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(cfg.warmup):
            unet(*args, **kwargs)
        if cfg.on_gpu:
            torch.cuda.synchronize(cfg.device)
            for _ in range(cfg.steps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                unet(*args, **kwargs)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(cfg.steps):
                t0 = time.perf_counter()
                unet(*args, **kwargs)
                times.append((time.perf_counter() - t0) * 1000.0)
    return times


def measure_point(unet, cfg: BenchConfig, resolution: int, ratio: Optional[float]) -> Dict[str, Any]:
    """One grid row: patch `unet` with `ratio` (None: baseline), time it, unpatch. OOM → status "OOM"."""
    import torch

    import tomesd

    row: Dict[str, Any] = dict(
        resolution=resolution, method="baseline" if ratio is None else "tome", ratio=ratio, status="ok",
        batch=2 * cfg.batch, steps=cfg.steps,
    )
    inputs = None
    try:
        if ratio is not None:
            tomesd.apply_patch(unet, ratio=ratio, seed=cfg.seed)
        if cfg.on_gpu:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(cfg.device)
        inputs = unet_inputs(unet, cfg, resolution, _text_len(cfg))
        row["start_mem_mib"] = torch.cuda.memory_allocated(cfg.device) / _MIB if cfg.on_gpu else _rss_mib()
        with backend_env(cfg.backend):
            times = _time_calls(unet, *inputs, cfg)
        row.update(ms_per_step=statistics.median(times), ms_min=min(times), ms_max=max(times))
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(cfg.device) / _MIB if cfg.on_gpu else _peak_rss_mib()
    except Exception as error:  # noqa: BLE001 - only OOM is absorbed; everything else is re-raised
        if not is_oom(error):
            raise
        row["status"] = "OOM"
    finally:
        tomesd.remove_patch(unet)
        del inputs
        if cfg.on_gpu:
            gc.collect()
            torch.cuda.empty_cache()
    return row


def _child(cfg: BenchConfig, resolution: int, ratio: Optional[float], conn) -> None:
    """Forkserver child: build the UNet, measure one point, send ("ok", row) or ("error", text)."""
    try:
        unet = load_unet(cfg)
        conn.send(("ok", measure_point(unet, cfg, resolution, ratio)))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which decides
        kind = "oom" if is_oom(error) else "error"
        conn.send((kind, "".join(traceback.format_exception(type(error), error, error.__traceback__))))
    finally:
        conn.close()


_PRELOADED = False


def _isolated_point(cfg: BenchConfig, resolution: int, ratio: Optional[float]) -> Dict[str, Any]:
    import multiprocessing

    global _PRELOADED
    ctx = multiprocessing.get_context("forkserver")
    if not _PRELOADED:
        ctx.set_forkserver_preload(["torch", "diffusers", "tomesd", "tomesd.archs"])
        _PRELOADED = True
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(cfg, resolution, ratio, send), daemon=True)
    child.start()
    send.close()
    try:
        kind, payload = receive.recv()
    except EOFError:  # the child died without a word: the kernel's OOM killer, most likely
        kind, payload = None, None
    child.join()
    if kind == "ok":
        return payload
    if kind == "error":
        raise RuntimeError(f"tomesd.bench: {resolution} px, ratio {ratio}: the measurement failed:\n{payload}")
    row = dict(resolution=resolution, method="baseline" if ratio is None else "tome", ratio=ratio,
               status="OOM", batch=2 * cfg.batch, steps=cfg.steps)
    if kind is None:
        row["note"] = f"child process ended with exit code {child.exitcode}"
    return row


def grid(cfg: BenchConfig) -> List[Tuple[int, Optional[float]]]:
    """(resolution, ratio or None for the baseline) in run order."""
    return [(res, ratio) for res in cfg.resolutions for ratio in (None, *cfg.ratios)]


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
            "peak RSS of a fresh child process per point" if cfg.isolated else "peak RSS of this process (running max)"),
        timing="CUDA events, median" if cfg.on_gpu else "perf_counter, median",
        config=asdict(cfg),
    )
    if cfg.arch is not None:
        env["arch"] = ARCHS[cfg.arch].description
        env["toy"] = cfg.toy
    return env


def run(cfg: BenchConfig, progress: bool = True, env: Optional[Dict[str, Any]] = None) -> BenchResult:
    """Measure every grid point of `cfg`; a tqdm bar on stderr when `progress` (and tqdm is
    installed). env: what `environment(cfg)` returned, if the caller already has it."""
    env = environment(cfg) if env is None else env
    points = grid(cfg)
    rows = []
    unet = None
    bar = _progress(points, progress and available("tqdm"))
    for resolution, ratio in bar:
        bar.set_postfix_str(f"{resolution}px {'baseline' if ratio is None else f'ratio {ratio:g}'}")
        if cfg.isolated:
            rows.append(_isolated_point(cfg, resolution, ratio))
            continue
        if unet is None:
            unet = load_unet(cfg)
        rows.append(measure_point(unet, cfg, resolution, ratio))
    bar.close()
    _add_ratios(rows)
    return BenchResult(rows=[{k: row.get(k) for k in (*ROW_FIELDS, *sorted(set(row) - set(ROW_FIELDS)))} for row in rows], env=env)


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
    """The rows as an aligned text table (under a warning line for a toy architecture)."""
    header = ("res px", "method", "ms/step", "speedup", "peak MiB", "mem ratio")
    lines = [header]
    for row in result.rows:
        method = "baseline" if row["method"] == "baseline" else f"tome {row['ratio']:g}"
        if row["status"] != "ok":
            lines.append((str(row["resolution"]), method, row["status"], "-", "-", "-"))
            continue
        lines.append((
            str(row["resolution"]), method, _fmt(row["ms_per_step"], ".1f"), _fmt(row["speedup"], ".2f", "x"),
            _fmt(row["peak_mem_mib"], ".0f"), _fmt(row["mem_ratio"], ".2f"),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.rjust(w) if i != 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    if result.env.get("toy"):
        out.insert(0, f"[{TOY_NOTE}]")
    return "\n".join(out)


def plot(result: BenchResult, path: Optional[str] = None):
    """Figure: ms/step and peak memory against resolution, one line per ratio (and the baseline).
    OOM points are left out. Saved as PNG to `path` when given; returns the matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_time, ax_mem = fig.subplots(1, 2)
    methods = sorted({(row["ratio"] is not None, row["ratio"] or 0.0) for row in result.rows})
    for is_tome, ratio in methods:
        rows = [r for r in result.rows if (r["ratio"] is not None) == is_tome and (r["ratio"] or 0.0) == ratio
                and r["status"] == "ok"]
        label = f"ToMe {ratio:g}" if is_tome else "baseline"
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
        ax.legend()
    config = env.get("config", {})
    name = config.get("arch") or config.get("model")
    name = f"{name} (TOY architecture)" if env.get("toy") else name
    fig.suptitle(f"tomesd.bench: {name}, {config.get('dtype')}, {where}")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def write_results(result: BenchResult, out_dir: str, png: Optional[bool] = None) -> Dict[str, str]:
    """Write results.json, results.csv and (png; None: when matplotlib is installed) bench.png into
    out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    png = available("matplotlib") if png is None else png
    names = ("results.json", "results.csv") + (("bench.png",) if png else ())
    paths = {name: os.path.join(out_dir, name) for name in names}
    with open(paths["results.json"], "w") as f:
        json.dump(dict(rows=result.rows, environment=result.env), f, indent=2, default=str)
    columns = list(dict.fromkeys(k for row in result.rows for k in row))
    with open(paths["results.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(result.rows)
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
    which.add_argument("--arch", choices=sorted(ARCHS),
                       help="built-in UNet with random weights (default sd15; tiny is a toy for quick checks)")
    which.add_argument("--model", help="local diffusers model directory (or UNet directory), or a hub id")
    p.add_argument("--resolutions", type=_comma_list(int), help="image sides in px, comma-separated")
    p.add_argument("--ratios", type=_comma_list(float), help="ToMe ratios, comma-separated")
    p.add_argument("--batch", type=_positive, default=1, help="images per step; the UNet sees twice as many (CFG)")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--attention", choices=ATTENTION, default="sdpa",
                   help="diffusers attention processor: sdpa (AttnProcessor2_0) or math (AttnProcessor)")
    p.add_argument("--backend", choices=BACKENDS, help="tomesd ops backend (default: $TOMESD_BACKEND, else auto)")
    p.add_argument("--steps", type=_positive, help="timed UNet calls per point (median reported)")
    p.add_argument("--warmup", type=int, help="untimed calls before them")
    p.add_argument("--seed", type=int, default=0)
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
        "arch", "model", "resolutions", "ratios", "dtype", "steps", "warmup", "isolate") if getattr(args, k) is not None}
    device = args.device
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {device}: no CUDA device is available")
    try:
        cfg = default_config(device, batch=args.batch, attention=args.attention, backend=args.backend,
                             seed=args.seed, **overrides)
    except ValueError as error:
        parser.error(str(error))
    where = cfg.model or f"--arch {cfg.arch} ({'TOY architecture, ' if cfg.toy else ''}random weights)"
    print(f"tomesd.bench: {where}, {cfg.dtype} on {cfg.device}, batch {cfg.batch} (x2 CFG), "
          f"{cfg.warmup} warmup + {cfg.steps} timed steps per point, {len(grid(cfg))} points", file=sys.stderr)
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
    noisy = noisy_rows(result)
    if noisy:
        where = ", ".join(f"{r['resolution']} px {r['method']}" + (f" {r['ratio']:g}" if r["ratio"] else "") for r in noisy)
        print(f"warning: step times varied by more than 50% at {where}: something else was using the "
              f"{'GPU' if cfg.on_gpu else 'CPU'}; rerun on an idle machine or raise --steps", file=sys.stderr)
    paths = write_results(result, args.out)
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

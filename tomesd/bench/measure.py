"""Running a `tomesd.bench` grid: every setting checked on the model first, then each point
measured in this process, in a fresh child (`timing.run_in_child`), or round-robin (interleaved)."""
from __future__ import annotations

import gc
import statistics
from dataclasses import asdict
from typing import Any, Dict, List, Optional

from ..tools import cli, models, timing
from ..tools.archs import ARCHS, TRANSFORMER_ARCHS
from ..tools.models import DTYPES
from .config import (
    BenchConfig,
    Point,
    calls_per_window,
    denoiser_batch,
    grid,
    settings,
    unet_inputs,
)
from .report import BenchResult, target_ratios

ROW_FIELDS = (
    "resolution", "method", "ratio", "setting", "status", "ms_per_step", "ms_min", "ms_max", "speedup",
    "peak_mem_mib", "start_mem_mib", "mem_ratio", "batch", "steps", "calls", "params",
)


def load_unet(cfg: BenchConfig, device: Optional[str] = None):
    """The denoiser of `cfg` (tomesd.tools.models.load_denoiser): a built-in architecture with random
    weights, or cfg.model's UNet, on cfg.device (or `device`: "meta" for no weights) in cfg.dtype
    with the chosen attention processor, in eval mode."""
    return models.load_denoiser(cfg.arch or cfg.model, DTYPES[cfg.dtype], device or cfg.device, seed=cfg.seed,
                                layers=cfg.layers, attention=cfg.attention)


def check_settings(cfg: BenchConfig, model=None) -> None:
    """Apply and remove every setting of cfg at every ratio on its model (default: the architecture
    without weights, on the meta device), before any timing: a setting the model refuses fails now,
    with apply_patch's message (ValueError / TypeError)."""
    model = load_unet(cfg, "meta") if model is None else model
    points = [(ratio, params) for params in settings(cfg) for ratio in cfg.ratios]
    cli.check_settings(model, [{"ratio": ratio, **params} for ratio, params in points], base={"seed": cfg.seed},
                       label=lambda p: point_label(p["ratio"], {k: v for k, v in p.items() if k != "ratio"}))


def point_label(ratio: Optional[float], params: Dict[str, Any]) -> str:
    """'baseline', or 'tome 0.5 mode=kv' for a ratio and a setting."""
    return "baseline" if ratio is None else " ".join(filter(None, (f"tome {ratio:g}", cli.setting_label(params))))


def new_row(cfg: BenchConfig, resolution: int, ratio: Optional[float], params: Dict[str, Any]) -> Dict[str, Any]:
    """The row of one grid point, before it is measured."""
    return dict(resolution=resolution, method="baseline" if ratio is None else "tome", ratio=ratio,
                setting=point_label(ratio, params),
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
        inputs = unet_inputs(unet, cfg, row["resolution"])
        if memory:
            out["start_mem_mib"] = torch.cuda.memory_allocated(cfg.device) / timing.MIB if cfg.on_gpu else timing.rss_mib()
        with timing.backend_env(cfg.backend):
            out["times"] = timing.time_calls(unet, *inputs, calls=row["calls"], warmup=warmup, steps=steps, first=first,
                                             device=cfg.device, timestep_scale=1000.0 if cfg.flux else 1.0)
        if memory:
            out["peak_mem_mib"] = torch.cuda.max_memory_allocated(cfg.device) / timing.MIB if cfg.on_gpu else timing.peak_rss_mib()
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
    row = new_row(cfg, resolution, ratio, params or {})
    try:
        measured = _measure(unet, cfg, row, cfg.warmup, cfg.steps)
    except Exception as error:  # noqa: BLE001 - only OOM is absorbed; everything else is re-raised
        if not timing.is_oom(error):
            raise
        row["status"] = "OOM"
        return row
    _summarize(row, measured.pop("times"))
    row.update(measured)
    return row


def measure_fresh(cfg: BenchConfig, point: Point) -> Dict[str, Any]:
    """Build the denoiser and measure one point (what an isolated child runs)."""
    return measure_point(load_unet(cfg), cfg, *point)


def _isolated_point(cfg: BenchConfig, point: Point) -> Dict[str, Any]:
    kind, payload, exitcode = timing.run_in_child(measure_fresh, cfg, point)
    if kind == "ok":
        return payload
    row = new_row(cfg, *point)
    if kind == "error":
        raise RuntimeError(f"tomesd.bench: {row['resolution']} px, {row['setting']}: the measurement failed:\n{payload}")
    row["status"] = "OOM"
    if kind is None:
        row["note"] = f"child process ended with exit code {exitcode}"
    return row


def _run_interleaved(cfg: BenchConfig, unet, points: List[Point], progress: bool) -> List[Dict[str, Any]]:
    """Round-robin: window k of every point, for k = 1 .. cfg.steps (cfg.warmup calls before a point's
    first window), in this process; OOM at a point ends that point only."""
    rows = [new_row(cfg, *point) for point in points]
    times: List[List[float]] = [[] for _ in points]
    peaks: List[List[float]] = [[] for _ in points]
    bar = cli.progress([(k, i) for k in range(cfg.steps) for i in range(len(points))], "tomesd.bench", "point", progress)
    for k, i in bar:
        row = rows[i]
        bar.set_postfix_str(f"{row['resolution']}px {row['setting']} window {k + 1}")
        if row["status"] != "ok":
            continue
        try:
            measured = _measure(unet, cfg, row, cfg.warmup if k == 0 else 0, 1, first=k * row["calls"],
                                memory=cfg.on_gpu)
        except Exception as error:  # noqa: BLE001 - only OOM is absorbed; everything else is re-raised
            if not timing.is_oom(error):
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
    import torch

    from .. import ops

    probe = torch.empty(1, device=cfg.device, dtype=DTYPES[cfg.dtype])
    with timing.backend_env(cfg.backend):
        backend, refused = ops.choose_backend(probe)
    env = dict(
        cli.environment(cfg.device), backend=backend, backend_refused=refused,
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
    """Check every setting on the model (check_settings: a refused one raises ValueError / TypeError
    before any timing), then measure every grid point of `cfg`; a tqdm bar on stderr when `progress`
    (and tqdm is installed). env: what `environment(cfg)` returned, if the caller already has it."""
    env = environment(cfg) if env is None else env
    points = grid(cfg)
    unet = None if cfg.isolated else load_unet(cfg)
    check_settings(cfg, unet)
    if cfg.interleave:
        rows = _run_interleaved(cfg, unet, points, progress)
    else:
        rows = []
        bar = cli.progress(points, "tomesd.bench", "point", progress)
        try:
            for point in bar:
                bar.set_postfix_str(f"{point[0]}px {point_label(point[1], point[2])}")
                rows.append(_isolated_point(cfg, point) if cfg.isolated else measure_point(unet, cfg, *point))
        finally:
            bar.close()
            if cfg.isolated:
                timing.stop_forkserver()  # its points are done: the server would hold this process's output at exit
    _add_ratios(rows)
    result = BenchResult(rows=[{k: row.get(k) for k in (*ROW_FIELDS, *sorted(set(row) - set(ROW_FIELDS)))} for row in rows], env=env)
    if cfg.target_speedup is not None:
        result.target = target_ratios(result, cfg.target_speedup)
    return result

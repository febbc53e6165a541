"""Timing and isolating denoiser calls for `tomesd.bench`.

- `time_calls`: timed windows of consecutive denoiser calls, the timestep changing at every call as
  in a sampler (`timesteps`). It is the measuring seam: bench calls it as `timing.time_calls(...)`,
  so a test can monkeypatch it to fake times or to watch what is measured;
- memory: `rss_mib`, `peak_rss_mib` (this process), `is_oom` (CUDA and CPU out-of-memory errors);
- `backend_env`: TOMESD_BACKEND for the duration of a block;
- the machine: `physical_cores`, `load_average`, `load_warnings` (a busy machine said), and
  `noise_band` (a speed-up's band from interleaved rounds, and whether it is outside its noise);
- isolation: `run_in_child` runs one function in a fresh child of a multiprocessing "forkserver"
  (the server imports torch and diffusers once, before any OpenMP thread exists, so each child
  starts in milliseconds and inherits no peak RSS from an earlier measurement; the child gets the
  caller's torch threads). `stop_forkserver` ends that server at once; bench runs call it when their
  isolated points are done, and it is registered at exit: left to itself, the server only notices
  its parent's exit then and spends seconds tearing torch down, holding the parent's stdout and
  stderr open all the while (a pipe reading them, `pytest | tee` or a CI log, waits for it). At exit
  the resource tracker the server started is stopped too: it also inherited stdout and stderr and
  would hold them until it read its own end-of-file after this process is gone.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable, List, Optional, Tuple

MIB = float(1 << 20)
PRELOAD = ("torch", "diffusers", "tomesd", "tomesd.tools.archs")  # what the forkserver imports once


def timesteps(first: int, count: int) -> List[int]:
    """Timesteps of calls first .. first + count − 1: a 50-step sampler's, from 999 down, cycling."""
    return [999 - 20 * (i % 50) for i in range(first, first + count)]


def time_calls(model, args: tuple, kwargs: dict, *, calls: int = 1, warmup: int = 0, steps: int = 1, first: int = 0,
               device: str = "cpu", timestep_scale: float = 1.0) -> List[float]:
    """Milliseconds per call of each of `steps` timed windows of `calls` consecutive calls, after
    `warmup` untimed calls (CUDA events on a cuda `device`, perf_counter otherwise). args =
    (sample, timestep, ...), or () with the timestep in kwargs (MMDiT transformers): call i of the
    run gets timesteps(first, ...)[i] / timestep_scale (Flux takes timesteps in [0, 1]: 1000)."""
    import torch

    on_gpu = str(device).startswith("cuda")
    timestep = args[1] if args else kwargs["timestep"]
    ts = [torch.full_like(torch.as_tensor(timestep), t / timestep_scale) for t in timesteps(first, warmup + steps * calls)]
    if args:
        per_call = iter([((args[0], t, *args[2:]), kwargs) for t in ts])
    else:
        per_call = iter([((), {**kwargs, "timestep": t}) for t in ts])
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            a, kw = next(per_call)
            model(*a, **kw)
        windows = [[next(per_call) for _ in range(calls)] for _ in range(steps)]
        if on_gpu:
            torch.cuda.synchronize(device)
        for window in windows:
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for a, kw in window:
                    model(*a, **kw)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / calls)
            else:
                t0 = time.perf_counter()
                for a, kw in window:
                    model(*a, **kw)
                times.append((time.perf_counter() - t0) * 1000.0 / calls)
    return times


def physical_cores() -> int:
    """Physical CPU cores of this machine (/proc/cpuinfo's (physical id, core id) pairs on Linux),
    else os.cpu_count(); at most the CPUs this process may run on."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores, ids = set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("physical id", "core id"):
                    ids[key] = value.strip()
                elif not key and ids:
                    cores.add((ids.get("physical id"), ids.get("core id")))
                    ids = {}
        if ids:
            cores.add((ids.get("physical id"), ids.get("core id")))
    except OSError:
        pass
    known = {c for c in cores if None not in c}
    return max(1, min(len(known) or allowed, allowed))


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def load_warnings(load: Optional[float], cores: int) -> List[str]:
    """[a warning] when the 1-minute load average exceeds `cores` (the cores this process may use,
    tomesd.tools.threads), else []."""
    if load is not None and load > cores:
        return [f"load average {load:.1f} on {cores} core(s): other processes are running, so times are "
                "slower and speed-ups noisier than on a quiet machine"]
    return []


def noise_band(base: List[float], times: List[float]) -> dict:
    """A setting's speed-up band over interleaved rounds: round k's baseline time / its time, lowest and
    highest (speedup_min, speedup_max), and the verdict: "faster" when the whole band is above 1,
    "slower" when below, else "within noise"; a single round has no band (None) and says so."""
    per_round = [b / s for b, s in zip(base, times)]
    if len(per_round) < 2:  # one round has no spread to tell noise from a difference
        return dict(speedup_min=None, speedup_max=None, verdict="one round, no band")
    lo, hi = min(per_round), max(per_round)
    return dict(speedup_min=lo, speedup_max=hi, verdict="faster" if lo > 1 else "slower" if hi < 1 else "within noise")


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


def rss_mib() -> Optional[float]:
    """Current resident set size of this process (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mib() -> Optional[float]:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024.0


def forkserver_available() -> bool:
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods()


def _child(fn: Callable[..., Any], args: tuple, conn, threads: int) -> None:
    """Forkserver child: with `threads` torch threads, send ("ok", fn(*args)), or ("oom" | "error", the
    traceback as text)."""
    try:
        import torch

        torch.set_num_threads(threads)
        conn.send(("ok", fn(*args)))
    except Exception as error:  # noqa: BLE001 - reported to the parent, which decides
        kind = "oom" if is_oom(error) else "error"
        conn.send((kind, "".join(traceback.format_exception(type(error), error, error.__traceback__))))
    finally:
        conn.close()


_PRELOADED = False


def run_in_child(fn: Callable[..., Any], *args) -> Tuple[Optional[str], Any, Optional[int]]:
    """Run fn(*args) (both picklable: fn a module-level function) in a fresh forkserver child with this
    process's torch threads. Returns (kind, payload, exit code): ("ok", fn's result), ("oom" | "error",
    traceback text), or (None, None) when the child died without a word (the kernel's OOM killer, most
    likely)."""
    import multiprocessing

    import torch

    global _PRELOADED
    ctx = multiprocessing.get_context("forkserver")
    if not _PRELOADED:
        ctx.set_forkserver_preload(list(PRELOAD))
        atexit.register(_stop_at_exit)
        _PRELOADED = True
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(fn, args, send, torch.get_num_threads()), daemon=True)
    child.start()
    send.close()
    try:
        kind, payload = receive.recv()
    except EOFError:
        kind, payload = None, None
    child.join()
    return kind, payload, child.exitcode


def forkserver_pid() -> Optional[int]:
    """The pid of this process's multiprocessing forkserver while one runs, else None (read from the
    standard library's server object; None where a Python version keeps it elsewhere)."""
    from multiprocessing import forkserver

    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)


def stop_forkserver() -> None:
    """End this process's forkserver now, if one runs: SIGTERM (it holds no state; its own exit would
    tear torch down for seconds), then the standard library's stop, which closes its pipe, reaps it
    and removes its socket. The next run_in_child starts a fresh one."""
    from multiprocessing import forkserver

    server, pid = getattr(forkserver, "_forkserver", None), forkserver_pid()
    if pid is None or not hasattr(server, "_stop"):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        server._stop()
    except OSError:  # already gone, or reaped by someone else
        pass


def _stop_at_exit() -> None:
    """At exit: the forkserver, then multiprocessing's resource tracker (started with the server; it
    holds this process's stdout and stderr until it has read its end-of-file and reported leaks, after
    this process is gone, so a reader of those pipes would race it). Stopping it here does what exit
    does, only before this process ends. Not while other multiprocessing children live (they hold the
    tracker's pipe too, so it could not end before they do), and never waiting more than 5 s."""
    import multiprocessing
    import threading
    from multiprocessing import resource_tracker

    stop_forkserver()
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    if not hasattr(tracker, "_stop") or multiprocessing.active_children():
        return
    stopper = threading.Thread(target=_stop_tracker, args=(tracker,), daemon=True)
    stopper.start()
    stopper.join(5.0)


def _stop_tracker(tracker) -> None:
    try:
        tracker._stop()
    except OSError:  # already gone
        pass

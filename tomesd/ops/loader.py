"""Loads the CUDA kernels (csrc/) that add CUDA impls to the `tomesd::*` ops of tomesd.ops.torch_ops.

Order: a prebuilt `tomesd._C` (installed with TOMESD_BUILD_CUDA=1), else a JIT build with ninja
(torch.utils.cpp_extension.load, flags in tomesd/ops/build_flags.py) on the first CUDA call, cached in
$TOMESD_CACHE_DIR, else $TORCH_EXTENSIONS_DIR/tomesd, else ~/.cache/tomesd; a build that is not cached
yet is announced (logger "tomesd", once) with the time it took. csrc/ is found in a checkout
(repo/csrc) or in an installed package (tomesd/csrc).

Before first use on a device, the loaded kernels pass tomesd.ops.selfcheck there (on the tensor's device,
not the current one). A failed load refuses the CUDA backend for the process, a failed check for
that device; either warns once (RuntimeWarning) and is kept for `load_error()`,
`python -m tomesd.info` and ops.cuda_refusal; the PyTorch path runs instead. Inside a CUDA-graph
capture nothing is loaded, built or checked (the check synchronizes, which a capture forbids): a device
not checked before the capture gets the PyTorch path, which the capture records, with one
RuntimeWarning per device naming tomesd.ops.prepare (load and check before capturing); the next call
outside a capture loads and checks. `import tomesd` never triggers a build.

Seams for tests: `Loader` takes each step it runs as an argument (the build, the cache directory,
the device the check runs on, the capture test, the kernels); `loader` is the process's instance
(replace it, or call `reset()` to forget every attempt).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..matching import capturing  # whether a device's current stream captures a CUDA graph (a check may not sync there)
from . import build_flags, torch_ops  # noqa: F401  (torch_ops: the ops must be defined before the extension registers impls)
from .selfcheck import SELF_CHECK_CASES, Kernels, self_check, torch_kernels

logger = logging.getLogger("tomesd")

JIT_LIBRARY = "tomesd_cuda.so"  # what cpp_extension.load leaves in cache_dir()


def csrc_dir() -> Optional[Path]:
    """The kernel sources: tomesd/csrc in an installed package, else csrc/ of the checkout."""
    package = Path(__file__).resolve().parent.parent  # tomesd/
    for candidate in (package / "csrc", package.parent / "csrc"):
        if candidate.is_dir() and any(p.suffix in build_flags.SOURCE_SUFFIXES for p in candidate.iterdir()):
            return candidate
    return None


def sources() -> List[Path]:
    root = csrc_dir()
    return sorted(p for p in root.iterdir() if p.suffix in build_flags.SOURCE_SUFFIXES) if root else []


def cache_dir() -> Path:
    if os.environ.get("TOMESD_CACHE_DIR"):
        base = Path(os.environ["TOMESD_CACHE_DIR"])
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        base = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "tomesd"
    else:
        base = Path.home() / ".cache" / "tomesd"
    tag = f"torch{torch.__version__.split('+')[0]}_cu{(torch.version.cuda or 'none').replace('.', '')}"
    return base / tag


def prebuilt_available() -> bool:
    return importlib.util.find_spec("tomesd._C") is not None


def build_refusal() -> str:
    """Why a JIT build cannot even start here ("" if it can)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if csrc_dir() is None:
        return "the kernel sources (csrc/) are not in this installation"
    return ""


def jit_build(build_dir: Path) -> None:
    """Compiles csrc/ with ninja into build_dir (a no-op when the cached library is up to date) and loads it."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="tomesd_cuda",
        sources=[str(p) for p in sources()],
        extra_cflags=build_flags.CXX_FLAGS,
        extra_cuda_cflags=build_flags.NVCC_FLAGS,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("TOMESD_BUILD_VERBOSE", "0") == "1",
    )


def check_device(device: torch.device) -> torch.device:
    """The device a self-check for `device` runs on: that device itself."""
    return device


def _normalized(device) -> Optional[torch.device]:
    """torch.device("cuda", index) for a CUDA device (index None: the current one); None when there is none."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


@dataclass
class Loader:
    """Loads the extension once per process and self-checks it once per device (thread-safe)."""

    jit_build: Callable[[Path], None] = jit_build
    cache_dir: Callable[[], Path] = cache_dir
    prebuilt_available: Callable[[], bool] = prebuilt_available
    build_refusal: Callable[[], str] = build_refusal
    check_device: Callable[[torch.device], torch.device] = check_device
    capturing: Callable[[torch.device], bool] = capturing
    kernels: Callable[[], Kernels] = torch_kernels
    tried: bool = False
    error: str = ""
    how: str = ""
    checks: Dict[str, str] = field(default_factory=dict)  # device → "passed (...)" or "failed: <reason>"
    captured: Dict[str, str] = field(default_factory=dict)  # device → why a capture there recorded the PyTorch path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load_error(self, device=None) -> str:
        """Loads the extension on first use and self-checks it on `device` (default: the current CUDA
        device, if any); why the kernels cannot serve that device ("" if they can). Inside a CUDA-graph
        capture on a device not checked yet: nothing is loaded or checked, and the reason says so."""
        device = _normalized(device)
        if (device is not None and device.type == "cuda" and not self.error and str(device) not in self.checks
                and self.capturing(device)):
            return self._inside_capture(device)
        if not self.tried:
            with self._lock:
                if not self.tried:
                    try:
                        self.how = self._load_library()
                    except Exception as exc:  # a failed build must never break the PyTorch path
                        self.error = f"{type(exc).__name__}: {exc}".strip()
                        _warn(self.error)
                    self.tried = True
        if self.error:
            return self.error
        if device is None or device.type != "cuda":
            return ""
        key = str(device)
        if key not in self.checks:
            with self._lock:
                if key not in self.checks:
                    self.checks[key] = self._check(device)
        status = self.checks[key]
        return "" if status.startswith("passed") else f"self-check against the PyTorch path on {key} {status}"

    def _inside_capture(self, device: torch.device) -> str:
        key = str(device)
        reason = (f"the CUDA kernels were not loaded and self-checked on {key} before this CUDA-graph capture (a "
                  f"check synchronizes, which a capture forbids): the capture records the PyTorch path; call "
                  f"tomesd.ops.prepare({key!r}) before capturing to record the kernels")
        if key not in self.captured:
            self.captured[key] = reason
            warnings.warn(f"tomesd: {reason}", RuntimeWarning, stacklevel=5)
        return reason

    def _load_library(self) -> str:
        if self.prebuilt_available():
            importlib.import_module("tomesd._C")
            return "prebuilt tomesd._C"
        refusal = self.build_refusal()
        if refusal:
            raise RuntimeError(refusal)
        build_dir = self.cache_dir()
        fresh = not (build_dir / JIT_LIBRARY).exists()
        if fresh:
            logger.warning("tomesd: building the CUDA kernels (one-time, about a minute; cached in %s)...", build_dir)
        start = time.perf_counter()
        self.jit_build(build_dir)
        if fresh:
            logger.warning("tomesd: CUDA kernels built in %.0f s", time.perf_counter() - start)
        return f"JIT-built into {build_dir}"

    def _check(self, device: torch.device) -> str:
        start = time.perf_counter()
        reason = self_check(self.kernels(), self.check_device(device))
        if reason:
            _warn(f"self-check against the PyTorch path on {device} failed: {reason}")
            return f"failed: {reason}"
        return f"passed ({len(SELF_CHECK_CASES)} shapes, {time.perf_counter() - start:.1f} s)"

    def self_check_status(self) -> str:
        """"passed (...)", "failed: <reason>" or "not run ..." (each device's, when several)."""
        if not self.checks:
            loaded = self.tried and not self.error
            return "not run (no CUDA device)" if loaded and not torch.cuda.is_available() else "not run"
        if len(self.checks) == 1:
            return next(iter(self.checks.values()))
        return "; ".join(f"{device}: {status}" for device, status in self.checks.items())

    def reset(self) -> None:
        """Forgets every load attempt and check result: the next CUDA call loads and checks again."""
        with self._lock:
            self.tried, self.error, self.how = False, "", ""
            self.checks.clear()
            self.captured.clear()


def _warn(error: str) -> None:
    warnings.warn(f"tomesd: CUDA kernels unavailable ({error}); using the PyTorch path", RuntimeWarning, stacklevel=4)


loader = Loader()


def load_error(device=None) -> str:
    """Loads the extension on first use and self-checks it on `device`; why it is unavailable there
    ("" once it serves that device). See Loader.load_error."""
    return loader.load_error(device)


def loaded_from() -> str:
    """How the extension was loaded ("" if it was not)."""
    return loader.how


def self_check_status() -> str:
    """"passed (...)", "failed: <reason>" or "not run ..." for the loaded kernels."""
    return loader.self_check_status()


def reset() -> None:
    """Forgets every load attempt and self-check result (tests; the next CUDA call loads again)."""
    loader.reset()

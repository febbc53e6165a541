"""Loads the CUDA kernels (csrc/) that add CUDA impls to the `tomesd::*` ops defined in ops.py.

Order: a prebuilt `tomesd._C` (installed with TOMESD_BUILD_CUDA=1), else a JIT build with ninja
(torch.utils.cpp_extension.load) on the first CUDA call, cached in $TOMESD_CACHE_DIR, else
$TORCH_EXTENSIONS_DIR/tomesd, else ~/.cache/tomesd. csrc/ is found in a checkout (repo/csrc) or in
an installed package (tomesd/csrc). A failure warns once and is kept for `load_error()`,
`python -m tomesd.info` and ops.cuda_refusal; `import tomesd` never triggers a build.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings
from pathlib import Path
from typing import List, Optional

_lock = threading.Lock()
_state = {"tried": False, "error": "", "how": ""}

SOURCE_SUFFIXES = (".cu", ".cpp")


def csrc_dir() -> Optional[Path]:
    """The kernel sources: tomesd/csrc in an installed package, else csrc/ of the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir() and any(p.suffix in SOURCE_SUFFIXES for p in candidate.iterdir()):
            return candidate
    return None


def sources() -> List[Path]:
    root = csrc_dir()
    return sorted(p for p in root.iterdir() if p.suffix in SOURCE_SUFFIXES) if root else []


def cache_dir() -> Path:
    import torch

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
    import torch

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


def _jit_build() -> None:
    import torch  # noqa: F401  (the tomesd ops must be defined before the library registers impls)
    from torch.utils import cpp_extension

    from . import ops  # noqa: F401

    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="tomesd_cuda",
        sources=[str(p) for p in sources()],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("TOMESD_BUILD_VERBOSE", "0") == "1",
    )


def _load() -> None:
    from . import ops  # noqa: F401  (schemas first)

    if prebuilt_available():
        importlib.import_module("tomesd._C")
        _state["how"] = "prebuilt tomesd._C"
        return
    refusal = build_refusal()
    if refusal:
        raise RuntimeError(refusal)
    _jit_build()
    _state["how"] = f"JIT-built into {cache_dir()}"


def load_error() -> str:
    """Loads the extension on first use; why it is unavailable ("" once it is loaded)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _load()
                except Exception as exc:  # a failed build must never break the PyTorch path
                    _state["error"] = f"{type(exc).__name__}: {exc}".strip()
                    warnings.warn(f"tomesd: CUDA kernels unavailable ({_state['error']}); using the PyTorch path",
                                  RuntimeWarning, stacklevel=3)
                _state["tried"] = True
    return _state["error"]


def loaded_from() -> str:
    """How the extension was loaded ("" if it was not)."""
    return _state["how"]

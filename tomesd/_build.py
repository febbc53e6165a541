"""Loads the CUDA kernels (csrc/) that add CUDA impls to the `tomesd::*` ops defined in ops.py.

Order: a prebuilt `tomesd._C` (installed with TOMESD_BUILD_CUDA=1), else a JIT build with ninja
(torch.utils.cpp_extension.load) on the first CUDA call, cached in $TOMESD_CACHE_DIR, else
$TORCH_EXTENSIONS_DIR/tomesd, else ~/.cache/tomesd; a build that is not cached yet is announced
(logger "tomesd", once) with the time it took. csrc/ is found in a checkout (repo/csrc) or in an
installed package (tomesd/csrc).

Before first use the loaded kernels run a self-check against the PyTorch path (`self_check`: a few
small shapes, non-divisible grids, fp16 / bf16 / fp32, an empty batch). Any mismatch refuses the
backend. A failure of either kind warns once (RuntimeWarning) and is kept for `load_error()`,
`python -m tomesd.info` and ops.cuda_refusal; the PyTorch path runs instead. `import tomesd`
never triggers a build.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

logger = logging.getLogger("tomesd")

_lock = threading.Lock()
_state = {"tried": False, "error": "", "how": "", "self_check": "not run"}

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


JIT_LIBRARY = "tomesd_cuda.so"  # what cpp_extension.load leaves in cache_dir()


def _announced_jit_build() -> None:
    """_jit_build, telling the user when it compiles (no cached library yet) and how long it took."""
    fresh = not (cache_dir() / JIT_LIBRARY).exists()
    if fresh:
        logger.warning("tomesd: building the CUDA kernels (one-time, about a minute; cached in %s)...", cache_dir())
    start = time.perf_counter()
    _jit_build()
    if fresh:
        logger.warning("tomesd: CUDA kernels built in %.0f s", time.perf_counter() - start)


def _load() -> None:
    from . import ops  # noqa: F401  (schemas first)

    if prebuilt_available():
        importlib.import_module("tomesd._C")
        how = "prebuilt tomesd._C"
    else:
        refusal = build_refusal()
        if refusal:
            raise RuntimeError(refusal)
        _announced_jit_build()
        how = f"JIT-built into {cache_dir()}"
    device = _self_check_device()
    if device is None:
        _state["self_check"] = "not run (no CUDA device)"
    else:
        start = time.perf_counter()
        with _real_tensors():
            reason = self_check(torch_kernels(), device)
        if reason:
            _state["self_check"] = f"failed: {reason}"
            raise RuntimeError(f"self-check against the PyTorch path failed: {reason}")
        _state["self_check"] = f"passed ({len(SELF_CHECK_CASES)} shapes, {time.perf_counter() - start:.1f} s)"
    _state["how"] = how


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


def self_check_status() -> str:
    """"passed (...)", "failed: <reason>" or "not run ..." for the loaded kernels."""
    return _state.get("self_check", "not run")


# ---- Self-check of the loaded kernels against the PyTorch path ----


class Kernels(NamedTuple):
    """The op callables a self-check runs, with the torch.ops.tomesd signatures (see ops.py)."""

    best_dst: Callable
    build_plan: Callable
    merge: Callable
    unmerge: Callable


def torch_kernels() -> Kernels:
    """The registered ops: on CUDA tensors they dispatch to the kernels."""
    import torch

    ops = torch.ops.tomesd
    return Kernels(ops.best_dst, ops.build_plan, ops.merge, ops.unmerge)


def _self_check_device() -> Optional[str]:
    import torch

    return "cuda" if torch.cuda.is_available() else None


@contextlib.contextmanager
def _real_tensors():
    """The check needs real tensors even when the first CUDA call happens while torch.compile traces."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover - older torch
        unset_fake_temporarily = contextlib.nullcontext
    import torch

    with unset_fake_temporarily(), torch.no_grad():
        yield


# (B, h, w, C, sx, sy, dtype): grids that sx, sy do not divide, C not a multiple of 8 (the unvectorized
# loads), several dst tiles with B = 1 (dst slices combined), 3 x 2 cells, every dtype; then B = 0.
SELF_CHECK_CASES: Tuple[tuple, ...] = (
    (2, 13, 21, 40, 2, 2, "float16"),
    (2, 13, 21, 40, 2, 2, "float32"),
    (1, 30, 26, 64, 2, 2, "float16"),
    (1, 30, 26, 64, 2, 2, "float32"),
    (3, 9, 7, 24, 3, 2, "float32"),
    (2, 16, 12, 32, 2, 2, "bfloat16"),
    (0, 8, 8, 16, 2, 2, "float16"),
)
# Largest |score difference| allowed against the fp32 reference, and the merge error floor.
_SCORE_TOL = {"float16": 2e-3, "bfloat16": 2e-3, "float32": 1e-5}
_MERGE_FLOOR = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6}


def self_check(kernels: Kernels, device: str, cases=SELF_CHECK_CASES) -> str:
    """Runs `kernels` on `device` against the PyTorch path (tomesd.matching on the CPU, so no TF32 or
    other device setting blurs the reference); "" if they agree, else the first mismatch.

    Agreement: best_dst scores within a per-dtype tolerance and the same dst except between
    candidates within it; build_plan's slot map equal to the PyTorch plan of those matches except on
    an exact score tie at the r-th place; counts, CSR offsets and members equal; merge within twice
    the PyTorch path's own error in that dtype (against fp64) plus a floor; unmerge exact.
    """
    for case in cases:
        try:
            reason = _check_case(kernels, device, *case)
        except Exception as exc:  # noqa: BLE001 - a kernel that raises fails the check
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if reason:
            B, h, w, C, sx, sy, dtype = case
            return f"{reason} (metric [{B}, {h}x{w}, {C}] {dtype}, {sy}x{sx} cells)"
    return ""


def _check_case(k: Kernels, device: str, B: int, h: int, w: int, C: int, sx: int, sy: int, dtype_name: str) -> str:
    import torch

    from . import matching, ops

    dtype = getattr(torch, dtype_name)
    seed = B * 1000 + h * 37 + w * 11 + C
    g = torch.Generator().manual_seed(seed)
    dst, src = matching.partition(h, w, sx, sy, torch.tensor(seed * 7919 % 2**32), "cpu")
    N, S = h * w, len(src)
    r = min(N // 2, S)
    metric = torch.randn(B, N, C, generator=g).to(dtype)
    x = (torch.randn(B, N, C, generator=g) * 4).to(dtype)
    y = torch.randn(B, N - r, C, generator=g).to(dtype)
    dev = [t.to(device) for t in (metric, dst, src)]

    def host(tensors):
        return [t.cpu() for t in tensors]

    if B == 0:
        got = host(k.build_plan(*dev, r))
        want = ops._build_plan_cpu(metric, dst, src, r)
        if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in want]:
            return f"build_plan on an empty batch gives shapes {[tuple(t.shape) for t in got]}"
        return ""

    score, pos = host(k.best_dst(*dev))
    ref_score, ref_pos = matching.best_dst(metric, dst, src)
    tol = _SCORE_TOL[dtype_name]
    if score.shape != ref_score.shape or pos.shape != ref_pos.shape:
        return f"best_dst gives shapes {tuple(score.shape)}, {tuple(pos.shape)}, expected {tuple(ref_score.shape)}"
    gap = (score - ref_score).abs().max().item()
    if not gap <= tol:
        return f"best_dst scores differ from the PyTorch path by {gap:.3g} (tolerance {tol:g})"
    differ = pos != ref_pos
    if differ.any():  # only near-ties may pick another dst
        if not bool(((pos >= 0) & (pos < len(dst))).all()):
            return "best_dst wrote a dst position outside dst_idx"
        m = metric.double()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        b, s = differ.nonzero(as_tuple=True)
        a = m[b, src[s]]
        loss = ((a * m[b, dst[ref_pos[b, s]]]).sum(-1) - (a * m[b, dst[pos[b, s]]]).sum(-1)).max().item()
        if loss > 2 * tol:
            return f"best_dst picked a dst {loss:.3g} worse than the best for {int(differ.sum())} src token(s)"

    slot, counts, offsets, members = host(k.build_plan(*dev, r))
    ref = matching.plan_from_matches(score, pos, dst, src, r, N)  # the kernels' own matches
    if slot.shape != ref.slot.shape or counts.shape != ref.counts.shape:
        return f"build_plan gives shapes {tuple(slot.shape)}, {tuple(counts.shape)}"
    if not torch.equal(slot, ref.slot) and not _tie_at_rank(score, r):
        return f"build_plan's slot map differs from the PyTorch path for {int((slot != ref.slot).sum())} token(s)"
    if bool((slot < 0).any() or (slot >= N - r).any()):
        return "build_plan wrote a slot outside [0, N - r)"
    want_counts = torch.zeros(B, N - r, dtype=torch.int32).scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.int32))
    if not torch.equal(counts.int(), want_counts):
        return "build_plan's counts do not count its slot map"
    want_offsets, want_members = ops.csr(slot, want_counts)
    if not (torch.equal(offsets, want_offsets) and torch.equal(members, want_members)):
        return "build_plan's CSR offsets / members do not list its slot map in raster order"

    plan = matching.MergePlan(slot=slot, counts=want_counts, num_out=N - r)
    on_dev = [t.to(device) for t in (slot, offsets, members)]
    merged = k.merge(x.to(device), *on_dev, True).cpu()
    exact = matching.merge(x.double(), plan)
    bound = 2 * (matching.merge(x, plan).double() - exact).abs().max().item() + _MERGE_FLOOR[dtype_name]
    error = (merged.double() - exact).abs().max().item() if merged.shape == exact.shape else float("inf")
    if merged.dtype != dtype or not error <= bound:
        return f"merge differs from the segment mean by {error:.3g} (bound {bound:.3g})"
    unmerged = k.unmerge(y.to(device), *on_dev).cpu()
    if unmerged.dtype != dtype or not torch.equal(unmerged, matching.unmerge(y, plan)):
        return "unmerge differs from the gather y[b, slot[b, n]]"
    return ""


def _tie_at_rank(score, r: int) -> bool:
    """Whether some row's r-th and (r+1)-th best scores are equal (torch.topk may then pick either)."""
    import torch

    if r >= score.shape[1]:
        return False
    top = torch.sort(score, dim=1, descending=True).values
    return bool((top[:, r - 1] == top[:, r]).any() | (top[:, r - 1].isnan() & top[:, r].isnan()).any())

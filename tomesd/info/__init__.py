"""`python -m tomesd.info`: versions, where the kernels come from, the backend chosen and why.

  python -m tomesd.info            # loads (JIT-builds if needed) the CUDA kernels when a GPU is present
  python -m tomesd.info --no-build # reports without loading or building anything

Its last rows ("path DEVICE DTYPE") are tomesd.ops.report(): the path op calls took, with why. In a
fresh process those are its probes (every CUDA device in fp16, bf16 and fp32; none with --no-build); in
your own process, `tomesd.info.report()` (or `tomesd.ops.report()`) lists your calls' too.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
from typing import List, Tuple

import torch

from .. import __version__, ops
from ..ops import loader


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cuda_devices() -> List[str]:
    """"cuda:0", "cuda:1", ... for every visible CUDA device."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def paths(build: bool) -> List[Tuple[str, str]]:
    """Rows of tomesd.ops.report(), after probing every dtype of every CUDA device when `build`."""
    rows = []
    for device in cuda_devices() if build else []:
        for dtype in ops.CUDA_DTYPES:
            try:
                ops.backend_for(device, dtype)
            except RuntimeError as exc:  # TOMESD_BACKEND=cuda where the kernels cannot run
                rows.append((f"path {device} {str(dtype).replace('torch.', '')}", f"none ({exc})"))
    for path in ops.report():
        where = f"path {path.device} {path.dtype}" + (" (in a CUDA-graph capture)" if path.capture else "")
        rows.append((where, f"{path.backend} ({path.reason})" if path.reason else path.backend))
    return rows


def report(build: bool = True) -> List[Tuple[str, str]]:
    rows = [
        ("tomesd", __version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("diffusers", _version("diffusers")),
        ("nvcc", shutil.which("nvcc") or "not found"),
        ("TOMESD_BACKEND", os.environ.get("TOMESD_BACKEND", "auto (unset)")),
        ("kernel sources", str(loader.csrc_dir() or "not found")),
        ("prebuilt tomesd._C", "yes" if loader.prebuilt_available() else "no"),
        ("JIT build cache", str(loader.cache_dir())),
        ("JIT build", loader.build_refusal() or "possible"),
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows.append(("device", f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"))
        probe = torch.empty(0, device="cuda", dtype=torch.float16)
    else:
        rows.append(("device", "no CUDA device"))
        probe = torch.empty(0, dtype=torch.float16)
    if build or probe.device.type != "cuda":
        try:
            backend, refused = ops.choose_backend(probe)
        except RuntimeError as exc:
            backend, refused = "none", {"cuda": str(exc)}
        rows.append(("extension", loader.loaded_from() or "not loaded"))
    else:
        backend, refused = "not decided (--no-build)", {"cuda": loader.build_refusal() or "not loaded (--no-build)"}
    rows.append(("kernel self-check", loader.self_check_status()))
    rows.append((f"backend for {probe.device.type} fp16", backend))
    rows.extend((f"refused: {name}", reason) for name, reason in refused.items())
    return rows + paths(build)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tomesd.info", description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true", help="do not load or JIT-build the CUDA kernels")
    args = parser.parse_args(argv)
    try:
        ops.requested_backend()
    except ValueError as error:
        parser.error(str(error))
    rows = report(build=not args.no_build)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


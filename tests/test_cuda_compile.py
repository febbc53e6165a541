"""Every csrc source compiles with nvcc for sm_80 and sm_90 against torch's headers (no GPU needed)
without spilling registers to local memory (ptxas -warn-spills; a spill is an error), and the
tensor-core kernel traps (never silently does nothing) where it is compiled for an older arch.

Flags mirror the JIT build's: tomesd/ops/build_flags.py, and torch.utils.cpp_extension's include
paths, the -D__CUDA_NO_HALF* defines, its C++ standard, the C++11 ABI flag. torch's CPU wheels lack
the generated c10/cuda/impl/cuda_cmake_macros.h; it only carries Windows export macros, so the test
then defines C10_CUDA_NO_CMAKE_CONFIGURE_FILE (c10's own switch to skip it). ATen/cuda/CUDAContext.h is not used by csrc/ (it needs cuBLAS headers);
the kernels take the current stream from c10/cuda/CUDAStream.h. Skipped only where nvcc is missing.
"""
from __future__ import annotations

import inspect
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from tomesd.ops import build_flags, loader

ARCHS = ("80", "90")
# ptxas reports every register spill (a warning, which -Werror all-warnings makes an error); the test
# also looks for the word in the output, should a toolkit print it as a plain warning.
SPILLS_ARE_ERRORS = ["-Xptxas", "-warn-spills"]


def _nvcc():
    if shutil.which("nvcc"):
        return shutil.which("nvcc")
    home = cpp_extension.CUDA_HOME
    return str(Path(home) / "bin" / "nvcc") if home and (Path(home) / "bin" / "nvcc").exists() else None


def _cxx_std() -> str:
    return "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"


def _flags() -> list:
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    flags = [f"-I{p}" for p in includes] + [f"-std={_cxx_std()}", "-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=_C",
                                             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                                             "-Werror", "all-warnings", "-Xcompiler", "-Wno-c++20-extensions"]
    if not (Path(includes[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _compile(nvcc: str, source: Path, out_dir: Path) -> subprocess.CompletedProcess:
    cmd = [nvcc, "-c", str(source), "-o", str(out_dir / (source.name + ".o"))] + _flags()
    if source.suffix == ".cu":
        cmd += list(cpp_extension.COMMON_NVCC_FLAGS) + build_flags.NVCC_FLAGS + SPILLS_ARE_ERRORS
        for arch in ARCHS:
            cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_csrc_compiles_for_sm80_sm90(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: cannot compile the CUDA kernels here")
    sources = loader.sources()
    assert {s.name for s in sources} >= {"matching.cu", "plan.cu", "merge.cu", "ops.cpp"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda s: (s, _compile(nvcc, s, tmp_path)), sources))
    failures = [f"{s.name}:\n{r.stderr[-4000:]}" for s, r in results if r.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    spills = [f"{s.name}: {line}" for s, r in results for line in (r.stdout + r.stderr).splitlines() if "spill" in line]
    assert not spills, "registers spilled to local memory:\n" + "\n".join(spills)


def _wmma_entries(ptx: str) -> dict:
    """{entry name: body} of the best_dst_wmma kernels in a PTX listing."""
    entries = {}
    for chunk in ptx.split(".entry ")[1:]:
        name = chunk.split("(", 1)[0].strip()
        if "best_dst_wmma" in name:
            body = chunk[chunk.find("\n{") : chunk.find("\n}\n")]
            entries[name] = body
    return entries


@pytest.mark.parametrize("arch", ["75", "80"])
def test_wmma_kernel_has_a_body_or_traps(arch, tmp_path):
    """Below sm_80 the WMMA kernel's body is compiled out. A PTX-only build for an older arch (which
    the driver JIT-compiles for a newer GPU) must then trap, not return with its outputs unwritten;
    the host also refuses it by the kernel's PTX version (rules.h tensor_cores_usable)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: cannot compile the CUDA kernels here")
    out = tmp_path / f"matching_{arch}.ptx"
    source = loader.csrc_dir() / "matching.cu"
    cmd = [nvcc, "-ptx", str(source), "-o", str(out), f"-arch=compute_{arch}"] + _flags()
    proc = subprocess.run(cmd + list(cpp_extension.COMMON_NVCC_FLAGS) + build_flags.NVCC_FLAGS, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    entries = _wmma_entries(out.read_text())
    assert len(entries) == 4  # fp16 / bf16 x vectorized or not
    for name, body in entries.items():
        if arch == "75":
            assert "trap;" in body and "mma." not in body, name
        else:
            assert "wmma.mma" in body and "trap;" not in body, name

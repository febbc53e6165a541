"""What the CPU tests of the CUDA loader and self-check share: kernels with faults injected into the
registered ops (`broken`), and the process's loader replaced by one that builds and checks nothing on a
GPU (`fake_loader`)."""
from __future__ import annotations

import torch

from tomesd.ops import loader, selfcheck


def broken(**fns) -> selfcheck.Kernels:
    """The registered ops (their CPU impls stand in for the CUDA kernels) with some replaced."""
    return selfcheck.torch_kernels()._replace(**fns)


def fake_loader(monkeypatch, tmp_path, kernels, capturing=lambda device: False, checked=None, built=None):
    """The process's loader replaced by one whose JIT build only writes the library file (appending the
    build directory to `built`) and whose self-check runs the given kernels on the CPU (appending the
    device it was asked for to `checked`)."""
    def check_device(device):
        if checked is not None:
            checked.append(device)
        return torch.device("cpu")

    def jit_build(build_dir):
        if built is not None:
            built.append(build_dir)
        (build_dir / loader.JIT_LIBRARY).write_bytes(b"")

    fake = loader.Loader(jit_build=jit_build, cache_dir=lambda: tmp_path, prebuilt_available=lambda: False,
                         build_refusal=lambda: "", check_device=check_device, capturing=capturing, kernels=kernels)
    monkeypatch.setattr(loader, "loader", fake)
    return fake

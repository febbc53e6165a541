"""Loads the CUDA kernels (csrc/). Placeholder until the kernels land: reports them as unavailable."""
from __future__ import annotations


def load_error() -> str:
    """Why the CUDA extension is unavailable ("" once it is loaded)."""
    return "the CUDA kernels are not built in this version"

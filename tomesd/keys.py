"""Random keys: every random choice of tomesd is a pure function of integers, hashed here.

A key is an int64 value in [0, 2**32) (a Python int or a scalar tensor on the model's device, so
hashing it never syncs with the host and torch.compile traces it). The chain:
  seed → base_key(seed)                         once, at apply_patch
  (base, timestep) → step_key(...)             per denoiser call
  (step key, block index) → block_key(...)      per transformer block
  (block key, cell) → cell_keys(...)            per sy × sx cell: which of its tokens is dst
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
# Odd 32-bit salts that separate the hash chains of blocks and of cells.
BLOCK_SALT = 0x632BE5AB
CELL_SALT = 0x9E3779B9


def mix32(x):
    """Integer hash of int64 values in [0, 2**32) (no overflow: every product stays below 2**59)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def base_key(seed: Optional[int]) -> int:
    """32-bit key of the user's seed.

    With no seed, a hash of torch's default CPU generator state, which is read, not advanced: patching
    leaves the user's random numbers alone, and `torch.manual_seed(s)` before patching reproduces.
    """
    if seed is None:
        digest = hashlib.blake2b(torch.get_rng_state().numpy().tobytes(), digest_size=8).digest()
        seed = int.from_bytes(digest, "little") >> 2
    return mix32((seed & MASK32) ^ mix32((seed >> 32) & MASK32))


def step_key(base: int, timestep, device) -> Tensor:
    """int64 scalar on `device`: a hash of the base key and the timestep's bits (no host sync).
    For per-sample timesteps, the first sample's (every row shares one partition)."""
    if timestep is None:
        bits = torch.zeros((), dtype=torch.int64, device=device)
    else:
        t = torch.as_tensor(timestep, device=device).reshape(-1)[0]
        bits = t.to(torch.float32).view(torch.int32).to(torch.int64) & MASK32
    return mix32(bits ^ base)


def block_key(key: Tensor, index: int) -> Tensor:
    """The key of transformer block `index` within a call whose key is `key`."""
    return mix32((key + index * BLOCK_SALT) & MASK32)


def cell_keys(key: Tensor, cells: int, device) -> Tensor:
    """[cells] int64: one key per dst cell, in raster order of the cells."""
    cell = torch.arange(cells, dtype=torch.int64, device=device)
    return mix32((key.to(device) + cell * CELL_SALT) & MASK32)

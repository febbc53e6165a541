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
        bits = float32_bits(torch.as_tensor(timestep, device=device).reshape(-1)[0])
    return mix32(bits ^ base)


def float32_bits(t: Tensor) -> Tensor:
    """int64 in [0, 2**32): the IEEE-754 bits of float32(t), elementwise, from arithmetic alone (ONNX has no
    bitcast, so an exported graph cannot `view` a float as an int): t.to(float32).view(int32) as unsigned,
    exactly, for every float32 (a NaN gives the canonical 0x7FC00000). Computed in float64, where every
    step is exact: the exponent is log2's floor corrected by one, the scalings are powers of two."""
    x = t.to(torch.float32).to(torch.float64)
    finite = torch.isfinite(x)
    a = torch.where(finite, x.abs(), torch.ones_like(x))
    e = torch.floor(torch.log2(a)).clamp(-126, 127)  # log2(0) = -inf: zero and subnormals get -126
    m = a * _pow2(-e)
    up = m >= 2
    e, m = torch.where(up, e + 1, e), torch.where(up, m / 2, m)
    down = (m < 1) & (e > -126)
    e, m = torch.where(down, e - 1, e), torch.where(down, m * 2, m)
    normal = m >= 1  # else subnormal or zero: exponent field 0
    field = torch.where(normal, e + 127, torch.zeros_like(e))
    mantissa = torch.where(normal, m - 1, m) * 2.0 ** 23
    negative = (x < 0) | ((x == 0) & (1 / x < 0))  # -0.0 has its sign bit
    bits = torch.where(negative, 2.0 ** 31, 0.0) + field * 2.0 ** 23 + mantissa
    bits = torch.where(finite, bits, torch.where(torch.isnan(x), float(0x7FC00000), torch.where(
        negative, float(0xFF800000), float(0x7F800000))))
    return bits.to(torch.int64)


def _pow2(k: Tensor) -> Tensor:
    """2**k for integer-valued float64 k with |k| < 256, exactly: a product of the powers 2**(2**i)."""
    mag = k.abs()
    out = torch.ones_like(k)
    for i in range(8):
        bit = torch.floor(mag / 2 ** i) % 2
        out = torch.where(bit == 1, out * 2.0 ** (2 ** i), out)
    return torch.where(k < 0, 1 / out, out)


def block_key(key: Tensor, index: int) -> Tensor:
    """The key of transformer block `index` within a call whose key is `key`."""
    return mix32((key + index * BLOCK_SALT) & MASK32)


def cell_keys(key: Tensor, cells: int, device) -> Tensor:
    """[cells] int64: one key per dst cell, in raster order of the cells."""
    cell = torch.arange(cells, dtype=torch.int64, device=device)
    return mix32((key.to(device) + cell * CELL_SALT) & MASK32)

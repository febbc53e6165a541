"""Random keys: every random choice of tomesd is a pure function of integers, hashed here.

A key is an int64 value in [0, 2**32) (a Python int or a scalar tensor on the model's device, so
hashing it never syncs with the host and torch.compile traces it). The chain:
  seed → base_key(seed)                         once, at apply_patch
  (base, timestep) → step_key(...)             per denoiser call
  (step key, block index) → block_key(...)      per transformer block
  (block key, cell) → cell_keys(...)            per sy × sx cell: which of its tokens is dst
An exported graph carries each key as two 16-bit limbs (step_key(..., limbs=True)): the same values,
with no intermediate at or above 2**31, so runtimes that compute int64 in 32 bits agree.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Tuple

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


def step_key(base: int, timestep, device, limbs: bool = False) -> Tensor:
    """int64 scalar on `device`: a hash of the base key and the timestep's bits (no host sync).
    For per-sample timesteps, the first sample's (every row shares one partition).

    limbs: the same key as int64 [2] (its high and low 16 bits), hashed with every intermediate below
    2**31, for exported graphs: runtimes that compute int64 in 32 bits (OpenVINO's CPU plugin) then give
    the same keys. block_key and cell_choices take either form."""
    if timestep is None:
        bits = torch.zeros((2,) if limbs else (), dtype=torch.int64, device=device)
    else:
        t = torch.as_tensor(timestep, device=device).reshape(-1)[0]
        bits = _float32_limbs(t) if limbs else float32_bits(t)
    if limbs:
        return _mix32_limbs(bits ^ bits.new_tensor(_limbs_of(base)))
    return mix32(bits ^ base)


def _float32_fields(t: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sign, exponent field, mantissa, finite) of float32(t) as exact float64 integers: arithmetic alone,
    no bitcast (ONNX has none). The exponent is log2's floor corrected by one, the scalings are powers of
    two, so every step is exact (also in float32, for the finite timesteps of a sampler)."""
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
    sign = ((x < 0) | ((x == 0) & (1 / x < 0))).to(x.dtype)  # -0.0 has its sign bit
    nan = torch.isnan(x)
    field = torch.where(finite, field, torch.full_like(x, 255.0))  # inf: mantissa 0; NaN: the canonical one
    mantissa = torch.where(finite, mantissa, torch.where(nan, 2.0 ** 22, 0.0))
    return torch.where(nan, torch.zeros_like(sign), sign), field, mantissa, finite


def float32_bits(t: Tensor) -> Tensor:
    """int64 in [0, 2**32): the IEEE-754 bits of float32(t), elementwise: t.to(float32).view(int32) as
    unsigned, exactly, for every float32 (a NaN gives the canonical 0x7FC00000), from arithmetic alone."""
    sign, field, mantissa, _ = _float32_fields(t)
    return (sign * 2.0 ** 31 + field * 2.0 ** 23 + mantissa).to(torch.int64)


def _float32_limbs(t: Tensor) -> Tensor:
    """float32_bits(t) of a scalar t as int64 [2]: (high 16 bits, low 16 bits)."""
    sign, field, mantissa, _ = _float32_fields(t)
    high = torch.floor(mantissa / 2.0 ** 16)
    return torch.stack([sign * 2.0 ** 15 + field * 2.0 ** 7 + high, mantissa - high * 2.0 ** 16]).to(torch.int64)


def _pow2(k: Tensor) -> Tensor:
    """2**k for integer-valued float k with |k| < 128, exactly: a product of the powers 2**(2**i) (each below
    float32's overflow, as an exported graph may store them)."""
    mag = k.abs()
    out = torch.ones_like(k)
    for i in range(7):
        bit = torch.floor(mag / 2 ** i) % 2
        out = torch.where(bit == 1, out * 2.0 ** (2 ** i), out)
    return torch.where(k < 0, 1 / out, out)


def block_key(key: Tensor, index: int) -> Tensor:
    """The key of transformer block `index` within a call whose key is `key` (either form of step_key)."""
    if key.ndim == 1:
        return _mix32_limbs(_add_limbs(key, _limbs_of(index * BLOCK_SALT & MASK32)))
    return mix32((key + index * BLOCK_SALT) & MASK32)


def cell_keys(key: Tensor, cells: int, device) -> Tensor:
    """[cells] int64: one key per dst cell, in raster order of the cells (a scalar key)."""
    cell = torch.arange(cells, dtype=torch.int64, device=device)
    return mix32((key.to(device) + cell * CELL_SALT) & MASK32)


def cell_choices(key: Tensor, cells: int, n: int, device) -> Tensor:
    """[cells] int64 in [0, n): cell_keys(key, cells, device) % n, for either form of step_key."""
    if key.ndim == 0:
        return cell_keys(key, cells, device) % n
    cell = torch.arange(cells, dtype=torch.int64, device=device)
    salted = _mul_limbs(torch.stack([cell // LIMB, cell % LIMB], dim=-1), CELL_SALT)
    hashed = _mix32_limbs(_add_limbs(key.to(device), salted))
    return ((hashed[..., 0] % n) * (LIMB % n) + hashed[..., 1]) % n


# Limb arithmetic: a 32-bit value as int64 [..., 2] (high, low), each in [0, 2**16); mod 2**32, with every
# intermediate below 2**31, and no shift (// and % instead: OpenVINO converts ONNX shifts of int64 wrongly).
LIMB = 0x10000


def _limbs_of(value: int) -> Tuple[int, int]:
    return (value >> 16) & 0xFFFF, value & 0xFFFF


def _add_limbs(x: Tensor, y) -> Tensor:
    """x + y mod 2**32 (y: limbs, or a (high, low) pair of ints)."""
    y = x.new_tensor(y) if isinstance(y, tuple) else y
    total = x + y
    low = total[..., 1]
    return torch.stack([(total[..., 0] + low // LIMB) % LIMB, low % LIMB], dim=-1)


def _mulmod16(a: Tensor, c: int) -> Tensor:
    """a · c mod 2**16 for a in [0, 2**16) and c < 2**16, through products below 2**24."""
    return ((a * (c // 256)) % 256 * 256 + a * (c % 256)) % LIMB


def _mul_limbs(x: Tensor, c: int) -> Tensor:
    """x · c mod 2**32 for a 32-bit constant c."""
    c_high, c_low = _limbs_of(c)
    high, low = x[..., 0], x[..., 1]
    upper = low * (c_low // 256)  # < 2**24
    lower = low * (c_low % 256) + upper % 256 * 256  # < 2**25
    carry = upper // 256 + lower // LIMB  # (low · c_low) // 2**16
    new_high = (_mulmod16(high, c_low) + _mulmod16(low, c_high) + carry) % LIMB
    return torch.stack([new_high, lower % LIMB], dim=-1)


def _mix32_limbs(x: Tensor) -> Tensor:
    """mix32 in limbs: (x >> 16) ^ x keeps the high limb and xors it into the low one."""
    for _ in range(2):
        x = _mul_limbs(torch.stack([x[..., 0], x[..., 1] ^ x[..., 0]], dim=-1), 0x45D9F3B)
    return torch.stack([x[..., 0], x[..., 1] ^ x[..., 0]], dim=-1)

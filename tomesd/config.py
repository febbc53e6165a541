"""ToMeConfig: the user's settings, validated once, and the ratio-per-resolution schedule.

Nothing here imports diffusers. A ratio is resolved per denoiser call from the image size in
pixels (latent size × the VAE's scale factor) and, for a callable that asks for it, the UNet level.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Tuple, Union

RatioSpec = Union[float, Mapping[float, float], Callable[..., float]]

ALLOWED_DOWNSAMPLE = (1, 2, 4, 8)


def max_ratio(sx: int, sy: int) -> float:
    """Largest ratio the geometry allows: every token but one per sy × sx cell may merge."""
    return 1.0 - 1.0 / (sx * sy)


def _check_ratio_value(value, sx: int, sy: int, where: str) -> float:
    """Return `value` as a float after checking 0 ≤ value ≤ 1 − 1/(sx·sy); raise naming `where`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    hi = max_ratio(sx, sy)
    if math.isnan(value) or not (0.0 <= value <= hi + 1e-12):
        raise ValueError(
            f"{where} must be in [0, {hi:g}] (0 ≤ ratio ≤ 1 − 1/(sx·sy) with sx={sx}, sy={sy}), got {value!r}"
        )
    return min(value, hi)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class RatioSchedule:
    """Resolves the merge ratio for one denoiser call.

    kind "const": `value`; kind "table": piecewise-linear in the image side sqrt(H·W) px over
    `sides` → `values`, clamped at both ends; kind "call": `fn(height_px, width_px)` or
    `fn(height_px, width_px, downsample)`, plus `timestep=` (the denoiser call's timestep as a float)
    if fn has a parameter of that name; its result checked at every call.
    """

    kind: str
    sx: int
    sy: int
    value: float = 0.0
    sides: Tuple[float, ...] = ()
    values: Tuple[float, ...] = ()
    fn: Optional[Callable[..., float]] = None
    fn_takes_level: bool = False
    fn_takes_timestep: bool = False

    @classmethod
    def parse(cls, ratio: RatioSpec, sx: int, sy: int) -> "RatioSchedule":
        if isinstance(ratio, Mapping):
            if not ratio:
                raise ValueError("ratio mapping {image side px: ratio} must not be empty")
            items = []
            for side, value in ratio.items():
                if isinstance(side, bool) or not isinstance(side, numbers.Real) or not side > 0:
                    raise ValueError(f"ratio mapping keys must be image sides in pixels > 0, got {side!r}")
                items.append((float(side), _check_ratio_value(value, sx, sy, f"ratio[{side!r}]")))
            items.sort()
            return cls("table", sx, sy, sides=tuple(s for s, _ in items), values=tuple(v for _, v in items))
        if callable(ratio):
            takes_level, takes_timestep = _call_form(ratio)
            return cls("call", sx, sy, fn=ratio, fn_takes_level=takes_level, fn_takes_timestep=takes_timestep)
        return cls("const", sx, sy, value=_check_ratio_value(ratio, sx, sy, "ratio"))

    def resolve(self, height_px: int, width_px: int, downsample: int, timestep: Optional[float] = None) -> float:
        """Ratio for an image of height_px × width_px at UNet level /downsample (at `timestep`, for a
        callable that takes it)."""
        if self.kind == "const":
            return self.value
        if self.kind == "table":
            side = math.sqrt(height_px * width_px)
            if side <= self.sides[0]:
                return self.values[0]
            # A plain scan (not bisect) so torch.compile traces it without a graph break.
            for s0, s1, v0, v1 in zip(self.sides, self.sides[1:], self.values, self.values[1:]):
                if side <= s1:
                    return v0 + (v1 - v0) * (side - s0) / (s1 - s0)
            return self.values[-1]
        args = (height_px, width_px, downsample) if self.fn_takes_level else (height_px, width_px)
        kwargs = {"timestep": timestep} if self.fn_takes_timestep else {}
        where = ", ".join([str(a) for a in args] + [f"timestep={timestep}" for _ in kwargs])
        return _check_ratio_value(self.fn(*args, **kwargs), self.sx, self.sy, f"ratio({where})")


def _call_form(fn: Callable) -> Tuple[bool, bool]:
    """(takes downsample, takes timestep) of a ratio callable.

    It is called as fn(height_px, width_px), or fn(height_px, width_px, downsample), plus
    `timestep=<float>` when it has a parameter named `timestep`. Decided once, at apply_patch, by
    binding those arguments to fn's signature: a callable that can be called no such way (a fourth
    required parameter, a required keyword-only one) is a TypeError now, not at every denoiser call.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: called with (height_px, width_px)
        return False, False
    timestep = "timestep" in sig.parameters and sig.parameters["timestep"].kind is not inspect.Parameter.POSITIONAL_ONLY
    extra = {"timestep": 1.0} if timestep else {}
    for args in ((1, 1, 1), (1, 1)):
        try:
            sig.bind(*args, **extra)
        except TypeError:
            continue
        return len(args) == 3, timestep
    raise TypeError(
        "ratio callable must accept (height_px, width_px) or (height_px, width_px, downsample) as positional "
        "arguments (and, optionally, a parameter named timestep), with any other parameter optional; got "
        f"{getattr(fn, '__name__', fn)!r} with signature {sig}"
    )


@dataclass(frozen=True)
class ToMeConfig:
    """Validated settings of one patched model (the arguments of `tomesd.apply_patch`).

    max_downsample: None means the model's own highest-resolution transformer level, resolved when
    patching (SD 1.x/2.x: 1, SDXL: 2). mode: the name of a mode (tomesd.patch.modes.MODES: "tokens",
    "kv"), checked when patching; None is the model's default: tokens (tomesd 0.1.3's), kv on Flux.
    prop_attn: None follows the mode (True in kv mode where the attention takes a bias, False in
    tokens mode), resolved when patching; a patched model's state holds the resolved config.
    share_plan: one plan per level per call; plan_every: rebuild plans every k-th call.
    match_window: None (global matching: every src compares with every dst) or an odd k ≥ 1 (local
    matching: the dst of the k × k cells around the src's own cell).
    """

    ratio: RatioSpec = 0.5
    max_downsample: Optional[int] = None
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: Optional[int] = None
    mode: Optional[str] = None
    prop_attn: Optional[bool] = None
    share_plan: bool = False
    plan_every: int = 1
    match_window: Optional[int] = None
    schedule: RatioSchedule = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "sx", _check_positive_int(self.sx, "sx"))
        object.__setattr__(self, "sy", _check_positive_int(self.sy, "sy"))
        if self.max_downsample is not None and (
            isinstance(self.max_downsample, bool) or self.max_downsample not in ALLOWED_DOWNSAMPLE
        ):
            raise ValueError(f"max_downsample must be one of {ALLOWED_DOWNSAMPLE} or None, got {self.max_downsample!r}")
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp", "share_plan"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if self.mode is not None and not isinstance(self.mode, str):
            raise TypeError(f"mode must be a mode's name (a str) or None, got {self.mode!r}")
        if self.prop_attn is not None and not isinstance(self.prop_attn, bool):
            raise TypeError(f"prop_attn must be a bool or None, got {self.prop_attn!r}")
        if self.prop_attn and not self.merge_attn:
            raise ValueError("prop_attn=True needs merge_attn=True: it biases the self-attention over merged tokens")
        object.__setattr__(self, "plan_every", _check_positive_int(self.plan_every, "plan_every"))
        if self.match_window is not None:
            k = self.match_window
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 or k % 2 != 1:
                raise ValueError("match_window must be None (global matching) or an odd int ≥ 1 (the k × k cells "
                                 f"around a token's own cell: 1, 3, 5, ...), got {k!r}")
            object.__setattr__(self, "match_window", int(k))
        object.__setattr__(self, "schedule", RatioSchedule.parse(self.ratio, self.sx, self.sy))

    def export_refusals(self) -> List[str]:
        """Why these settings cannot be exported (torch.export and what exports through it), one line per
        option; empty if they can. An exported program is one traced graph: it keeps no state between
        calls and reads no input value on the host."""
        refusals = []
        if self.plan_every > 1:
            refusals.append(f"plan_every={self.plan_every} keeps plans across calls in Python state, which an "
                            "exported program does not have: use plan_every=1 (share_plan=True exports)")
        if self.schedule.fn_takes_timestep:
            refusals.append("ratio is a callable taking `timestep`, whose value it reads on the host at every "
                            "call, while an exported program fixes its ratios when traced: use a float, a mapping "
                            "or a callable of (height_px, width_px[, downsample])")
        return refusals

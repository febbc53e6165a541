"""What one `tomesd.bench` run measures: `BenchConfig`, the defaults per device, the grid of points
(resolution, ratio or baseline, setting) and the denoiser's inputs at a point."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..config import ToMeConfig, max_ratio
from ..patch import modes
from ..tools import cli, timing
from ..tools.archs import ARCHS, TRANSFORMER_ARCHS, transformer_inputs
from ..tools.models import ATTENTION, DTYPES

BACKENDS = ("auto", "torch", "cuda")
GPU_DEFAULTS = dict(arch="sd15", resolutions=(512, 1024, 2048), ratios=(0.3, 0.5, 0.7), dtype="fp16", steps=10, warmup=3)
CPU_DEFAULTS = dict(arch="sd15", resolutions=(256, 512), ratios=(0.3, 0.5, 0.7), dtype="fp32", steps=3, warmup=1)
NOT_SETTINGS = ("model", "ratio", "patch_controlnet")  # the UNet; --ratios; a bench UNet has no ControlNet

Point = Tuple[int, Optional[float], Dict[str, Any]]


@dataclass
class BenchConfig:
    """One benchmark run. `arch` (a name in tomesd.tools.archs.ARCHS) or `model` ("reference", a local
    diffusers model directory, a UNet directory, or a hub id; see tomesd.tools.models) gives the UNet;
    resolutions are image sides in px (multiples of 8; the latent is resolution/8 for every UNet);
    ratios are the ToMe ratios compared with the baseline at each resolution, each in (0, 1 − 1/(sx·sy)]
    for every setting's own cells (2 × 2 unless the setting sets sx, sy).
    batch: images per step (the UNet sees 2 × batch for classifier-free guidance).
    isolate: None → on for a CPU (see tomesd.bench), off for a GPU (and with interleave).
    grid: apply_patch keyword → values, one axis each (their product); variants: settings (dicts of
    apply_patch keywords) the axes multiply, () for apply_patch's defaults. Neither sets the ratio.
    calls: consecutive UNet calls per timed window (raised to a multiple of each setting's plan_every);
    steps: timed windows per point. interleave: round-robin over the points, in one process.
    target_speedup: also find, per setting and resolution, the smallest ratio reaching it.
    layers: for an MMDiT arch (sd3, flux), keep this many blocks of each kind (None: all); every block
    runs at the full token grid, so a cut model has the full model's per-block speed-up. Flux is not
    guided: its denoiser sees `batch` images, not 2 × batch.
    """

    arch: Optional[str] = "sd15"
    model: Optional[str] = None
    resolutions: Tuple[int, ...] = CPU_DEFAULTS["resolutions"]
    ratios: Tuple[float, ...] = CPU_DEFAULTS["ratios"]
    batch: int = 1
    dtype: str = "fp32"
    device: str = "cpu"
    attention: str = "sdpa"
    backend: str = "auto"
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    isolate: Optional[bool] = None
    grid: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)
    variants: Tuple[Dict[str, Any], ...] = ()
    calls: int = 1
    interleave: bool = False
    target_speedup: Optional[float] = None
    layers: Optional[int] = None

    def __post_init__(self):
        self.resolutions = tuple(int(r) for r in self.resolutions)
        self.ratios = tuple(float(r) for r in self.ratios)
        self.grid = {k: tuple(v) for k, v in self.grid.items()}
        self.variants = tuple(dict(v) for v in self.variants)
        problems = []
        if (self.arch is None) == (self.model is None):
            problems.append("give exactly one of arch and model")
        if self.arch is not None and self.arch not in ARCHS and self.arch not in TRANSFORMER_ARCHS:
            problems.append(f"arch must be one of {sorted(ARCHS) + sorted(TRANSFORMER_ARCHS)}, got {self.arch!r}")
        if self.layers is not None and (self.arch not in TRANSFORMER_ARCHS or self.layers < 1):
            problems.append(f"layers must be ≥ 1 and needs an MMDiT arch ({', '.join(sorted(TRANSFORMER_ARCHS))}), "
                            f"got layers={self.layers} with arch={self.arch!r}")
        if self.arch in TRANSFORMER_ARCHS and self.attention != "sdpa":
            problems.append(f"attention must be 'sdpa' for the {self.arch} transformer")
        step = 16 if self.arch in TRANSFORMER_ARCHS else 8  # SD 3 / Flux: the VAE's 8 × patch size 2
        if not self.resolutions or any(r < 64 or r % step for r in self.resolutions):
            problems.append(f"resolutions must be multiples of {step}, at least 64, got {self.resolutions}"
                            + (f" (the {self.arch} transformer's VAE factor 8 × patch size 2)" if step == 16 else ""))
        problems += self._ratio_problems()
        for name, choices in (("dtype", tuple(DTYPES)), ("attention", ATTENTION), ("backend", BACKENDS)):
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.batch < 1 or self.steps < 1 or self.warmup < 0 or self.calls < 1:
            problems.append("batch, steps and calls must be ≥ 1 and warmup ≥ 0")
        if self.backend == "cuda" and not str(self.device).startswith("cuda"):
            problems.append("backend 'cuda' needs a cuda device")
        if self.interleave and self.isolate:
            problems.append("interleave measures every point in one process: it cannot isolate them")
        if self.target_speedup is not None and not self.target_speedup > 0:
            problems.append(f"target_speedup must be > 0, got {self.target_speedup}")
        problems += self._setting_problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _ratio_problems(self) -> List[str]:
        """--ratios against the cells of every setting (ratio ≤ 1 − 1/(sx·sy), 2 × 2 unless the setting
        says otherwise): one line per setting that refuses some of them, the default setting unnamed."""
        if not self.ratios:
            return [f"ratios must be in (0, {max_ratio(2, 2):g}], got {self.ratios}"]
        problems = []
        for params in settings(self):
            if all(self._ratio_in_range(r, params) for r in self.ratios):
                continue
            cells = _cells(params)
            bound = f"(0, {max_ratio(*cells):g}]"
            if params:
                bound += f" with {cells[1]} x {cells[0]} cells (setting {cli.setting_label(params)})"
            problems.append(f"ratios must be in {bound}, got {self.ratios}")
        return problems

    @staticmethod
    def _ratio_in_range(ratio: float, params: Dict[str, Any]) -> bool:
        return 0 < ratio <= max_ratio(*_cells(params))

    def _setting_problems(self) -> List[str]:
        """Unknown keywords, empty axes, keys given twice, and values apply_patch would refuse (checked
        by ToMeConfig, without a model, at every ratio in the setting's range: a ratio out of range is
        reported once, by _ratio_problems)."""
        known = cli.patch_keywords(NOT_SETTINGS)
        keys = set(self.grid).union(*self.variants)
        unknown = sorted(keys - set(known))
        if unknown:
            return [f"not apply_patch keywords the bench can vary: {', '.join(unknown)} (it varies "
                    f"{', '.join(known)}; the ratio comes from --ratios)"]
        problems = [f"no values for {k}" for k, v in self.grid.items() if not v]
        twice = sorted(set(self.grid).intersection(set().union(*self.variants)))
        problems += [f"{k} is both a --set axis and in a --variant" for k in twice]
        if problems:
            return problems
        for params in settings(self):
            try:
                for ratio in (r for r in self.ratios if self._ratio_in_range(r, params)):
                    modes.check(ToMeConfig(ratio=ratio, **{"seed": self.seed, **params}))
            except (ValueError, TypeError) as error:
                return [f"setting {cli.setting_label(params) or cli.DEFAULTS_LABEL}: {error}"]
        return []

    @property
    def on_gpu(self) -> bool:
        return str(self.device).startswith("cuda")

    @property
    def toy(self) -> bool:
        """A built-in toy architecture: its speed-ups are not those of a real model."""
        return self.arch in ARCHS and ARCHS[self.arch].toy

    @property
    def isolated(self) -> bool:
        if self.isolate is not None:
            return self.isolate
        return not self.on_gpu and not self.interleave and timing.forkserver_available()

    @property
    def flux(self) -> bool:
        """A Flux transformer: unguided, timesteps in [0, 1]."""
        return self.arch in TRANSFORMER_ARCHS and TRANSFORMER_ARCHS[self.arch].family == "flux"


def _cells(params: Dict[str, Any]) -> Tuple[int, int]:
    """(sx, sy) of a setting: its own when they are positive ints (else ToMeConfig reports them), else 2 × 2."""
    sx, sy = params.get("sx", 2), params.get("sy", 2)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (sx, sy))
    return (sx, sy) if ok else (2, 2)


def default_config(device: Optional[str] = None, **overrides) -> BenchConfig:
    """The defaults for `device` (None: cuda when available): the SD 1.5 UNet, at 512/1024/2048 px in
    fp16 on a GPU, at 256/512 px in fp32 on a CPU (about 5 minutes on 2 idle cores)."""
    device = cli.default_device(device)
    base = GPU_DEFAULTS if str(device).startswith("cuda") else CPU_DEFAULTS
    values = dict(base, device=device)
    if overrides.get("model") is not None:
        values["arch"] = None
    values.update(overrides)
    return BenchConfig(**values)


def settings(cfg: BenchConfig) -> List[Dict[str, Any]]:
    """The settings of cfg (dicts of apply_patch keywords, ratio apart): each variant (or {}) times
    the product of the grid axes, variants first, the last axis varying fastest."""
    return cli.grid_settings({"variant": cfg.variants or ({},), **cfg.grid})


def grid(cfg: BenchConfig) -> List[Point]:
    """(resolution, ratio or None for the baseline, setting) in run order: per resolution, the
    baseline, then every setting at every ratio (setting-major)."""
    return [(res, ratio, params) for res in cfg.resolutions
            for ratio, params in [(None, {})] + [(r, p) for p in settings(cfg) for r in cfg.ratios]]


def calls_per_window(cfg: BenchConfig, params: Dict[str, Any]) -> int:
    """cfg.calls raised to a multiple of the setting's plan_every: each window holds whole plan periods."""
    every = int(params.get("plan_every", 1))
    return -(-cfg.calls // every) * every


def denoiser_batch(cfg: BenchConfig) -> int:
    """Rows per denoiser call: 2 × batch (classifier-free guidance), batch for the unguided Flux."""
    return cfg.batch if cfg.flux else 2 * cfg.batch


def unet_inputs(unet, cfg: BenchConfig, resolution: int, text_len: Optional[int] = None) -> Tuple[tuple, dict]:
    """(args, kwargs) of one guided UNet step: latent [2·batch, C, res/8, res/8], timestep, text
    states [2·batch, text_len (default: the arch's, else 77), cross_attention_dim]; SDXL-style models
    also get pooled text and six time ids. An MMDiT arch gets ((), its transformer's keywords)."""
    import torch

    dtype, device = DTYPES[cfg.dtype], cfg.device
    if cfg.arch in TRANSFORMER_ARCHS:
        arch = TRANSFORMER_ARCHS[cfg.arch]
        return (), transformer_inputs(arch, denoiser_batch(cfg), resolution, resolution, dtype, device, seed=cfg.seed)
    if text_len is None:
        text_len = ARCHS[cfg.arch].text_len if cfg.arch in ARCHS else 77
    config = unet.config
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    batch, side = 2 * cfg.batch, resolution // 8

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cross = config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    kwargs: Dict[str, Any] = dict(encoder_hidden_states=randn(batch, text_len, cross))
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
        kwargs["added_cond_kwargs"] = dict(text_embeds=randn(batch, pooled), time_ids=time_ids.repeat(batch, 1))
    sample = randn(batch, config.in_channels, side, side)
    timestep = torch.tensor(500, device=device)
    return (sample, timestep), kwargs

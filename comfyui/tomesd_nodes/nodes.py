"""The "Token Merging" node: MODEL → MODEL, tomesd on a clone of the model for the length of its sampling.

ComfyUI's clones of a model share one diffusion model (`model_patcher.model`), so the node puts no hook
on it when it runs: it clones the ModelPatcher and adds a sampling wrapper (ComfyUI's OUTER_SAMPLE
wrapper, under the key WRAPPER_KEY) that applies tomesd to the diffusion model when a sampler starts
on that clone and removes it when the sampler returns or raises. Other clones sample the model
exactly as before, other patches and wrappers compose, ComfyUI may load or unload the model at will,
and a Token Merging node after another replaces its settings (one wrapper per clone).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import tomesd

try:
    from comfy.patcher_extension import WrappersMP
except ImportError as error:  # pragma: no cover - a ComfyUI from before sampling wrappers
    raise ImportError("tomesd_nodes needs a ComfyUI with sampling wrappers (comfy.patcher_extension); update "
                      f"ComfyUI ({error})") from None

WRAPPER_KEY = "tomesd"
OUTER_SAMPLE = WrappersMP.OUTER_SAMPLE
PRESETS = {  # cell size, and prop_attn where the node's prop_attn is "auto" (None: the mode's default)
    "default": dict(sx=2, sy=2, prop_attn=None),
    "high resolution": dict(sx=4, sy=4, prop_attn=True),
}
PROP_ATTN = {"on": True, "off": False}
MODES = ("auto", "tokens", "kv")

logger = logging.getLogger("tomesd")


def settings(ratio: float, preset: str, match_window: int, prop_attn: str, mode: str, seed: int) -> Dict[str, Any]:
    """apply_patch's keyword arguments for the node's inputs; ValueError naming a bad one."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if prop_attn not in ("auto",) + tuple(PROP_ATTN):
        raise ValueError(f"prop_attn must be one of ('auto', 'on', 'off'), got {prop_attn!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(match_window, bool) or not isinstance(match_window, int) or match_window < 0:
        raise ValueError(f"match_window must be 0 (global matching) or an odd int ≥ 1, got {match_window!r}")
    chosen = dict(PRESETS[preset])
    if prop_attn != "auto":
        chosen["prop_attn"] = PROP_ATTN[prop_attn]
    return dict(ratio=float(ratio), sx=chosen["sx"], sy=chosen["sy"], prop_attn=chosen["prop_attn"],
                mode=None if mode == "auto" else mode, match_window=match_window or None, seed=int(seed))


def check(diffusion_model, options: Dict[str, Any]) -> None:
    """Fail now, with apply_patch's message, where `options` would fail when sampling: apply and remove
    them once on the diffusion model (bit-exact), unless something else has patched it."""
    tomesd.ToMeConfig(**options)
    if not tomesd.is_patched(diffusion_model):
        try:
            tomesd.apply_patch(diffusion_model, **options)
        finally:
            tomesd.remove_patch(diffusion_model)


class SamplingPatch:
    """ComfyUI's OUTER_SAMPLE wrapper: tomesd on the sampled clone's diffusion model for one sampling run."""

    def __init__(self, options: Dict[str, Any]):
        self.options = dict(options)

    def __call__(self, executor, *args, **kwargs):
        model = executor.class_obj.model_patcher.get_model_object("diffusion_model")
        if tomesd.is_patched(model):
            raise RuntimeError("tomesd: the diffusion model is already patched (tomesd.apply_patch on it outside "
                               "the node?): remove_patch it, or use only the Token Merging node")
        tomesd.apply_patch(model, **self.options)
        try:
            return executor(*args, **kwargs)
        finally:
            tomesd.remove_patch(model)


def sampling_patch(model_patcher) -> Optional[SamplingPatch]:
    """The Token Merging wrapper a ModelPatcher carries, if any (the node's documented seam)."""
    wrappers = model_patcher.get_wrappers(OUTER_SAMPLE, WRAPPER_KEY)
    return wrappers[-1] if wrappers else None


class TokenMerging:
    """Merges redundant tokens before self-attention while sampling (tomesd): faster steps, nearly the
    same image. The model is cloned; other clones of it are unchanged."""

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "model_patches/unet"
    DESCRIPTION = ("Token Merging (tomesd): merges redundant tokens before self-attention while sampling. "
                   "Preset 'high resolution' (4×4 cells, proportional attention) with ratio 0.9 at 1024 px "
                   "(0.8 at 512 px) is the fast setting for large images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 0.95, "step": 0.01,
                                "tooltip": "Fraction of the tokens to merge at the highest-resolution level; at most "
                                           "0.75 with the default preset, 0.9375 with 'high resolution'."}),
            "preset": (list(PRESETS), {"default": "default",
                                       "tooltip": "default: one kept token per 2×2 cell (tomesd 0.1.3's). high "
                                                  "resolution: per 4×4 cell, with proportional attention."}),
            "match_window": ("INT", {"default": 0, "min": 0, "max": 63, "step": 1,
                                     "tooltip": "0: global matching. An odd k: each token compares only with the "
                                                "k×k cells around it (faster at high resolution)."}),
            "prop_attn": (["auto", "on", "off"], {"default": "auto",
                                                  "tooltip": "Proportional attention (closer images). auto: the "
                                                             "preset's (high resolution: on), else the mode's."}),
            "mode": (list(MODES), {"default": "auto",
                                   "tooltip": "tokens: merge self-attention's tokens (UNets' default). kv: keep every "
                                              "query, merge keys/values (Flux's default and only mode)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Seed of the random choice of kept tokens."}),
        }}

    def patch(self, model, ratio, preset, match_window, prop_attn, mode, seed):
        options = settings(ratio, preset, match_window, prop_attn, mode, seed)
        check(model.get_model_object("diffusion_model"), options)
        patched = model.clone()
        if sampling_patch(patched) is not None:
            logger.info("tomesd: a Token Merging node's settings replace those of an earlier one on this model")
            patched.remove_wrappers_with_key(OUTER_SAMPLE, WRAPPER_KEY)
        patched.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY, SamplingPatch(options))
        return (patched,)

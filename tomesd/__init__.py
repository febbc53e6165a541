"""tomesd: Token Merging for Stable Diffusion.

    import tomesd
    tomesd.apply_patch(pipe, ratio=0.5)   # merge 50% of tokens before self-attention
    tomesd.remove_patch(pipe)             # back to the exact original model
"""
from __future__ import annotations

from .config import RatioSpec, ToMeConfig, max_ratio
from .matching import MergePlan
from .patch import attach_to, detach_from, patched_state

__version__ = "0.2.0"

__all__ = ["apply_patch", "remove_patch", "is_patched", "ToMeConfig", "MergePlan", "max_ratio", "__version__"]


def apply_patch(
    model,
    ratio: RatioSpec = 0.5,
    max_downsample=None,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    seed=None,
    patch_controlnet: bool = False,
    mode=None,
    prop_attn=None,
    share_plan: bool = False,
    plan_every: int = 1,
    match_window=None,
):
    """Patch `model` so its transformer blocks merge tokens; returns `model`.

    model: a diffusers pipeline (its `.unet` or `.transformer`), a UNet2DConditionModel, a video UNet
        (UNetMotionModel, UNet3DConditionModel; temporal blocks are left alone), a DiT / PixArt
        transformer, any module holding transformer blocks whose forward takes a [B, C, H, W] or
        [B, C, F, H, W] latent as `sample` / `hidden_states`, an LDM-style model with
        `.model.diffusion_model`, or ComfyUI's UNet or Flux (or the BaseModel holding it; a ModelPatcher
        is refused: its clones share the model, use the Token Merging node).
    ratio: fraction of a level's N tokens to merge, 0 ≤ ratio ≤ 1 − 1/(sx·sy). A float; a mapping
        {image side px: ratio}, linearly interpolated in sqrt(H·W) and clamped at the ends; or a
        callable (height_px, width_px) → ratio, or (height_px, width_px, downsample) → ratio to vary
        it by UNet level, checked at each call. A callable with a parameter named `timestep` also
        gets the denoiser call's timestep as a float (e.g. stop merging late in sampling).
    max_downsample: merge at levels whose downsample factor is ≤ this (1, 2, 4 or 8). None: the
        model's highest-resolution transformer level (SD 1.x/2.x: 1; SDXL: 2).
    sx, sy: dst cell size; one dst token per sy × sx cell.
    use_rand: pick each cell's dst at random (a pure function of seed, block and timestep); False
        takes each cell's first token. A batch of odd size uses the deterministic choice.
    merge_attn, merge_crossattn, merge_mlp: merge before self-attention / cross-attention / MLP.
    seed: makes the random choice reproducible across pipeline calls and processes; None draws one
        from torch's default generator now.
    patch_controlnet: also merge tokens in the pipeline's ControlNet(s) (`pipe.controlnet`).
    mode: "tokens" (tomesd 0.1.3: merge each chosen sub-layer's input, unmerge its output) or "kv":
        self-attention keeps queries for all N tokens and takes keys/values from the N − r merged
        ones (no unmerge); merge_crossattn / merge_mlp still merge those sub-layers as tokens.
        None (default): tokens, except on Flux: kv (in tokens mode there a merged token takes its dst's
        rotary position, and single-stream blocks merge whole with merge_attn).
    prop_attn: proportional attention: a merged key standing for s tokens gets + log s on its logits.
        None: True in kv mode, False in tokens mode. Needs an attention taking an additive mask
        (diffusers', ComfyUI's).
    share_plan: one plan per UNet level per denoiser call, built by the level's first block and used
        by the others (one matching per level instead of one per block; SD 3 and Flux: one per call).
    plan_every: rebuild plans every k-th denoiser call and reuse them in between (calls with another
        latent size or batch rebuild); not with torch.compile.
    match_window: None (default): global matching, every src token compares with every dst (tomesd
        0.1.3's). An odd k ≥ 1: local matching, a src token compares only with the dst of the k × k
        cells around its own cell (clipped at the edges): O(N·k²·C) instead of O(N²·C), for high
        resolutions. A window covering the whole grid gives exactly the global plan.

    Applying to a patched model replaces its settings.
    """
    config = ToMeConfig(
        ratio=ratio, max_downsample=max_downsample, sx=sx, sy=sy, use_rand=use_rand,
        merge_attn=merge_attn, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, seed=seed,
        mode=mode, prop_attn=prop_attn, share_plan=share_plan, plan_every=plan_every,
        match_window=match_window,
    )
    if not isinstance(patch_controlnet, bool):
        raise TypeError(f"patch_controlnet must be a bool, got {patch_controlnet!r}")
    attach_to(model, config, controlnet=patch_controlnet)
    return model


def remove_patch(model):
    """Remove every hook tomesd added; the model computes exactly as before. Returns `model`."""
    detach_from(model)
    return model


def is_patched(model) -> bool:
    """True if `model` (pipeline, denoiser or LDM-style wrapper) currently merges tokens."""
    return patched_state(model) is not None

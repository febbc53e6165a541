"""SDXL's /4 level (max_downsample=4): merge_crossattn and merge_mlp there, a ratio per level, one plan per
level per call shared by its layers (share_plan), prop_attn; a /4 Transformer2DModel merging duplicated
tokens losslessly with every option on."""
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import tiny
import tomesd
from tiny import run


def _lengths(model, name):
    """(input length of sub-layer `name`, block input length) of every BasicTransformerBlock call."""
    seen, entered = [], []
    for block in (m for m in model.modules() if isinstance(m, BasicTransformerBlock)):
        block.register_forward_pre_hook(lambda m, a, k: entered.append((a[0] if a else k["hidden_states"]).shape[1]),
                                        with_kwargs=True)
        getattr(block, name).register_forward_pre_hook(
            lambda m, a, k: seen.append((entered[-1], (a[0] if a else k["hidden_states"]).shape[1])), with_kwargs=True)
    return seen


@pytest.mark.parametrize("share", [False, True])
def test_level4_merges_every_sublayer_with_a_ratio_per_level(share, plan_builds):
    unet = tiny.unet("sdxl")
    ratios = {2: 0.5, 4: 0.25}
    tomesd.apply_patch(unet, ratio=lambda h, w, downsample: ratios[downsample], max_downsample=4, share_plan=share,
                       merge_crossattn=True, merge_mlp=True, prop_attn=True, seed=0)
    seen = {name: _lengths(unet, name) for name in ("attn1", "attn2", "ff")}
    out = run(unet, "sdxl")  # a 16 × 16 latent: the /2 level has 8 × 8 tokens, the /4 level 4 × 4
    for name, lengths in seen.items():
        assert sorted(set(lengths)) == [(16, 12), (64, 32)], name  # 16 − int(16 · 0.25), 64 − int(64 · 0.5)
    layers = {n: sum(1 for block_n, _ in seen["attn1"] if block_n == n) for n in (64, 16)}
    assert layers == {64: 6, 16: 8}  # SDXL's layout in small: 2 + 2·2 layers at /2; 2 + 2 (mid) + 2·2 at /4
    assert sorted(plan_builds) == ([16, 64] if share else [16] * 8 + [64] * 6)
    assert torch.isfinite(out).all()
    tomesd.apply_patch(unet, max_downsample=4, share_plan=share, merge_crossattn=True, merge_mlp=True, seed=0,
                       ratio=lambda h, w, downsample: ratios[downsample])
    assert not torch.allclose(run(unet, "sdxl"), out, atol=1e-4)  # prop_attn acts at both levels


def test_default_leaves_the_level4_alone(plan_builds):
    unet = tiny.unet("sdxl")
    tomesd.apply_patch(unet, ratio=0.5, share_plan=True)
    run(unet, "sdxl")
    assert plan_builds == [64]


def _duplicated(side, channels, seed=0):
    """A latent [2, C, side, side] whose 2×2 cells in the top half each hold one value per channel (the
    bottom half random): merged groups of 4 tokens beside single tokens."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randn(2, channels, side // 4, side // 2, generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)
    return torch.cat([cells, torch.randn(2, channels, side // 2, side, generator=g)], dim=2)


@pytest.mark.parametrize("kwargs", [dict(), dict(share_plan=True), dict(share_plan=True, match_window=3)])
def test_level4_transformer_merges_duplicated_tokens_losslessly(kwargs):
    """One of SDXL's /4 Transformer2DModels (two layers) on a latent whose top half has identical 2×2 cells;
    the ratio merges exactly their 3 · 8 src tokens (cosine 1); prop_attn and every sub-layer merged: the
    unpatched output. Without prop_attn (groups of 4 beside single tokens): not."""
    block = tiny.unet("sdxl").down_blocks[2].attentions[0]
    assert len(block.transformer_blocks) == 2
    sample = _duplicated(8, block.config.in_channels)
    text = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))

    def call():
        with torch.no_grad():
            return block(sample, encoder_hidden_states=text).sample

    want = call()
    options = dict(merge_crossattn=True, merge_mlp=True, **kwargs)
    tomesd.apply_patch(block, ratio=24 / 64, prop_attn=True, **options)
    torch.testing.assert_close(call(), want, rtol=1e-5, atol=2e-5)
    tomesd.apply_patch(block, ratio=24 / 64, **options)
    assert not torch.allclose(call(), want, atol=1e-3)

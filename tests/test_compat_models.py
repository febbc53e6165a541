"""Denoisers beyond the image UNet: keyword calls, video UNets, DiT / PixArt transformers."""
import logging

import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import tiny
import tomesd


def _attn1_lengths(model, call):
    """{block index: token count attn1 receives} over one call (hooks added after tomesd's)."""
    seen = {}
    blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]

    def recorder(i):
        return lambda m, a, k: seen.setdefault(i, (a[0] if a else k["hidden_states"]).shape[1]) and None

    handles = [b.attn1.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        out = call()
    for h in handles:
        h.remove()
    return seen, out


def test_unet_called_with_keywords_finds_the_latent():
    unet = tiny.unet("sd1")
    (sample, t), kwargs = tiny.unet_inputs("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=3)
    by_kw, out_kw = _attn1_lengths(unet, lambda: unet(sample=sample, timestep=t, **kwargs).sample)
    by_pos, out_pos = _attn1_lengths(unet, lambda: unet(sample, t, **kwargs).sample)
    assert by_kw == by_pos and max(by_kw.values()) == 128  # 16×16 tokens halved
    assert torch.equal(out_kw, out_pos)  # same timestep found both ways: same random partition


def test_transformer_timestep_found_by_name_in_positional_call():
    """PixArt's forward is (hidden_states, encoder_hidden_states, timestep): position 1 is not the timestep."""
    model = tiny.pixart()
    kw = tiny.pixart_inputs()
    tomesd.apply_patch(model, ratio=0.5, seed=3)
    with torch.no_grad():
        by_kw = model(**kw).sample
        by_pos = model(kw["hidden_states"], kw["encoder_hidden_states"], kw["timestep"],
                       added_cond_kwargs=kw["added_cond_kwargs"]).sample
        other_t = model(**dict(kw, timestep=torch.tensor([20, 20]))).sample
    assert torch.equal(by_kw, by_pos)
    assert not torch.allclose(by_kw, other_t)


@pytest.mark.parametrize("kind", ["motion", "3d"])
def test_video_unet_merges_spatial_blocks_per_frame_only(kind, caplog):
    unet = tiny.video_unet(kind)
    kw = tiny.video_inputs(kind, frames=3)
    before, want = _attn1_lengths(unet, lambda: unet(**kw).sample)
    with caplog.at_level(logging.INFO, logger="tomesd"):
        tomesd.apply_patch(unet, ratio=0.5, seed=3)
    assert "attend across frames" in caplog.text
    after, got = _attn1_lengths(unet, lambda: unet(**kw).sample)
    spatial = {i for i, n in before.items() if n == 256}
    temporal = {i for i, n in before.items() if n == 3}
    assert spatial and temporal and spatial | temporal | {i for i, n in before.items() if n < 256} == set(before)
    assert all(after[i] == 128 for i in spatial)
    assert all(after[i] == before[i] for i in before if i not in spatial)  # temporal and deeper levels untouched
    assert got.shape == want.shape and not torch.allclose(got, want)
    tomesd.apply_patch(unet, ratio=0.0)
    with torch.no_grad():
        assert torch.equal(unet(**kw).sample, want)
    tomesd.remove_patch(unet)
    with torch.no_grad():
        assert torch.equal(unet(**kw).sample, want)


def test_only_temporal_blocks_is_an_error():
    from diffusers.models import TransformerTemporalModel

    model = TransformerTemporalModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8)
    with pytest.raises(ValueError, match="temporal"):
        tomesd.apply_patch(model)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_pixart_token_grid_is_latent_over_patch_size(patch_size):
    model = tiny.pixart(patch_size=patch_size)
    kw = tiny.pixart_inputs(size=16)
    before, want = _attn1_lengths(model, lambda: model(**kw).sample)
    tomesd.apply_patch(model, ratio=0.5, seed=1)
    after, got = _attn1_lengths(model, lambda: model(**kw).sample)
    n = (16 // patch_size) ** 2
    assert set(before.values()) == {n} and set(after.values()) == {n // 2}
    assert got.shape == want.shape and not torch.allclose(got, want)


def test_dit_pipeline_patches_its_transformer():
    pipe = tiny.dit_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(class_labels=[1, 2], num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    want = generate()
    tomesd.apply_patch(pipe, ratio=0.5, seed=2)
    assert tomesd.is_patched(pipe) and tomesd.is_patched(pipe.transformer)
    lengths, got = _attn1_lengths(pipe.transformer, generate)
    assert set(lengths.values()) == {8}  # 8×8 latent / patch 2 = 16 tokens, halved
    assert got.shape == want.shape and np.isfinite(got).all() and not np.array_equal(got, want)
    tomesd.remove_patch(pipe)
    assert not tomesd.is_patched(pipe) and np.array_equal(generate(), want)


def test_block_called_outside_its_denoiser_warns(caplog):
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5)
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    with caplog.at_level(logging.WARNING, logger="tomesd"), torch.no_grad():
        out = block(torch.randn(2, 256, 32), encoder_hidden_states=torch.randn(2, 7, 32))
    assert out.shape == (2, 256, 32) and "outside a call of UNet2DConditionModel" in caplog.text

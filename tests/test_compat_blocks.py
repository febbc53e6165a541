"""Every BasicTransformerBlock code path diffusers ships, patched through a minimal grid denoiser.

A lossless check keeps each test able to fail: when every 2×2 cell of the latent holds one token
repeated, merging all src tokens (ratio 0.75) gives each cell one row whose mean is that token, and
attention over the 4× duplicated keys equals attention over them once. So a block that keeps the
host's behaviour (norms, gates, fuser, chunking) must reproduce the unpatched output exactly (up to
float rounding), while on a random latent the output must change.
"""
import logging

import pytest
import torch
import torch.nn.functional as F

import tiny
import tomesd

B, C, S = 2, 16, 8  # batch, channels (= block dim), latent side: 64 tokens, one merge level
BASE = dict(dim=C, num_attention_heads=2, attention_head_dim=8)


def _kwargs(name, g):
    """Block call kwargs for configuration `name` (random conditioning from generator g)."""
    text = dict(encoder_hidden_states=torch.randn(B, 5, 16, generator=g))
    return {
        "layer_norm": text,
        "ada_norm": dict(text, timestep=torch.tensor(3)),
        "ada_norm_zero": dict(text, timestep=torch.tensor([3, 7]), class_labels=torch.tensor([1, 4])),
        "ada_norm_single": dict(text, timestep=torch.randn(B, 6 * C, generator=g)),
        "ada_norm_continuous": dict(text, added_cond_kwargs={"pooled_text_emb": torch.randn(B, 12, generator=g)}),
        "sinusoidal": text,
        "gligen": dict(text, cross_attention_kwargs={"gligen": {"objs": torch.randn(B, 3, 16, generator=g)}}),
        "only_cross_attention": text,
        "double_self_attention": {},
        "ff_chunk_batch": text,
        "ff_chunk_tokens": text,
    }[name]


CONFIGS = {
    "layer_norm": dict(cross_attention_dim=16),
    "ada_norm": dict(cross_attention_dim=16, norm_type="ada_norm", num_embeds_ada_norm=10),
    "ada_norm_zero": dict(cross_attention_dim=16, norm_type="ada_norm_zero", num_embeds_ada_norm=10),
    "ada_norm_single": dict(cross_attention_dim=16, norm_type="ada_norm_single"),
    "ada_norm_continuous": dict(cross_attention_dim=16, norm_type="ada_norm_continuous",
                                ada_norm_continous_conditioning_embedding_dim=12),
    "sinusoidal": dict(cross_attention_dim=16, positional_embeddings="sinusoidal", num_positional_embeddings=S * S),
    "gligen": dict(cross_attention_dim=16, attention_type="gated"),
    "only_cross_attention": dict(cross_attention_dim=16, only_cross_attention=True),
    "double_self_attention": dict(double_self_attention=True),
    "ff_chunk_batch": dict(cross_attention_dim=16),
    "ff_chunk_tokens": dict(cross_attention_dim=16),
}
LOSSLESS = [n for n in CONFIGS if n not in ("sinusoidal", "ff_chunk_tokens")]
ALL_SUBLAYERS = dict(merge_crossattn=True, merge_mlp=True)


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = tiny.GridBlock(**BASE, **CONFIGS[name]).eval()
    block = model.block
    with torch.no_grad():
        for p in block.parameters():  # diffusers zero-inits some gates / tables: make every path matter
            p.add_(0.05 * torch.randn_like(p))
        if name == "gligen":
            block.fuser.alpha_attn.fill_(1.0)
            block.fuser.alpha_dense.fill_(1.0)
    if name == "ff_chunk_batch":
        block.set_chunk_feed_forward(1, dim=0)
    if name == "ff_chunk_tokens":
        block.set_chunk_feed_forward(S * S // 4, dim=1)
    return model


def _latents(cells: bool, seed=1):
    g = torch.Generator().manual_seed(seed)
    if cells:  # every 2×2 cell one token repeated
        return F.interpolate(torch.randn(B, C, S // 2, S // 2, generator=g), scale_factor=2, mode="nearest")
    return torch.randn(B, C, S, S, generator=g)


def _run(model, name, sample, seed=2):
    with torch.no_grad():
        return model(sample, **_kwargs(name, torch.Generator().manual_seed(seed)))


def _record(module, seen, key):
    def hook(mod, args, kwargs):
        seen.setdefault(key, []).append((args[0] if args else kwargs["hidden_states"]).shape)

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ratio_zero_is_bit_identical(name):
    model = _model(name)
    want = _run(model, name, _latents(False))
    tomesd.apply_patch(model, ratio=0.0, **ALL_SUBLAYERS)
    assert torch.equal(_run(model, name, _latents(False)), want)


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_merge_keeps_host_behaviour(name):
    model = _model(name)
    cells, rand = _latents(True), _latents(False)
    want_cells, want_rand = _run(model, name, cells), _run(model, name, rand)
    tomesd.apply_patch(model, ratio=0.75, seed=5, **ALL_SUBLAYERS)
    seen = {}
    handles = [_record(getattr(model.block, n), seen, n) for n in ("attn1", "attn2", "ff") if getattr(model.block, n, None)]
    got = _run(model, name, cells)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want_cells, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_run(model, name, rand), want_rand, atol=1e-3)
    merged = S * S // 4
    assert {s[1] for shapes in seen.values() for s in shapes} == {merged}, seen
    if name == "ff_chunk_batch":  # chunking still chunks: one ff call per batch row, each merged
        assert seen["ff"] == [torch.Size([1, merged, C])] * B


def test_gligen_fuser_still_fuses_on_all_tokens():
    model = _model("gligen")
    tomesd.apply_patch(model, ratio=0.5, seed=5)
    seen = {}
    _record(model.block.fuser, seen, "fuser")
    with_objs = _run(model, "gligen", _latents(False))
    kwargs = _kwargs("gligen", torch.Generator().manual_seed(2))
    del kwargs["cross_attention_kwargs"]
    with torch.no_grad():
        without = model(_latents(False), **kwargs)
    assert seen["fuser"] == [torch.Size([B, S * S, C])]  # after attn1's output was unmerged
    assert not torch.allclose(with_objs, without, atol=1e-4)


def test_sinusoidal_pos_embed_still_applies_before_merging():
    model = _model("sinusoidal")
    tomesd.apply_patch(model, ratio=0.5, seed=5)
    seen = {}
    _record(model.block.pos_embed, seen, "pos_embed")
    _record(model.block.attn1, seen, "attn1")
    with_pos = _run(model, "sinusoidal", _latents(False))
    # applied before attn1 and before attn2, both times on all tokens; attn1 then sees the merged ones
    assert seen["pos_embed"] == [torch.Size([B, S * S, C])] * 2 and seen["attn1"] == [torch.Size([B, S * S // 2, C])]
    model.block.pos_embed = None
    assert not torch.allclose(_run(model, "sinusoidal", _latents(False)), with_pos, atol=1e-4)


def test_ff_chunked_over_tokens_runs_unmerged_with_a_warning(caplog):
    model = _model("ff_chunk_tokens")
    want = _run(model, "ff_chunk_tokens", _latents(False))
    tomesd.apply_patch(model, ratio=0.5, merge_attn=False, merge_mlp=True)
    seen = {}
    _record(model.block.ff, seen, "ff")
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        got = _run(model, "ff_chunk_tokens", _latents(False))
    assert seen["ff"] == [torch.Size([B, S * S // 4, C])] * 4  # still 4 chunks, not merged
    assert "chunking over the token axis" in caplog.text
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the only merged sub-layer was skipped


def test_only_cross_attention_blocks_merge_with_prop_attn(caplog):
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8,
                               cross_attention_dim=12, only_cross_attention=True).eval()
    x, text = torch.randn(2, 16, 8, 8), torch.randn(2, 7, 12)
    with torch.no_grad():
        want = model(x, encoder_hidden_states=text).sample
        tomesd.apply_patch(model, ratio=0.5, prop_attn=True, seed=0)
        with caplog.at_level(logging.WARNING, logger="tomesd"):
            got = model(x, encoder_hidden_states=text).sample
    assert got.shape == want.shape and torch.isfinite(got).all() and not torch.equal(got, want)
    assert "only_cross_attention" in caplog.text

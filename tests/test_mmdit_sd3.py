"""SD 3 / 3.5 (MMDiT): only image tokens merge, tokens and kv modes, ratio schedules, seeds, removal,
gradients with checkpointing, compile, kv mode's need of torch's SDPA, and a refused attention-output cache."""
import logging

import pytest
import torch

import tiny
import tomesd
from mmdit_helpers import assert_checkpointing_keeps_gradients, hidden_lengths as _hidden_lengths, run as _run


def test_sd3_tokens_mode_merges_only_image_tokens():
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    want = _run(model, inputs)
    plain = _run(model, inputs, record=True)
    assert set(plain) == {(64 + 5, 64 + 5), (64, 64)}  # joint attention (image + text), SD 3.5's attn2
    tomesd.apply_patch(model, ratio=0.5, merge_mlp=True)
    attn, attn2, ff = (_hidden_lengths(model, n) for n in ("attn", "attn2", "ff"))
    merged = _run(model, inputs, record=True)
    assert set(attn) == set(attn2) == set(ff) == {32}  # 64 image tokens → 32; text tokens are not inputs here
    assert set(merged) == {(32 + 5, 32 + 5), (32, 32)}  # text tokens keep attending to every merged image token
    assert not torch.equal(_run(model, inputs), want)


def test_sd3_kv_mode_keeps_queries_and_merges_image_keys():
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    tomesd.apply_patch(model, ratio=0.5, mode="kv")
    assert set(_run(model, inputs, record=True)) == {(64 + 5, 32 + 5), (64, 32)}
    out = _run(model, inputs)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs", [dict(), dict(mode="kv"), dict(prop_attn=True, merge_mlp=True)])
def test_sd3_ratio_zero_and_removal_are_bit_exact(kwargs):
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    want = _run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tomesd.apply_patch(model, ratio=0.0, **kwargs)
    assert torch.equal(_run(model, inputs), want)
    tomesd.apply_patch(model, ratio=0.6, **kwargs)
    assert not torch.equal(_run(model, inputs), want)
    tomesd.remove_patch(model)
    assert torch.equal(_run(model, inputs), want)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all("forward" not in vars(m) for m in model.modules())


def test_sd3_ratio_schedules_seed_and_max_downsample():
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    calls = []
    tomesd.apply_patch(model, ratio=lambda h, w: calls.append((h, w)) or 0.25)
    lengths = _hidden_lengths(model, "attn")
    _run(model, tiny.sd3_inputs(size=16, width=8))
    assert calls == [(128, 64)] and set(lengths) == {32 - 8}  # a 16×8 latent: 8×4 tokens, px = latent × 8
    tomesd.apply_patch(model, ratio={64: 0.25, 128: 0.5})
    lengths = _hidden_lengths(model, "attn")
    _run(model, inputs)
    assert set(lengths) == {32}
    a, b = tiny.sd3(), tiny.sd3()
    tomesd.apply_patch(a, seed=4)
    tomesd.apply_patch(b, seed=4)
    assert torch.equal(_run(a, inputs), _run(b, inputs))
    tomesd.apply_patch(b, seed=5)
    assert not torch.equal(_run(a, inputs), _run(b, inputs))
    tomesd.apply_patch(b, seed=4, max_downsample=8)  # one level: larger values change nothing
    assert torch.equal(_run(a, inputs), _run(b, inputs))


@pytest.mark.parametrize("kwargs", [dict(), dict(mode="kv", merge_mlp=True)])
def test_sd3_checkpointed_gradients_equal_plain(kwargs):
    model = tiny.sd3()
    tomesd.apply_patch(model, ratio=0.5, seed=2, **kwargs)
    assert_checkpointing_keeps_gradients(
        model, lambda m: sum(m(**tiny.sd3_inputs(seed=s)).sample.square().mean() for s in (1, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(), dict(mode="kv")])
def test_sd3_compiles_fullgraph(kwargs):
    torch._dynamo.reset()
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    tomesd.apply_patch(model, ratio=0.5, seed=1, **kwargs)
    eager = _run(model, inputs)
    torch.testing.assert_close(_run(torch.compile(model, fullgraph=True), inputs), eager, rtol=1e-4, atol=1e-4)


def test_kv_needs_torch_sdpa(monkeypatch):
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    tomesd.apply_patch(model, ratio=0.5, mode="kv")
    from diffusers.models import attention_processor

    def sdpa_elsewhere(q, k, v, *args, **kwargs):  # an attention kernel that is not torch's SDPA
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v

    monkeypatch.setattr(attention_processor.F, "scaled_dot_product_attention", sdpa_elsewhere)
    with pytest.raises(RuntimeError, match="native attention backend"):
        _run(model, inputs)


@pytest.mark.parametrize("order", ["cache first", "tomesd first"])
def test_attention_output_cache_is_refused_on_sd3(order, caplog):
    """A diffusers hook that may replay an attention output from another step (pyramid attention
    broadcast) makes tomesd leave that attention unmerged, with a warning, whichever came first."""
    hooks = pytest.importorskip("diffusers.hooks")
    if not hasattr(hooks, "apply_pyramid_attention_broadcast"):
        pytest.skip("this diffusers has no pyramid attention broadcast")
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    steps = [500]
    config = hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(0, 1000),
        spatial_attention_block_identifiers=("transformer_blocks",), current_timestep_callback=lambda: steps[0])
    if order == "cache first":
        hooks.apply_pyramid_attention_broadcast(model, config)
    tomesd.apply_patch(model, ratio=0.5, merge_mlp=True)
    if order == "tomesd first":
        hooks.apply_pyramid_attention_broadcast(model, config)
    attn, ff = _hidden_lengths(model, "attn"), _hidden_lengths(model, "ff")
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        _run(model, inputs)
    assert attn and set(attn) == {64}  # the joint attention sees every image token
    assert ff and set(ff) == {32}  # the feed-forward, without such a hook, still merges
    assert "attn is not merged" in caplog.text and "pyramid_attention_broadcast" in caplog.text


def _duplicate_cells(module, args, out):
    """PatchEmbed's output [B, 8·8, C] with every 2×2 cell of the token grid holding its top-left token."""
    B, N, C = out.shape
    g = out.reshape(B, 8, 8, C)[:, ::2, ::2]
    return g.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(B, N, C)


@pytest.mark.parametrize("kwargs", [dict(), dict(share_plan=True), dict(match_window=3),
                                    dict(share_plan=True, match_window=3, merge_mlp=True, max_downsample=4)])
def test_sd3_tokens_options_compose_losslessly_on_duplicated_tokens(kwargs, plan_builds):
    """Every 2×2 cell of the image tokens identical, ratio 0.75 (each src into its cell's dst), prop_attn:
    tokens mode with local matching and / or one plan shared by all blocks computes the unpatched output
    (SD 3 has one level: max_downsample changes nothing). Without prop_attn it does not."""
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    model.pos_embed.register_forward_hook(_duplicate_cells)
    want = _run(model, inputs)
    tomesd.apply_patch(model, ratio=0.75, prop_attn=True, **kwargs)
    attn, attn2 = _hidden_lengths(model, "attn"), _hidden_lengths(model, "attn2")
    torch.testing.assert_close(_run(model, inputs), want, rtol=1e-5, atol=2e-5)
    assert set(attn) == set(attn2) == {16} and len(attn) == 3 and len(attn2) == 1
    assert plan_builds == [64] * (1 if kwargs.get("share_plan") else 3)
    tomesd.apply_patch(model, ratio=0.75, **kwargs)
    assert not torch.allclose(_run(model, inputs), want, atol=1e-3)

"""Flux in tokens mode: image tokens merged before each double-stream block's attention (and MLP) and
around each whole single-stream block, a merged token at its anchor's rotary position; token counts,
bit-exact ratio 0 / plans that merge nothing / removal, lossless merging of duplicated tokens (positions
included), Kontext reference tokens, one shared plan per call, checkpointed gradients, a processor set
after patching."""
import logging

import pytest
import torch

import tiny
import tomesd
from mmdit_helpers import assert_checkpointing_keeps_gradients, hidden_lengths, needs_split_single_blocks, run
from tomesd import matching
from tomesd.matching import MergePlan
from tomesd.patch import PlanProvider, patched_state

pytestmark = needs_split_single_blocks


def _single_lengths(model):
    """hidden_states lengths every single-stream block's forward receives (a pre-hook after tomesd's)."""
    seen = []
    for block in model.single_transformer_blocks:
        block.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]),
                                        with_kwargs=True)
    return seen


def _cells(x, h, w):
    """x [B, h·w, C] with every 2×2 cell holding its top-left token."""
    B, N, C = x.shape
    g = x.reshape(B, h, w, C)[:, ::2, ::2]
    return g.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(B, N, C)


def test_tokens_mode_merges_image_tokens_in_both_kinds_of_blocks():
    model, inputs = tiny.flux(), tiny.flux_inputs()
    want = run(model, inputs)
    tomesd.apply_patch(model, ratio=0.5, mode="tokens", merge_mlp=True)
    assert patched_state(model).config.mode == "tokens" and not patched_state(model).config.prop_attn
    attn, ff, single = hidden_lengths(model, "attn"), hidden_lengths(model, "ff"), _single_lengths(model)
    seen = run(model, inputs, record=True)
    assert attn == [32, 32] + [5 + 32] * 2  # double blocks' image input; single blocks' attention: text + image
    assert ff == [32, 32] and single == [32, 32]  # a single-stream block runs whole on the merged tokens
    assert seen == [(5 + 32, 5 + 32)] * 4  # text + merged image queries and keys in every block
    out = run(model, inputs)
    assert out.shape == want.shape and torch.isfinite(out).all() and not torch.allclose(out, want, atol=1e-3)


def test_merge_flags_on_single_stream_blocks():
    """merge_attn merges a single-stream block whole (its attention and MLP share their tokens); merge_mlp
    alone merges only the double-stream blocks' feed-forward."""
    model, inputs = tiny.flux(), tiny.flux_inputs()
    tomesd.apply_patch(model, ratio=0.5, mode="tokens", merge_attn=False, merge_mlp=True)
    ff = hidden_lengths(model, "ff")
    seen = run(model, inputs, record=True)
    assert ff == [32, 32] and seen == [(5 + 64, 5 + 64)] * 4


def _identity(self, request):
    B, N, _ = request.metric.shape
    slot = torch.arange(N).expand(B, N).clone()
    return MergePlan(slot=slot, counts=torch.ones(B, N, dtype=torch.int32), num_out=N, anchor=slot.clone())


@pytest.mark.parametrize("kwargs", [dict(), dict(merge_mlp=True, share_plan=True)])
def test_ratio_zero_plans_merging_nothing_and_removal_are_bit_exact(kwargs, monkeypatch):
    model, inputs = tiny.flux(), tiny.flux_inputs()
    want = run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tomesd.apply_patch(model, ratio=0.0, mode="tokens", **kwargs)
    assert torch.equal(run(model, inputs), want)
    tomesd.apply_patch(model, ratio=0.5, mode="tokens", **kwargs)
    with monkeypatch.context() as m:  # every step of the path runs (merge, positions at SDPA, rebuild)
        m.setattr(PlanProvider, "build", _identity)
        assert torch.equal(run(model, inputs), want)
    assert not torch.equal(run(model, inputs), want)
    tomesd.remove_patch(model)
    assert torch.equal(run(model, inputs), want)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_rotation_equals_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb

    from tomesd.patch.hosts.rotary import gather_rows, rotate

    g = torch.Generator().manual_seed(0)
    B, H, T, N, D = 2, 3, 4, 10, 8
    cos, sin = torch.randn(T + N, D, generator=g, dtype=torch.float64), torch.randn(T + N, D, generator=g)
    q = torch.randn(B, H, T + N, D, generator=g)
    slot = torch.arange(N).expand(B, N)
    plan = MergePlan(slot=slot, counts=torch.ones(B, N, dtype=torch.int32), num_out=N, anchor=slot)
    got = rotate(q, gather_rows(cos, plan), gather_rows(sin, plan))
    assert torch.equal(got, apply_rotary_emb(q, (cos, sin), sequence_dim=2))
    anchor = torch.tensor([[0, 2, 5], [1, 3, 9]])  # rows at other tokens' positions, per batch row
    plan = MergePlan(slot=slot, counts=torch.ones(B, 3, dtype=torch.int32), num_out=3, anchor=anchor)
    rows = gather_rows(cos, plan)
    assert rows.shape == (B, T + 3, D)
    assert torch.equal(rows[1, :T], cos[:T]) and torch.equal(rows[1, T:], cos[T + anchor[1]])


def test_anchors_are_each_rows_kept_token():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 36, 8, generator=g)
    dst, src = matching.partition(6, 6, 2, 2, torch.tensor(7), "cpu")
    plan = matching.build_plan(metric, dst, src, 20)
    anchor = matching.anchors(plan, dst)
    assert anchor.shape == (2, 16)
    assert torch.equal(plan.slot.gather(1, anchor), torch.arange(16).expand(2, 16))  # row m's anchor lands in m
    merged_rows = plan.counts > 1
    assert torch.isin(anchor[merged_rows], dst).all()  # a merged row's anchor is its dst
    assert (anchor.diff(dim=1) > 0).all()  # raster order


def _duplicated(inputs, grid_h, grid_w, extra=0):
    """Inputs whose output-grid tokens repeat in every 2×2 cell, and a hook making the rotary rows repeat
    alike (the positions are inputs of the blocks), so that merging a cell into its dst loses nothing."""
    x = inputs["hidden_states"]
    n = grid_h * grid_w
    inputs["hidden_states"] = torch.cat([_cells(x[:, :n], grid_h, grid_w), x[:, n:]], dim=1)

    def positions(module, args, out):
        text = out[0].shape[0] - n - extra
        return tuple(torch.cat([t[:text], _cells(t[None, text : text + n], grid_h, grid_w)[0], t[text + n :]])
                     for t in out)

    return positions


@pytest.mark.parametrize("kwargs", [dict(), dict(merge_mlp=True), dict(share_plan=True), dict(match_window=3),
                                    dict(kontext=True)])
def test_duplicated_tokens_merge_losslessly(kwargs, builds):
    """Every 2×2 cell identical (tokens and positions), ratio 0.75 (each src into its cell's dst), prop_attn:
    the merged model computes the unpatched output. Without prop_attn it does not (the test can fail)."""
    kwargs = dict(kwargs)
    kontext = kwargs.pop("kontext", False)
    model, inputs = tiny.flux(), tiny.flux_inputs(grid=4, width=8)
    extra = 32 if kontext else 0
    if kontext:  # a reference image after the output image: its tokens pass through at their own positions
        reference = torch.randn(2, extra, 16, generator=torch.Generator().manual_seed(3))
        inputs["hidden_states"] = torch.cat([inputs["hidden_states"], reference], dim=1)
        inputs["img_ids"] = torch.cat([tiny.grid_ids(4, 8), tiny.grid_ids(8, 4, first=1)])
    model.pos_embed.register_forward_hook(_duplicated(inputs, 4, 8, extra))
    want = run(model, inputs)
    tomesd.apply_patch(model, ratio=0.75, mode="tokens", prop_attn=True, **kwargs)
    seen = run(model, inputs, record=True)
    assert seen == [(5 + 8 + extra, 5 + 8 + extra)] * 4
    assert builds[-1] == (4, 8, 24, extra, 32 + extra, 8 + extra)
    torch.testing.assert_close(run(model, inputs), want, rtol=1e-5, atol=2e-5)
    tomesd.apply_patch(model, ratio=0.75, mode="tokens", **kwargs)
    assert not torch.allclose(run(model, inputs), want, atol=1e-3)


def test_one_plan_per_call_is_shared_by_double_and_single_blocks(plan_builds):
    model, inputs = tiny.flux(), tiny.flux_inputs()
    tomesd.apply_patch(model, ratio=0.5, mode="tokens", share_plan=True, merge_mlp=True)
    seen = run(model, inputs, record=True)
    assert plan_builds == [64] and seen == [(5 + 32, 5 + 32)] * 4
    tomesd.apply_patch(model, ratio=0.5, mode="tokens", share_plan=True, plan_every=2)
    del plan_builds[:]
    for t in (0.9, 0.8, 0.7):  # one sampling run: plans rebuilt every second call
        run(model, dict(inputs, timestep=torch.full((2,), t)))
    assert plan_builds == [64, 64]


@pytest.mark.parametrize("kwargs", [dict(), dict(prop_attn=True, merge_mlp=True, match_window=3)])
def test_checkpointed_gradients_equal_plain(kwargs):
    model = tiny.flux()
    tomesd.apply_patch(model, ratio=0.5, seed=3, mode="tokens", **kwargs)
    assert_checkpointing_keeps_gradients(model, lambda m: m(**tiny.flux_inputs()).sample.square().mean())


def test_processor_set_after_patching_leaves_the_attention_unmerged(caplog):
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    except ImportError:  # diffusers < 0.35
        from diffusers.models.attention_processor import FluxAttnProcessor2_0 as FluxAttnProcessor

    model, inputs = tiny.flux(), tiny.flux_inputs()
    want = run(model, inputs)
    tomesd.apply_patch(model, ratio=0.5, mode="tokens", seed=0)
    model.set_attn_processor(FluxAttnProcessor())
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        got = run(model, inputs)
    assert "would lose their rotary positions" in caplog.text
    assert torch.equal(got, want)

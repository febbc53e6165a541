"""Flux (MMDiT): kv mode by default (tokens mode: tests/test_flux_tokens.py), the grid from img_ids
(Kontext, unrecognized and positional ids), ratio 0, checkpointed gradients, 0-1000 timesteps, a
processor replaced after patching."""
import logging

import pytest
import torch

import tiny
import tomesd
from mmdit_helpers import assert_checkpointing_keeps_gradients, hidden_lengths as _hidden_lengths, needs_split_single_blocks
from mmdit_helpers import run as _run
from tomesd.patch import patched_state


@needs_split_single_blocks
def test_flux_default_is_kv():
    model, inputs = tiny.flux(), tiny.flux_inputs()
    want = _run(model, inputs)
    plain = _run(model, inputs, record=True)
    assert set(plain) == {(5 + 64, 5 + 64)}  # double- and single-stream blocks: text then image
    tomesd.apply_patch(model, ratio=0.5)
    assert patched_state(model).config.mode == "kv" and patched_state(model).config.prop_attn
    seen = _run(model, inputs, record=True)
    assert seen == [(5 + 64, 5 + 32)] * 4  # 2 double + 2 single blocks, every image query kept
    assert not torch.equal(_run(model, inputs), want)
    tomesd.apply_patch(model, ratio=0.5, merge_attn=False, merge_mlp=True)  # tokens mode in the MLP only
    ff = _hidden_lengths(model, "ff")
    _run(model, inputs)
    assert set(ff) == {32}
    tomesd.remove_patch(model)
    assert torch.equal(_run(model, inputs), want)


@needs_split_single_blocks
def test_flux_grid_comes_from_img_ids():
    model = tiny.flux()
    calls = []
    tomesd.apply_patch(model, ratio=lambda h, w: calls.append((h, w)) or 0.5)
    seen = _run(model, tiny.flux_inputs(grid=4, width=6), record=True)
    assert calls == [(4 * 16, 6 * 16)]  # packed 2×2 latent patches of an 8-pixel VAE
    assert set(seen) == {(5 + 24, 5 + 12)}


def test_flux_ratio_zero_is_bit_exact_and_gradients_with_checkpointing():
    model, inputs = tiny.flux(), tiny.flux_inputs()
    want = _run(model, inputs)
    tomesd.apply_patch(model, ratio=0.0)
    assert torch.equal(_run(model, inputs), want)
    tomesd.apply_patch(model, ratio=0.5, seed=3, merge_mlp=True)
    assert_checkpointing_keeps_gradients(model, lambda m: m(**tiny.flux_inputs()).sample.square().mean())


def test_flux_timestep_ratio_sees_the_0_1000_scale():
    model = tiny.flux()
    seen = []
    tomesd.apply_patch(model, ratio=lambda h, w, timestep: seen.append(timestep) or 0.5, seed=0)
    kwargs = tiny.flux_inputs(batch=1)
    kwargs["timestep"] = torch.tensor([0.25])  # the pipeline passes t / 1000
    with torch.no_grad():
        model(**kwargs)
    assert seen and seen[0] == pytest.approx(250.0)


def test_flux_ids_layouts():
    from tomesd.patch.hosts.mmdit import ids_layout

    g = tiny.grid_ids
    assert ids_layout(g(4, 8)) == (4, 8, 0, 0)  # (h, w, head, tail)
    assert ids_layout(g(4, 8)[None]) == (4, 8, 0, 0)  # deprecated batched ids
    assert ids_layout(torch.cat([g(4, 8), g(8, 4, first=1)])) == (4, 8, 0, 32)  # Kontext, swapped aspect
    assert ids_layout(torch.cat([g(4, 8), g(8, 4)])) == (4, 8, 0, 32)  # bounding box 8×8 would be a made-up grid
    assert ids_layout(torch.cat([g(4, 4), g(4, 4, col0=4)])) == (4, 4, 0, 16)  # a reference beside the image
    assert ids_layout(torch.cat([g(8, 4, first=1), g(4, 8)])) == (4, 8, 32, 0)  # the reference first
    assert ids_layout(torch.cat([g(2, 2, first=1), g(4, 8), g(8, 4, first=2)])) == (4, 8, 4, 32)
    column_major = g(8, 6).view(8, 6, 3).transpose(0, 1).reshape(-1, 3)
    assert "column-major" in ids_layout(column_major)
    assert ids_layout(g(8, 1)) == (8, 1, 0, 0)  # one column: raster and column-major orders agree
    assert "whole numbers" in ids_layout(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)))
    shuffled = g(8, 8)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    assert isinstance(ids_layout(shuffled), str)
    assert isinstance(ids_layout(g(8, 8).flip(0)), str)


@needs_split_single_blocks
def test_flux_kontext_merges_the_output_grid_only(builds):
    model = tiny.flux()
    inputs = tiny.flux_inputs(grid=4, width=8)
    reference = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(3))
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], reference], dim=1)
    inputs["img_ids"] = torch.cat([tiny.grid_ids(4, 8), tiny.grid_ids(8, 4, first=1)])
    calls = []
    tomesd.apply_patch(model, ratio=lambda h, w: calls.append((h, w)) or 0.5)
    seen = _run(model, inputs, record=True)
    assert calls == [(4 * 16, 8 * 16)]  # the ratio is resolved for the output image, not 64 tokens
    assert builds == [(4, 8, 16, 32, 64, 48)] * 4  # 32 grid tokens, 16 merged; 32 reference tokens pass through
    assert seen == [(5 + 64, 5 + 48)] * 4
    from tomesd import matching
    from tomesd.patch.plans import with_context

    base = matching.build_plan(torch.randn(1, 16, 4), *matching.partition(4, 4, 2, 2, None, "cpu"), 6)
    extended = with_context(base, head=2, tail=3)
    x = torch.randn(1, 21, 4)
    merged = matching.merge(x, extended)
    assert torch.equal(merged[:, base.num_out:], torch.cat([x[:, :2], x[:, 18:]], dim=1))  # passed through exactly
    assert torch.equal(merged[:, :base.num_out], matching.merge(x[:, 2:18], base))
    unmerged = matching.unmerge(merged, extended)
    assert torch.equal(unmerged[:, :2], x[:, :2]) and torch.equal(unmerged[:, 18:], x[:, 18:])


@needs_split_single_blocks
def test_flux_reference_first_merges_the_output_grid(builds):
    """img_ids with a reference grid first and the output grid second: the output grid merges, the
    reference passes through; the same output as the output-first layout, tokens reordered."""
    model = tiny.flux()
    inputs = tiny.flux_inputs(grid=4, width=8)
    reference = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(3))
    image, ids = inputs["hidden_states"], tiny.grid_ids(4, 8)
    calls = []
    tomesd.apply_patch(model, ratio=lambda h, w: calls.append((h, w)) or 0.5, seed=1)
    first = _run(model, dict(inputs, hidden_states=torch.cat([image, reference], 1),
                             img_ids=torch.cat([ids, tiny.grid_ids(8, 4, first=1)])))
    second = _run(model, dict(inputs, hidden_states=torch.cat([reference, image], 1),
                              img_ids=torch.cat([tiny.grid_ids(8, 4, first=1), ids])))
    assert calls == [(4 * 16, 8 * 16)] * 2  # the output image's size both times
    assert builds == [(4, 8, 16, 32, 64, 48)] * 4 + [(4, 8, 16, 0, 64, 48)] * 4
    torch.testing.assert_close(second, torch.cat([first[:, 32:], first[:, :32]], 1), rtol=1e-4, atol=1e-5)


@needs_split_single_blocks
def test_flux_column_major_img_ids_are_a_warning(builds, caplog):
    model, inputs = tiny.flux(), tiny.flux_inputs(grid=8, width=6)
    inputs["img_ids"] = inputs["img_ids"].view(8, 6, 3).transpose(0, 1).reshape(-1, 3)
    want = _run(model, inputs)
    tomesd.apply_patch(model, ratio=0.5)
    with caplog.at_level(logging.INFO, logger="tomesd"):
        got = _run(model, inputs)
    assert not builds and torch.equal(got, want)
    said = [r for r in caplog.records if "column-major" in r.getMessage()]
    assert said and all(r.levelno == logging.WARNING for r in said)


@needs_split_single_blocks
def test_flux_unrecognized_img_ids_are_refused_with_a_message(builds, caplog):
    model, inputs = tiny.flux(), tiny.flux_inputs()
    inputs["img_ids"] = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))  # diffusers' model tests
    want = _run(model, inputs)
    tomesd.apply_patch(model, ratio=0.5)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        got = _run(model, inputs)
    assert not builds and torch.equal(got, want)
    assert "not whole numbers" in caplog.text and "merging is off" in caplog.text


@needs_split_single_blocks
def test_flux_img_ids_passed_positionally(builds, caplog):
    model, inputs = tiny.flux(), tiny.flux_inputs()
    tomesd.apply_patch(model, ratio=0.5)
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")
    with caplog.at_level(logging.WARNING, logger="tomesd"), torch.no_grad():
        positional = model(*(inputs[n] for n in names)).sample
    assert not caplog.records and len(builds) == 4
    assert torch.equal(positional, _run(model, inputs))


def test_processor_replaced_after_patching_is_said_and_runs_unmerged(caplog):
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    except ImportError:  # diffusers < 0.35
        from diffusers.models.attention_processor import FluxAttnProcessor2_0 as FluxAttnProcessor

    model = tiny.flux()
    inputs = tiny.flux_inputs(batch=2)
    with torch.no_grad():
        want = model(**inputs).sample
        tomesd.apply_patch(model, ratio=0.5, seed=0)
        model.set_attn_processor(FluxAttnProcessor())
        with caplog.at_level(logging.WARNING, logger="tomesd"):
            got = model(**inputs).sample
    assert "replaced after patching" in caplog.text
    torch.testing.assert_close(got, want)  # kv mode with nothing merged inside: the unpatched output

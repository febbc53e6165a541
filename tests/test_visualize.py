"""tomesd.visualize: colors follow the merge plan, in the array and in the saved PNG."""
import numpy as np
import pytest
import torch
from PIL import Image

import tiny
import tomesd
from tomesd.patch import patched_state
from tomesd.visualize import GREY, MergeRecorder, MergeSnapshot, color_map, overlay, token_colors


def test_token_colors_follow_groups():
    slot = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    colors = [tuple(c) for c in token_colors(slot)]
    assert colors[0] == colors[1] and colors[3] == colors[4] == colors[5] and colors[7] == colors[8]
    assert len({colors[0], colors[3], colors[7]}) == 3  # three merged groups, three colors
    assert colors[2] == colors[6] == GREY  # tokens left alone
    assert GREY not in {colors[0], colors[3], colors[7]}


def test_every_group_of_a_large_map_gets_its_own_color():
    groups = 6000
    slot = torch.arange(groups).repeat_interleave(2)[torch.randperm(2 * groups, generator=torch.Generator().manual_seed(0))]
    colors = token_colors(slot)
    codes = colors.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    per_group = {}
    for g, code in zip(slot.tolist(), codes.tolist()):
        assert per_group.setdefault(g, code) == code
    assert len(set(per_group.values())) == groups


@pytest.fixture(scope="module")
def patched_pipe(tmp_path_factory):
    pipe = tiny.pipeline("sd1", tmp_path_factory.mktemp("tok"))
    pipe.set_progress_bar_config(disable=True)
    tomesd.apply_patch(pipe, ratio=0.5, seed=3)
    return pipe


def _generate(pipe, size=64):
    return pipe("a red cat", num_inference_steps=2, height=size, width=size,
                generator=torch.Generator().manual_seed(0)).images[0]


def test_recorded_plans_and_overlay_png_match_the_merge(patched_pipe, tmp_path):
    pipe = patched_pipe
    block0 = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    merged_len = []
    # Registered after patching: sees attn1's input after tomesd merged it.
    handle = block0.attn1.register_forward_pre_hook(lambda m, args: merged_len.append(args[0].shape[1]))
    hooks_before = len(block0.attn1._forward_pre_hooks)
    try:
        with MergeRecorder(pipe, steps=[1]) as recorder:
            image = _generate(pipe)
    finally:
        handle.remove()
    assert len(block0.attn1._forward_pre_hooks) == hooks_before - 1  # the recorder's hooks are gone
    assert {s.step for s in recorder.snapshots} == {1} and recorder.calls == 2
    snap = recorder.get(step=1, block=0)
    latent = 64 // pipe.vae_scale_factor
    assert snap.grid == (latent, latent) and snap.downsample == 1 and snap.slot.shape == (2, latent * latent)
    n = latent * latent
    assert snap.merged_tokens(-1) == n // 2  # ratio 0.5
    assert int(snap.slot[-1].max()) + 1 == merged_len[-1] == n - n // 2

    path = tmp_path / "merges.png"
    overlay(image, snap, alpha=1.0).save(path)
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape == (64, 64, 3)
    cell = 64 // latent
    centers = png[cell // 2 :: cell, cell // 2 :: cell].reshape(-1, 3)  # one pixel per token
    assert np.array_equal(centers, color_map(snap).reshape(-1, 3))
    slot = snap.slot[-1].tolist()
    sizes = np.bincount(slot)
    color_of = {}
    for token, s in enumerate(slot):
        c = tuple(centers[token])
        if sizes[s] == 1:
            assert c == GREY
        else:
            assert color_of.setdefault(s, c) == c  # same destination, same color
    assert len(color_of) > 10 and len(set(color_of.values())) == len(color_of)  # different groups differ

    blended = np.asarray(overlay(image, snap, alpha=0.0))
    assert np.array_equal(blended, np.asarray(image.convert("RGB")))


def test_recorder_picks_block_and_level_and_says_what_it_has(patched_pipe):
    with MergeRecorder(patched_pipe) as recorder:
        _generate(patched_pipe)
    assert {s.step for s in recorder.snapshots} == {0, 1}
    blocks = sorted({s.block for s in recorder.snapshots})
    assert len(blocks) == 3  # tiny sd1 at /1: one transformer block on the way down, two up
    assert recorder.get(step=0, level=1).block == blocks[0]
    assert recorder.get(step=1, block=blocks[2]).block == blocks[2]
    with pytest.raises(KeyError, match="recorded") as raised:
        recorder.get(step=5)
    assert str(raised.value).startswith("MergeRecorder.get(step=5")  # plain text, not a quoted key


def test_recorder_records_with_merge_attn_off():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, merge_attn=False, merge_mlp=True, seed=0)
    args, kwargs = tiny.unet_inputs("sd1")
    with torch.no_grad(), MergeRecorder(unet) as recorder:
        unet(*args, **kwargs)
    assert recorder.snapshots, "merge_mlp alone merges, so something is recorded"
    snap = recorder.get(step=0, level=1)
    h, w = snap.grid
    assert snap.slot.shape[1] == h * w and snap.merged_tokens() == (h * w) // 2


def test_recorder_on_flux_records_the_image_grid():
    model, inputs = tiny.flux(), tiny.flux_inputs(grid=4, width=6)
    tomesd.apply_patch(model, ratio=0.5, seed=0)
    with torch.no_grad(), MergeRecorder(model, steps=[1]) as recorder:
        model(**inputs)
        model(**inputs)
    assert recorder.calls == 2 and {s.step for s in recorder.snapshots} == {1}
    snap = recorder.get()
    assert snap.grid == (4, 6) and snap.downsample == 1 and snap.slot.shape == (2, 24)
    assert snap.merged_tokens() == 12
    assert color_map(snap).shape == (4, 6, 3)
    assert not patched_state(model).observers  # the recorder left nothing behind


def test_get_says_nothing_was_recorded():
    model, inputs = tiny.flux(), tiny.flux_inputs()
    tomesd.apply_patch(model, ratio=0.5)
    with torch.no_grad(), MergeRecorder(model, steps=[3]) as recorder:
        model(**inputs)
    with pytest.raises(KeyError, match="nothing was recorded.*called 1 time.*steps \\[3\\]"):
        recorder.get()


def test_recorder_needs_a_patched_model():
    with pytest.raises(ValueError, match="apply_patch"):
        with MergeRecorder(tiny.unet("sd1")):
            pass


def test_overlay_rejects_bad_alpha():
    snap = MergeSnapshot(step=0, block=0, grid=(2, 2), downsample=1, slot=torch.tensor([[0, 0, 1, 2]]))
    with pytest.raises(ValueError, match="alpha"):
        overlay(Image.new("RGB", (16, 16)), snap, alpha=1.5)

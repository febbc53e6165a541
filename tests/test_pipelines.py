"""Whole pipelines built from configs, through save_pretrained/from_pretrained, with a prompt."""
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

import tiny
import tomesd


def _generate(pipe, **kwargs):
    return pipe("a red cat", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_pipeline_round_trip_and_prompt(arch, tmp_path):
    tiny.pipeline(arch, tmp_path / "tok").save_pretrained(tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    want = _generate(pipe)
    assert tomesd.apply_patch(pipe, ratio=0.5, seed=7) is pipe
    assert tomesd.is_patched(pipe) and tomesd.is_patched(pipe.unet)
    lengths = []
    block = next(m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock))
    block.attn1.register_forward_pre_hook(lambda m, a, k: lengths.append((a[0] if a else k["hidden_states"]).shape[1]) and None,
                                          with_kwargs=True)
    first = _generate(pipe)
    side = 64 // pipe.vae_scale_factor // (2 if arch == "sdxl" else 1)  # SDXL's first attention level is at /2
    top = side * side
    assert lengths and set(lengths) == {top - top // 2}
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    assert np.array_equal(first, _generate(pipe))  # same seed: identical images, nothing re-seeded
    assert not np.array_equal(first, want)
    tomesd.remove_patch(pipe)
    assert not tomesd.is_patched(pipe)
    assert np.array_equal(_generate(pipe), want)


def test_save_while_patched_reloads_unpatched(tmp_path):
    unet = tiny.unet("sd1")
    args, kwargs = tiny.unet_inputs("sd1")
    with torch.no_grad():
        want = unet(*args, **kwargs).sample
    tomesd.apply_patch(unet, ratio=0.5)
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert tomesd.is_patched(unet) and not tomesd.is_patched(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(*args, **kwargs).sample, want)

"""Attention processors set on a patched model: only this patch's own wrappers carry kv / prop_attn. A
processor set back after patching (saved from a patched model, restored by unfuse_qkv_projections, or
set by set_default_attn_processor) is treated like any other processor: the mask form on UNets, and on
SD 3 / Flux a warning and the sub-layer left unmerged, never the unpatched output in silence."""
import logging

import pytest
import torch

import tiny
import tomesd
from tomesd import prop_attention as pa


def _sd3_out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _said(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "processor" in r.getMessage()]


@pytest.mark.parametrize("kwargs", [dict(mode="kv"), dict(mode="tokens", prop_attn=True)], ids=["kv", "tokens-prop"])
def test_sd3_processors_saved_from_a_patched_model_and_set_back_are_not_ours(kwargs, caplog):
    """attn_processors of a patched model are its wrappers; re-patching retires them. Set back, they
    are said and their sub-layers left unmerged (kv: the unpatched output; tokens: no merge there)."""
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    plain = _sd3_out(model, inputs)
    tomesd.apply_patch(model, ratio=0.5, seed=1, **kwargs)
    saved = model.attn_processors
    tomesd.apply_patch(model, ratio=0.5, seed=1, **kwargs)  # replaces the patch: the saved wrappers are retired
    merged = _sd3_out(model, inputs)
    assert not torch.allclose(merged, plain, atol=1e-5)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        model.set_attn_processor(saved)
        got = _sd3_out(model, inputs)
    said = _said(caplog)
    assert said and all("not merged there" in m and "apply_patch again" in m for m in said)
    torch.testing.assert_close(got, plain)  # every joint attention said and left unmerged
    tomesd.apply_patch(model, ratio=0.5, seed=1, **kwargs)  # patching again after setting them merges again
    torch.testing.assert_close(_sd3_out(model, inputs), merged)


def test_sd3_fuse_patch_unfuse_is_said(caplog):
    """diffusers' fuse_qkv_projections → apply_patch → unfuse_qkv_projections sets back the processors
    saved when fusing, in either order of patching: said, never a silent unpatched output."""
    from diffusers import SD3Transformer2DModel

    for repatch in (False, True):
        caplog.clear()
        torch.manual_seed(0)  # no dual-attention block: diffusers' fused processor takes joint attention only
        model = SD3Transformer2DModel(**dict(tiny.SD3_TRANSFORMER, dual_attention_layers=())).eval()
        inputs = tiny.sd3_inputs()
        plain = _sd3_out(model, inputs)
        if repatch:
            tomesd.apply_patch(model, ratio=0.5, mode="kv", seed=0)  # fusing then saves this patch's wrappers
        model.fuse_qkv_projections()
        tomesd.apply_patch(model, ratio=0.5, mode="kv", seed=0)
        fused = _sd3_out(model, inputs)
        assert not torch.allclose(fused, plain, atol=1e-5)
        with caplog.at_level(logging.WARNING, logger="tomesd"):
            model.unfuse_qkv_projections()
            got = _sd3_out(model, inputs)
        assert _said(caplog), repatch
        torch.testing.assert_close(got, plain)


@pytest.mark.parametrize("kwargs", [dict(prop_attn=True), dict(mode="kv")], ids=["tokens-prop", "kv"])
def test_unet_restored_wrappers_keep_prop_attn_in_the_channel_form(kwargs, monkeypatch):
    """UNet prop_attn in the head-channel form (the form CUDA gets, forced through choose_form): processors
    saved from a patched UNet and set back after re-patching take the bias as the attention_mask, like
    any processor that is not this patch's; it is not lost."""
    unet = tiny.unet()
    args, kw = tiny.unet_inputs("sd1")
    monkeypatch.setattr(pa, "choose_form", lambda device: "channel")
    tomesd.apply_patch(unet, ratio=0.5, seed=2, **kwargs)
    with torch.no_grad():
        want = unet(*args, **kw).sample
    saved = unet.attn_processors
    tomesd.apply_patch(unet, ratio=0.5, seed=2, **kwargs)
    unet.set_attn_processor(saved)
    with torch.no_grad():
        got = unet(*args, **kw).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    tomesd.apply_patch(unet, ratio=0.5, seed=2, **dict(kwargs, prop_attn=False))
    with torch.no_grad():
        assert not torch.allclose(unet(*args, **kw).sample, want, rtol=1e-4, atol=1e-5)  # the bias mattered


def test_wrapper_of_another_model_is_not_ours(caplog):
    """A wrapper still active in another patched model, set on this one: said, not merged there."""
    model, other, inputs = tiny.sd3(), tiny.sd3(), tiny.sd3_inputs()
    plain = _sd3_out(model, inputs)
    tomesd.apply_patch(model, ratio=0.5, mode="kv", seed=0)
    tomesd.apply_patch(other, ratio=0.5, mode="kv", seed=0)
    model.set_attn_processor(other.attn_processors)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        got = _sd3_out(model, inputs)
    assert _said(caplog)
    torch.testing.assert_close(got, plain)


@pytest.mark.parametrize("kwargs", [dict(prop_attn=True), dict(mode="kv")], ids=["tokens-prop", "kv"])
def test_set_default_attn_processor_after_patching(kwargs):
    """unet.set_default_attn_processor() after apply_patch with a wrapped processor (prop_attn, kv) does not
    raise. The model then computes what a model with diffusers' default processor, patched alike,
    computes; removal leaves that processor."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny.unet()
    args, kw = tiny.unet_inputs("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=2, **kwargs)
    unet.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    with torch.no_grad():
        got = unet(*args, **kw).sample
    reference = tiny.unet()
    reference.set_attn_processor(AttnProcessor())
    tomesd.apply_patch(reference, ratio=0.5, seed=2, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(got, reference(*args, **kw).sample)
    tomesd.remove_patch(unet)
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())


def test_wrappers_read_and_write_through_to_the_processor():
    """A wrapper stands for its processor: attributes read and set on it are the processor's (e.g. a
    pipeline setting an adapter's scale through attn_processors)."""
    model = tiny.sd3()
    tomesd.apply_patch(model, ratio=0.5, mode="kv")
    wrapper = model.transformer_blocks[0].attn.processor
    assert type(wrapper).__name__ == "WrappedJointAttnProcessor2_0"
    wrapper.scale = 0.25
    assert model.transformer_blocks[0].attn.processor.scale == 0.25
    tomesd.remove_patch(model)
    assert model.transformer_blocks[0].attn.processor.scale == 0.25  # it was set on the processor itself

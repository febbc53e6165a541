"""tomesd next to diffusers' own machinery: attention processors, IP-Adapter, LoRA, cache hooks,
group offloading, layerwise casting, model CPU offload and ControlNet pipelines."""
import logging

import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import tiny
import tomesd


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]


def _sublayer_lengths(model, call, sublayer="attn1"):
    """(token counts `sublayer` of each block receives over one call, the call's result)."""
    seen = {}

    def recorder(i):
        return lambda m, a, k: seen.setdefault(i, (a[0] if a else k["hidden_states"]).shape[1]) and None

    handles = [getattr(b, sublayer).register_forward_pre_hook(recorder(i), with_kwargs=True)
               for i, b in enumerate(_blocks(model))]
    with torch.no_grad():
        out = call()
    for h in handles:
        h.remove()
    return seen, out


def _unet_call(unet, arch="sd1", **extra):
    args, kwargs = tiny.unet_inputs(arch)
    return lambda: unet(*args, **kwargs, **extra).sample


# --- attention processors -------------------------------------------------------------------------

class RecordingProcessor:
    """A user's own processor: records the query length, then runs diffusers' SDPA processor."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner, self.lengths = AttnProcessor2_0(), []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.lengths.append(hidden_states.shape[1])
        return self.inner(attn, hidden_states, *args, **kwargs)


def test_any_attention_processor_on_attn1():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    outs = {}
    for name, make in [("classic", AttnProcessor), ("sdpa", AttnProcessor2_0), ("custom", RecordingProcessor)]:
        unet = tiny.unet("sd1")
        procs = {}
        for i, block in enumerate(_blocks(unet)):
            procs[i] = make()
            block.attn1.set_processor(procs[i])
        tomesd.apply_patch(unet, ratio=0.5, seed=1)
        lengths, outs[name] = _sublayer_lengths(unet, _unet_call(unet))
        assert max(lengths.values()) == 128
        if name == "custom":
            assert procs[0].lengths == [128]
    torch.testing.assert_close(outs["classic"], outs["sdpa"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["custom"], outs["sdpa"], rtol=0, atol=0)


# --- IP-Adapter -----------------------------------------------------------------------------------

def _ip_adapter_unet():
    """SD1 tiny UNet with IP-Adapter processors on attn2 and an image projection, as load_ip_adapter sets up."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = tiny.unet("sd1")
    torch.manual_seed(3)
    procs = {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            hidden = unet.config.block_out_channels[0 if "down_blocks.0" in name or "up_blocks.1" in name else -1]
            ip = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=32, num_tokens=(4,), scale=1.0)
            for p in ip.parameters():
                torch.nn.init.normal_(p, std=0.2)
            procs[name] = ip
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=8, cross_attention_dim=32, num_image_text_embeds=4)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    return unet.eval()


def _image_embeds(seed):
    # one [B, 1, D] tensor per adapter (classifier-free batch of 2)
    return {"image_embeds": [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(seed))]}


@pytest.mark.parametrize("merge_crossattn", [False, True])
def test_ip_adapter_on_attn2(merge_crossattn):
    unet = _ip_adapter_unet()
    call_a = _unet_call(unet, added_cond_kwargs=_image_embeds(1))
    call_b = _unet_call(unet, added_cond_kwargs=_image_embeds(2))
    with torch.no_grad():
        want = call_a()
    tomesd.apply_patch(unet, ratio=0.5, seed=1, merge_crossattn=merge_crossattn)
    lengths, a = _sublayer_lengths(unet, call_a, "attn2")
    assert max(lengths.values()) == (128 if merge_crossattn else 256)
    with torch.no_grad():
        b = call_b()
    assert torch.isfinite(a).all() and not torch.allclose(a, want)
    assert not torch.allclose(a, b, atol=1e-4)  # the image prompt still steers the output
    tomesd.remove_patch(unet)
    with torch.no_grad():
        assert torch.equal(call_a(), want)


# --- LoRA -----------------------------------------------------------------------------------------

def test_lora_loaded_and_fused():
    peft = pytest.importorskip("peft")
    unet = tiny.unet("sd1")
    torch.manual_seed(5)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    call = _unet_call(unet)
    with torch.no_grad():
        want = call()
    tomesd.apply_patch(unet, ratio=0.5, seed=2)
    lengths, loaded = _sublayer_lengths(unet, call)
    assert max(lengths.values()) == 128 and not torch.allclose(loaded, want)
    unet.fuse_lora()
    with torch.no_grad():
        fused = call()
    torch.testing.assert_close(fused, loaded, rtol=1e-4, atol=1e-5)
    unet.unfuse_lora()
    tomesd.remove_patch(unet)
    with torch.no_grad():
        torch.testing.assert_close(call(), want, rtol=1e-5, atol=1e-6)


# --- diffusers hooks: caches, offloading, casting -------------------------------------------------

def _pixart_steps(model, steps=(900, 800, 700)):
    """Run a PixArt model at a few timesteps under diffusers' cache context; outputs stacked."""
    kw = tiny.pixart_inputs()
    outs = []
    with torch.no_grad():
        for t in steps:
            call = dict(kw, timestep=torch.tensor([t, t]))
            try:  # what a pipeline does around a CacheMixin denoiser; PixArt's class lacks the mixin
                from diffusers.models.cache_utils import CacheMixin
            except ImportError:
                outs.append(model(**call).sample)
                continue
            with CacheMixin.cache_context(model, "cond_uncond"):
                outs.append(model(**call).sample)
    return torch.stack(outs)


@pytest.mark.parametrize("order", ["cache first", "tomesd first"])
def test_first_block_cache(order):
    hooks = pytest.importorskip("diffusers.hooks")
    if not hasattr(hooks, "apply_first_block_cache"):
        pytest.skip("this diffusers has no first-block cache")
    want_model = tiny.pixart()
    tomesd.apply_patch(want_model, ratio=0.5, seed=3)
    want = _pixart_steps(want_model)
    for threshold, reuses in [(1e-9, False), (1e9, True)]:
        model = tiny.pixart()
        if order == "cache first":
            hooks.apply_first_block_cache(model, hooks.FirstBlockCacheConfig(threshold=threshold))
        tomesd.apply_patch(model, ratio=0.5, seed=3)
        if order == "tomesd first":
            hooks.apply_first_block_cache(model, hooks.FirstBlockCacheConfig(threshold=threshold))
        calls = []
        _blocks(model)[-1].attn1.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[1]), with_kwargs=True)
        got = _pixart_steps(model)
        if reuses:  # steps after the first reuse the cached residual: the last block ran once, merged
            assert calls == [32] and torch.equal(got[0], want[0]) and not torch.equal(got[1:], want[1:])
        else:  # never close enough to reuse: exactly tomesd alone
            assert calls == [32] * 3 and torch.equal(got, want)


@pytest.mark.parametrize("order", ["cache first", "tomesd first"])
def test_attention_output_cache_is_refused_with_a_warning(order, caplog):
    hooks = pytest.importorskip("diffusers.hooks")
    if not hasattr(hooks, "apply_pyramid_attention_broadcast"):
        pytest.skip("this diffusers has no pyramid attention broadcast")
    model = tiny.pixart()
    steps = [None]
    config = hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(0, 1000),
        current_timestep_callback=lambda: steps[0])
    if order == "cache first":
        hooks.apply_pyramid_attention_broadcast(model, config)
    tomesd.apply_patch(model, ratio=0.5, seed=3)
    if order == "tomesd first":
        hooks.apply_pyramid_attention_broadcast(model, config)
    seen = []
    _blocks(model)[0].attn1.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[1]), with_kwargs=True)
    steps[0] = 500
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        _pixart_steps(model, steps=(500,))
    assert seen == [64]  # not merged: a cached output from another step would be unmerged with this step's plan
    assert "attn1 is not merged" in caplog.text and "pyramid_attention_broadcast" in caplog.text


@pytest.mark.parametrize("order", ["offload first", "tomesd first"])
def test_group_offloading(order):
    unet = tiny.unet("sd1")
    if not hasattr(unet, "enable_group_offload"):
        pytest.skip("this diffusers has no group offloading")
    want_unet = tiny.unet("sd1")
    tomesd.apply_patch(want_unet, ratio=0.5, seed=4)
    with torch.no_grad():
        want = _unet_call(want_unet)()
    cpu = torch.device("cpu")
    offload = lambda: unet.enable_group_offload(cpu, offload_device=cpu, offload_type="leaf_level")  # noqa: E731
    if order == "offload first":
        offload()
    tomesd.apply_patch(unet, ratio=0.5, seed=4)
    if order == "tomesd first":
        offload()
    lengths, got = _sublayer_lengths(unet, _unet_call(unet))
    assert max(lengths.values()) == 128 and torch.equal(got, want)


@pytest.mark.parametrize("order", ["casting first", "tomesd first"])
def test_layerwise_casting(order):
    unet = tiny.unet("sd1")
    if not hasattr(unet, "enable_layerwise_casting"):
        pytest.skip("this diffusers has no layerwise casting")
    cast = lambda: unet.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)  # noqa: E731
    if order == "casting first":
        cast()
        with torch.no_grad():
            want = _unet_call(unet)()
    tomesd.apply_patch(unet, ratio=0.5, seed=4)
    if order == "tomesd first":
        cast()
    lengths, got = _sublayer_lengths(unet, _unet_call(unet))
    assert max(lengths.values()) == 128 and torch.isfinite(got).all()
    tomesd.remove_patch(unet)
    if order == "tomesd first":
        with torch.no_grad():
            want = _unet_call(unet)()
    assert not torch.allclose(got, want)
    with torch.no_grad():
        assert torch.equal(_unet_call(unet)(), want)


# --- pipelines ------------------------------------------------------------------------------------

def _generate(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cat", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("order", ["offload first", "tomesd first"])
def test_model_cpu_offload(order, tmp_path):
    pytest.importorskip("accelerate")
    want_pipe = tiny.pipeline("sd1", tmp_path / "a")
    tomesd.apply_patch(want_pipe, ratio=0.5, seed=6)
    want = _generate(want_pipe)
    pipe = tiny.pipeline("sd1", tmp_path / "b")
    if order == "offload first":
        pipe.enable_model_cpu_offload(device="cpu")
    tomesd.apply_patch(pipe, ratio=0.5, seed=6)
    if order == "tomesd first":
        pipe.enable_model_cpu_offload(device="cpu")
    lengths, got = _sublayer_lengths(pipe.unet, lambda: _generate(pipe))
    assert max(lengths.values()) == 512 and np.array_equal(got, want)  # 64 px → 32×32 latent, halved


def _control_image():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))


def test_controlnet_pipeline_and_patching_the_controlnet(tmp_path):
    pipe = tiny.controlnet_pipeline(tmp_path / "tok")
    image = _control_image()
    want = _generate(pipe, image=image)
    tomesd.apply_patch(pipe, ratio=0.5, seed=8)
    assert tomesd.is_patched(pipe.unet) and not tomesd.is_patched(pipe.controlnet)
    cn_lengths, unet_only = _sublayer_lengths(pipe.controlnet, lambda: _generate(pipe, image=image))
    assert max(cn_lengths.values()) == 1024 and not np.array_equal(unet_only, want)  # 32×32 latent
    tomesd.apply_patch(pipe, ratio=0.5, seed=8, patch_controlnet=True)
    assert tomesd.is_patched(pipe.controlnet)
    cn_lengths, both = _sublayer_lengths(pipe.controlnet, lambda: _generate(pipe, image=image))
    assert max(cn_lengths.values()) == 512 and not np.array_equal(both, unet_only)
    tomesd.remove_patch(pipe)
    assert not tomesd.is_patched(pipe.unet) and not tomesd.is_patched(pipe.controlnet)
    assert np.array_equal(_generate(pipe, image=image), want)


def test_patch_controlnet_without_one_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no .controlnet"):
        tomesd.apply_patch(tiny.pipeline("sd1", tmp_path), patch_controlnet=True)

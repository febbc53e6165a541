"""Patched models on a GPU (needs one; skipped without): compiled, captured in a CUDA graph and replayed, and
prop_attn in its head-channel form (SDPA's fused kernels) equal to the mask form, for SD 3 and a UNet."""
import pytest
import torch

import tiny
import tomesd
from cuda_cases import patched_unet as _patched_unet

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_kernels")]


def test_compiled_patched_unet_on_cuda():
    torch._dynamo.reset()
    unet, args, kwargs = _patched_unet()
    with torch.no_grad():
        eager = unet(*args, **kwargs).sample
        out = torch.compile(unet)(*args, **kwargs).sample
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)


def test_cuda_graph_capture_and_replay_of_patched_step():
    unet, args, kwargs = _patched_unet()
    static_args = tuple(a.clone() for a in args)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                unet(*static_args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = unet(*static_args, **kwargs).sample
        new_sample = torch.randn_like(args[0])
        static_args[0].copy_(new_sample)
        graph.replay()
        expected = unet(new_sample, static_args[1], **kwargs).sample
    torch.testing.assert_close(static_out, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prop_attn_channel_form_equals_mask_form_on_cuda(dtype, monkeypatch):
    """MMDiT joint attention on CUDA takes the head-channel form (SDPA's flash kernels): equal to the mask."""
    from tomesd import prop_attention

    assert prop_attention.choose_form("cuda") == "channel"
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", generator=g).to(dtype) for _ in range(3))
    log_size = torch.randint(1, 9, (2, 256), device="cuda", generator=g).float().log()
    mask = prop_attention.prop_attention(q, k, v, log_size, form="mask")
    channel = prop_attention.prop_attention(q, k, v, log_size, form="channel")
    torch.testing.assert_close(channel, mask, rtol=2e-2, atol=2e-2)
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    model = model.to("cuda", dtype)
    inputs = {n: v.to("cuda", dtype) if torch.is_floating_point(v) else v.to("cuda") for n, v in inputs.items()}
    tomesd.apply_patch(model, ratio=0.5, seed=2, mode="kv", prop_attn=True)
    with torch.no_grad():
        got = model(**inputs).sample
        monkeypatch.setattr(prop_attention, "choose_form", lambda device: "mask")
        want = model(**inputs).sample
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("mode", ["tokens", "kv"])
def test_unet_prop_attn_takes_the_channel_form_on_cuda(mode, monkeypatch):
    """A UNet's self-attention on CUDA (torch's SDPA processor) takes prop_attn as the extra head channel,
    equal to the mask form to fp16 rounding."""
    from tomesd import prop_attention

    unet = tiny.unet().to("cuda", torch.float16)
    args, kwargs = tiny.unet_inputs("sd1", dtype=torch.float16)
    args = tuple(a.to("cuda") for a in args)
    kwargs = {n: v.to("cuda") for n, v in kwargs.items()}
    tomesd.apply_patch(unet, ratio=0.5, seed=2, mode=mode, prop_attn=True)
    forms = []
    real = prop_attention.prop_attention
    monkeypatch.setattr(prop_attention, "prop_attention", lambda *a, **k: forms.append(a[5]) or real(*a, **k))
    with torch.no_grad():
        got = unet(*args, **kwargs).sample
        assert forms and set(forms) == {"channel"}
        monkeypatch.setattr(prop_attention, "choose_form", lambda device: "mask")
        want = unet(*args, **kwargs).sample
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)

"""prop_attn's two forms (tomesd.prop_attention): an additive mask, and one extra head channel that keeps
SDPA's fused kernels. Both equal attention written out with + log size on the logits, to float rounding."""
import math

import pytest
import torch
import torch.nn.functional as F

import tiny
import tomesd
from tomesd import prop_attention as pa


def _written_out(q, k, v, log_size, scale):
    if k.shape[1] != q.shape[1]:  # grouped keys / values
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale + log_size.double()[:, None, None, :]
    return torch.softmax(logits, dim=-1) @ v.double()


def _inputs(B=2, H=3, Sq=37, Sk=29, D=40, Dv=None, Hk=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hk or H, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hk or H, Sk, Dv or D, generator=g).to(dtype)
    sizes = torch.randint(1, 9, (B, Sk), generator=g)
    return q, k, v, sizes.float().log()


SHAPES = [dict(), dict(D=64), dict(D=63), dict(D=8, Dv=24), dict(D=40, Dv=3), dict(Sq=1, Sk=1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "base")
@pytest.mark.parametrize("form", pa.FORMS)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_both_forms_equal_attention_written_out(shape, form, scale):
    q, k, v, log_size = _inputs(**shape)
    got = pa.prop_attention(q, k, v, log_size, scale=scale, form=form)
    want = _written_out(q, k, v, log_size, 1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_channel_form_equals_mask_form_to_rounding(dtype, tol):
    q, k, v, log_size = _inputs(D=64, dtype=dtype, seed=3)
    mask = pa.prop_attention(q, k, v, log_size, form="mask")
    channel = pa.prop_attention(q, k, v, log_size, form="channel")
    assert channel.dtype == dtype
    torch.testing.assert_close(channel, mask, rtol=tol, atol=tol)
    plain = F.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(channel, plain, rtol=tol, atol=tol)  # the bias is really applied


def test_grouped_keys_and_extra_arguments_pass_through():
    q, k, v, log_size = _inputs(H=4, Hk=2)
    for form in pa.FORMS:
        got = pa.prop_attention(q, k, v, log_size, form=form, enable_gqa=True, dropout_p=0.0)
        torch.testing.assert_close(got.double(), _written_out(q, k, v, log_size, 1 / math.sqrt(40)), rtol=1e-5,
                                   atol=1e-5)


def test_merged_keys_attend_like_their_members():
    """Proportional attention's point: a key standing for s identical tokens, with + log s, is attended to
    exactly as the s tokens would be (in both forms)."""
    q, k, v, _ = _inputs(B=1, Sk=5)
    counts = torch.tensor([[3, 1, 2, 1, 4]])
    members_k = k.repeat_interleave(counts[0], dim=2)
    members_v = v.repeat_interleave(counts[0], dim=2)
    want = F.scaled_dot_product_attention(q, members_k, members_v)
    for form in pa.FORMS:
        got = pa.prop_attention(q, k, v, counts.float().log(), form=form)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_form_choice_and_validation():
    assert pa.choose_form("cpu") == "mask"
    assert pa.choose_form(torch.device("cuda", 0)) == "channel"
    q, k, v, log_size = _inputs()
    with pytest.raises(ValueError, match="form must be one of"):
        pa.prop_attention(q, k, v, log_size, form="bias")
    with pytest.raises(ValueError, match="adds its own bias"):
        pa.prop_attention(q, k, v, log_size, attn_mask=None)


@pytest.mark.parametrize("kwargs", [dict(prop_attn=True), dict(mode="kv", prop_attn=True)], ids=["tokens", "kv"])
def test_sd3_joint_attention_gives_the_same_output_in_either_form(kwargs, monkeypatch):
    """The MMDiT joint path takes the form choose_form gives: the channel form (CUDA's) equals the mask form."""
    model = tiny.sd3()
    inputs = tiny.sd3_inputs()
    tomesd.apply_patch(model, ratio=0.5, seed=2, **kwargs)
    forms = _spy_forms(monkeypatch)
    with torch.no_grad():
        mask = model(**inputs).sample
        assert set(forms) == {"mask"}
        monkeypatch.setattr(pa, "choose_form", lambda device: "channel")
        channel = model(**inputs).sample
        assert forms.count("channel") == forms.count("mask") > 0
    torch.testing.assert_close(channel, mask, rtol=1e-4, atol=1e-5)
    tomesd.apply_patch(model, ratio=0.5, seed=2, **dict(kwargs, prop_attn=False))
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).sample, mask, rtol=1e-4, atol=1e-5)  # the bias mattered


def _spy_forms(monkeypatch):
    """The form of every prop_attention call from here on (the seam hosts call it through)."""
    forms = []
    real = pa.prop_attention

    def spy(*args, **kwargs):
        forms.append(args[5] if len(args) > 5 else kwargs.get("form", "mask"))
        return real(*args, **kwargs)
    monkeypatch.setattr(pa, "prop_attention", spy)
    return forms


@pytest.mark.parametrize("kwargs", [dict(prop_attn=True), dict(mode="kv", prop_attn=True),
                                    dict(prop_attn=True, merge_mlp=True, match_window=3)],
                         ids=["tokens", "kv", "tokens-mlp-local"])
def test_unet_takes_the_channel_form_where_choose_form_says_so(kwargs, monkeypatch):
    """A UNet's self-attention (torch's SDPA processor) takes prop_attn's bias as the extra head channel
    inside the SDPA call where choose_form gives "channel" (CUDA), as the attention_mask elsewhere:
    the same images either way, and different from prop_attn=False."""
    unet = tiny.unet()
    args, kw = tiny.unet_inputs("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=2, **kwargs)
    forms = _spy_forms(monkeypatch)
    with torch.no_grad():
        mask = unet(*args, **kw).sample
        assert forms == []  # the mask form goes in as the processor's attention_mask
        monkeypatch.setattr(pa, "choose_form", lambda device: "channel")
        channel = unet(*args, **kw).sample
    assert forms and set(forms) == {"channel"}
    torch.testing.assert_close(channel, mask, rtol=1e-4, atol=1e-5)
    tomesd.apply_patch(unet, ratio=0.5, seed=2, **dict(kwargs, prop_attn=False))
    with torch.no_grad():
        assert not torch.allclose(unet(*args, **kw).sample, mask, rtol=1e-4, atol=1e-5)
    tomesd.remove_patch(unet)
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())


def test_unet_with_another_processor_keeps_the_mask_form(monkeypatch):
    """A processor that is not torch's SDPA one (diffusers' AttnProcessor) is not wrapped: the bias goes
    in as its attention_mask even where choose_form gives "channel"."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny.unet()
    unet.set_attn_processor(AttnProcessor())
    args, kw = tiny.unet_inputs("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=2, prop_attn=True)
    with torch.no_grad():
        mask = unet(*args, **kw).sample
        monkeypatch.setattr(pa, "choose_form", lambda device: "channel")
        forms = _spy_forms(monkeypatch)
        channel = unet(*args, **kw).sample
    assert forms == []
    torch.testing.assert_close(channel, mask)

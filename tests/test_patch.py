"""Attaching to diffusers UNets: token counts, exactness against the reference, removal, state, one patch
per block."""
import copy
import logging

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import reference
import tiny
import tomesd
from tomesd.patch import patched_state


def _run(model, arch, batch=2, size=16, dtype=torch.float32):
    args, kwargs = tiny.unet_inputs(arch, batch=batch, size=size, dtype=dtype)
    with torch.no_grad():
        return model(*args, **kwargs).sample


def _recorder(seen: dict, key):
    """A forward pre-hook storing the token count of the module's first input under `key`."""

    def hook(module, args, kwargs):
        seen.setdefault(key, (args[0] if args else kwargs["hidden_states"]).shape[1])

    return hook


def _lengths(model, arch, sublayer=None, **run_kwargs):
    """Token count each transformer block (or its `sublayer`) receives, by block index.

    The hooks are registered after tomesd's, so a sub-layer's count is after merging.
    """
    seen = {}
    blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    handles = [
        (getattr(b, sublayer) if sublayer else b).register_forward_pre_hook(_recorder(seen, i), with_kwargs=True)
        for i, b in enumerate(blocks)
    ]
    _run(model, arch, **run_kwargs)
    for h in handles:
        h.remove()
    return seen


def _attn1_lengths(model, arch, **run_kwargs):
    return _lengths(model, arch, "attn1", **run_kwargs)


@pytest.mark.parametrize(
    "arch,max_downsample,levels",
    [("sd1", None, {256}), ("sd1", 2, {256, 64}), ("sd2", None, {256}), ("sd2", 2, {256, 64}),
     ("sd2", 4, {256, 64, 16}), ("sdxl", None, {64}), ("sdxl", 1, set()), ("sdxl", 4, {64, 16})],
)
def test_token_count_drops_only_at_asked_levels(arch, max_downsample, levels):
    unet = tiny.unet(arch)
    before = _lengths(unet, arch)
    tomesd.apply_patch(unet, ratio=0.5, max_downsample=max_downsample)
    after = _attn1_lengths(unet, arch)
    assert set(after) == set(before)
    for i, n in before.items():
        expected = n - int(n * 0.5) if n in levels else n
        assert after[i] == expected, (i, n, after[i])
    assert any(after[i] < n for i, n in before.items()) == bool(levels)


def test_sdxl_default_reaches_its_first_attention_level():
    unet = tiny.unet("sdxl")
    tomesd.apply_patch(unet)
    assert patched_state(unet).max_downsample == 2
    assert max(_attn1_lengths(unet, "sdxl").values()) == 32  # 8×8 tokens at /2, halved


def _reference_hooks(unet, ratio, sx=2, sy=2, batch=2, size=16):
    """Hooks implementing ToMe with tests/reference.py: metric = block input, merge attn1's input."""
    handles, plan = [], {}

    def block_pre(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        N = x.shape[1]
        plan.clear()
        if N == size * size:
            r = int(N * ratio)
            plan["groups"] = reference.groups(x, size, size, sx, sy, r)

    def attn_pre(module, args, kwargs):
        if plan:
            x = args[0]
            merged, _ = reference.merge_unmerge(x, plan["groups"])
            return (merged.to(x.dtype),) + args[1:], kwargs

    def attn_post(module, args, kwargs, out):
        if plan:
            rows = []
            for b, groups in enumerate(plan["groups"]):
                order = sorted(groups)
                row = torch.empty(size * size, out.shape[-1], dtype=out.dtype)
                for m, keep in enumerate(order):
                    row[groups[keep]] = out[b, m]
                rows.append(row)
            return torch.stack(rows)

    for b in (m for m in unet.modules() if isinstance(m, BasicTransformerBlock)):
        handles.append(b.register_forward_pre_hook(block_pre, with_kwargs=True))
        handles.append(b.attn1.register_forward_pre_hook(attn_pre, with_kwargs=True))
        handles.append(b.attn1.register_forward_hook(attn_post, with_kwargs=True))
    return handles


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
@pytest.mark.parametrize("ratio,sx,sy", [(0.5, 2, 2), (0.3, 1, 2), (0.6, 3, 2)])
def test_unet_output_equals_reference(arch, ratio, sx, sy):
    unet = tiny.unet(arch)
    handles = _reference_hooks(unet, ratio, sx, sy)
    want = _run(unet, arch)
    for h in handles:
        h.remove()
    tomesd.apply_patch(unet, ratio=ratio, sx=sx, sy=sy, use_rand=False)
    got = _run(unet, arch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, _run(tomesd.remove_patch(unet), arch), atol=1e-4)


def test_remove_patch_is_bit_identical_and_state_dict_unchanged():
    unet = tiny.unet("sdxl")
    want = _run(unet, "sdxl")
    state = copy.deepcopy(unet.state_dict())
    hooks_before = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in unet.named_modules()}
    tomesd.apply_patch(unet, ratio=0.6)
    assert tomesd.is_patched(unet)
    assert not torch.equal(_run(unet, "sdxl"), want)
    patched_sd = unet.state_dict()
    assert patched_sd.keys() == state.keys() and all(torch.equal(patched_sd[k], state[k]) for k in state)
    for block in (m for m in unet.modules() if isinstance(m, BasicTransformerBlock)):
        assert type(block) is BasicTransformerBlock and "forward" not in vars(block)
    tomesd.remove_patch(unet)
    assert not tomesd.is_patched(unet)
    assert torch.equal(_run(unet, "sdxl"), want)
    assert {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in unet.named_modules()} == hooks_before
    assert not hasattr(unet, "_tomesd")


def test_reapply_reconfigures():
    a, b = tiny.unet("sd1"), tiny.unet("sd1")
    tomesd.apply_patch(a, ratio=0.6, use_rand=False)
    n_handles = len(patched_state(a).handles)
    tomesd.apply_patch(a, ratio=0.25, use_rand=False)
    tomesd.apply_patch(b, ratio=0.25, use_rand=False)
    assert len(patched_state(a).handles) == n_handles
    assert torch.equal(_run(a, "sd1"), _run(b, "sd1"))


def test_two_models_do_not_interfere():
    a, b = tiny.unet("sd1"), tiny.unet("sd1")
    fresh_a, fresh_b = tiny.unet("sd1"), tiny.unet("sd1")
    tomesd.apply_patch(a, ratio=0.45, sx=1, sy=2, seed=3)
    tomesd.apply_patch(b, ratio=0.2, seed=4)
    tomesd.apply_patch(fresh_a, ratio=0.45, sx=1, sy=2, seed=3)
    tomesd.apply_patch(fresh_b, ratio=0.2, seed=4)
    out_a, out_b = _run(a, "sd1"), _run(b, "sd1")
    assert torch.equal(out_a, _run(fresh_a, "sd1")) and torch.equal(out_b, _run(fresh_b, "sd1"))
    assert not torch.equal(out_a, out_b)


def test_to_dtype_after_patching():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5)
    unet.to(torch.bfloat16)
    out = _run(unet, "sd1", dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert max(_attn1_lengths(unet, "sd1", dtype=torch.bfloat16).values()) == 128


def test_ratio_by_resolution_mapping_and_callable():
    unet = tiny.unet("sd1")
    # A 16×16 latent is a 128 px image: the table maps 128 px → 0.25, 256 px → 0.5, 192 px → 0.375.
    tomesd.apply_patch(unet, ratio={128: 0.25, 256: 0.5})
    assert max(_attn1_lengths(unet, "sd1", size=16).values()) == 256 - 64
    assert max(_attn1_lengths(unet, "sd1", size=32).values()) == 1024 - 512
    assert max(_attn1_lengths(unet, "sd1", size=24).values()) == 576 - int(576 * 0.375)
    assert max(_attn1_lengths(unet, "sd1", size=8).values()) == 64 - 16  # clamped below the first key
    calls = []
    tomesd.apply_patch(unet, ratio=lambda h, w: calls.append((h, w)) or 0.5)
    _run(unet, "sd1", size=16)
    assert calls == [(128, 128)]
    levels = []
    tomesd.apply_patch(unet, ratio=lambda h, w, downsample: levels.append(downsample) or 0.25 * downsample, max_downsample=2)
    lengths = _attn1_lengths(unet, "sd1")
    assert sorted(set(levels)) == [1, 2] and sorted(set(lengths.values())) == [32, 192]


def test_callable_result_is_checked_at_each_call():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=lambda h, w: 0.9)
    with pytest.raises(ValueError, match=r"ratio\(128, 128\) must be in \[0, 0.75\]"):
        _run(unet, "sd1")


def test_self_attention_mask_skips_block_with_one_warning(caplog):
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8,
                               cross_attention_dim=8, num_layers=2).eval()
    x = torch.randn(2, 16, 8, 8)
    text = torch.randn(2, 3, 8)
    mask = torch.ones(2, 64)
    mask[:, -5:] = 0
    with torch.no_grad():
        want = model(x, encoder_hidden_states=text, attention_mask=mask).sample
        plain = model(x, encoder_hidden_states=text).sample
        tomesd.apply_patch(model, ratio=0.5)
        with caplog.at_level(logging.WARNING, logger="tomesd"):
            got = model(x, encoder_hidden_states=text, attention_mask=mask).sample
            model(x, encoder_hidden_states=text, attention_mask=mask)
        merged = model(x, encoder_hidden_states=text).sample
    assert torch.equal(got, want)
    assert sum("mask" in r.getMessage() for r in caplog.records) == 1
    assert not torch.equal(merged, plain)


def test_extra_block_arguments_pass_through():
    unet = tiny.unet("sdxl")
    tomesd.apply_patch(unet, ratio=0.5, use_rand=False)
    args, kwargs = tiny.unet_inputs("sdxl")
    seen = []
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    block.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
    with torch.no_grad():
        unet(*args, cross_attention_kwargs={}, **kwargs)
    assert seen and "encoder_hidden_states" in seen[0] and seen[0]["cross_attention_kwargs"] == {}


def test_merge_crossattn_and_mlp():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, merge_attn=False, merge_crossattn=True, merge_mlp=True)
    seen = {}
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    for name in ("attn1", "attn2", "ff"):
        getattr(block, name).register_forward_pre_hook(_recorder(seen, name), with_kwargs=True)
    out = _run(unet, "sd1")
    assert seen == {"attn1": 256, "attn2": 128, "ff": 128} and torch.isfinite(out).all()


def test_zero_ratio_is_exact():
    unet = tiny.unet("sd1")
    want = _run(unet, "sd1")
    tomesd.apply_patch(unet, ratio=0.0)
    assert torch.equal(_run(unet, "sd1"), want)


def test_one_patch_per_block():
    unet = tiny.unet("sd1")
    inner = unet.down_blocks[0].attentions[0]
    block = inner.transformer_blocks[0]
    counts = len(block._forward_pre_hooks), len(block.attn1._forward_pre_hooks)
    tomesd.apply_patch(inner, ratio=0.5)
    tomesd.apply_patch(unet, ratio=0.5)  # the parent's patch replaces the child's
    assert not tomesd.is_patched(inner) and tomesd.is_patched(unet)
    assert (len(block._forward_pre_hooks), len(block.attn1._forward_pre_hooks)) == (counts[0] + 1, counts[1] + 1)
    with pytest.raises(ValueError, match="remove_patch it first"):
        tomesd.apply_patch(inner, ratio=0.5)
    tomesd.remove_patch(unet)
    tomesd.apply_patch(inner, ratio=0.5)
    assert tomesd.is_patched(inner)

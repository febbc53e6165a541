"""SD 3 / 3.5 and Flux (MMDiT): only image tokens merge, tokens and kv modes, Flux's rotary refusal,
ratios, seeds, removal, gradients with checkpointing, compile, and the pipelines after a save/load."""
import inspect
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import tiny
import tomesd
from tomesd.patch import patched_state


def _flux_single_blocks_split() -> bool:
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    return "encoder_hidden_states" in inspect.signature(FluxSingleTransformerBlock.forward).parameters


# Older diffusers (0.32) hand Flux's single-stream blocks the concatenated text + image sequence, which is
# no token grid: those blocks are not merged there (logged), so exact counts of merged calls differ.
needs_split_single_blocks = pytest.mark.skipif(not _flux_single_blocks_split(),
                                               reason="this diffusers' Flux single-stream blocks take text + image "
                                                      "concatenated; they are not merged")


class KeyLengths(TorchFunctionMode):
    """Records (query length, key length) of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = (args[0], args[1]) if len(args) > 1 else (kwargs["query"], kwargs["key"])
            self.seen.append((q.shape[2], k.shape[2]))
        return func(*args, **kwargs)


def _run(model, inputs, record=False):
    with torch.no_grad():
        if not record:
            return model(**inputs).sample
        with KeyLengths() as lengths:
            model(**inputs)
        return lengths.seen


def _hidden_lengths(model, name):
    """hidden_states lengths seen by sub-layer `name` of every block."""
    seen = []
    for block in patched_state(model).host.blocks:
        sub = getattr(block, name, None)
        if sub is not None:
            sub.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]),
                                          with_kwargs=True)
    return seen


# SD 3 ----------------------------------------------------------------------------------------------

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

    def grads():
        model.zero_grad(set_to_none=True)
        sum(model(**tiny.sd3_inputs(seed=s)).sample.square().mean() for s in (1, 2)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads()
    model.enable_gradient_checkpointing()
    got = grads()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(), dict(mode="kv")])
def test_sd3_compiles_fullgraph(kwargs):
    torch._dynamo.reset()
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    tomesd.apply_patch(model, ratio=0.5, seed=1, **kwargs)
    eager = _run(model, inputs)
    torch.testing.assert_close(_run(torch.compile(model, fullgraph=True), inputs), eager, rtol=1e-4, atol=1e-4)


# Flux ----------------------------------------------------------------------------------------------

@needs_split_single_blocks
def test_flux_default_is_kv_and_tokens_mode_is_refused():
    model, inputs = tiny.flux(), tiny.flux_inputs()
    want = _run(model, inputs)
    plain = _run(model, inputs, record=True)
    assert set(plain) == {(5 + 64, 5 + 64)}  # double- and single-stream blocks: text then image
    with pytest.raises(ValueError, match="rotary position embeddings"):
        tomesd.apply_patch(model, mode="tokens")
    assert not tomesd.is_patched(model)
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

    def grads():
        model.zero_grad(set_to_none=True)
        model(**tiny.flux_inputs()).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    got = grads()
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_kv_needs_torch_sdpa(monkeypatch):
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    tomesd.apply_patch(model, ratio=0.5, mode="kv")
    from diffusers.models import attention_processor

    def sdpa_elsewhere(q, k, v, *args, **kwargs):  # an attention kernel that is not torch's SDPA
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v

    monkeypatch.setattr(attention_processor.F, "scaled_dot_product_attention", sdpa_elsewhere)
    with pytest.raises(RuntimeError, match="native attention backend"):
        _run(model, inputs)


# Pipelines -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd3", pytest.param("flux", marks=needs_split_single_blocks)])
def test_pipelines_after_save_and_load(kind, tmp_path, caplog):
    from diffusers import DiffusionPipeline

    tiny.mmdit_pipeline(kind, tmp_path / "tok").save_pretrained(tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a cat", height=32, width=48, num_inference_steps=2, output_type="pt", max_sequence_length=16)

    def images():
        return pipe(generator=torch.Generator().manual_seed(0), **call).images

    want = images()
    tomesd.apply_patch(pipe, ratio=0.5)
    assert tomesd.is_patched(pipe) and tomesd.is_patched(pipe.transformer)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        got = images()
    ours = [r.getMessage() for r in caplog.records if r.name == "tomesd"]
    assert not ours, ours
    assert got.shape == want.shape == (1, 3, 32, 48) and not torch.equal(got, want)
    tomesd.remove_patch(pipe)
    assert torch.equal(images(), want)


@pytest.mark.parametrize("image_first", [True, False])
@pytest.mark.parametrize("merge_kv", [True, False])
def test_joint_sdpa_merges_the_image_keys_and_biases_their_logits(image_first, merge_kv):
    """Against attention written out: softmax(q·k/√d + log size) over [merged image keys, text keys]."""
    from tomesd.matching import build_plan, merge, partition
    from tomesd.patch.hosts.sdpa import joint_attention

    g = torch.Generator().manual_seed(0)
    B, H, N, T, D = 2, 2, 16, 3, 8
    tokens = torch.randn(B, N, H * D, generator=g)
    dst, src = partition(4, 4, 2, 2, None, "cpu")
    plan = build_plan(tokens, dst, src, 7)
    n = N if merge_kv else plan.num_out
    q = torch.randn(B, H, n + T, D, generator=g)
    k, v = torch.randn(B, H, n + T, D, generator=g), torch.randn(B, H, n + T, D, generator=g)
    img = slice(0, n) if image_first else slice(T, T + n)
    txt = slice(n, n + T) if image_first else slice(0, T)

    def heads(t):
        if not merge_kv:
            return t
        return merge(t.transpose(1, 2).reshape(B, N, H * D), plan).view(B, -1, H, D).transpose(1, 2)

    k_img, v_img = heads(k[:, :, img]), heads(v[:, :, img])
    logits = torch.cat([q @ k_img.transpose(-1, -2) / D ** 0.5 + plan.counts.float().log()[:, None, None, :],
                        q @ k[:, :, txt].transpose(-1, -2) / D ** 0.5], dim=-1)
    want = torch.softmax(logits, dim=-1) @ torch.cat([v_img, v[:, :, txt]], dim=2)
    got = joint_attention(F.scaled_dot_product_attention, q, k, v, plan, merge_kv, True, image_first)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generate_highres_example_runs_mmdit_pipelines(kind, tmp_path, capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "generate_highres.py")
    spec = importlib.util.spec_from_file_location("generate_highres_mmdit", path)
    highres = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(highres)
    tiny.mmdit_pipeline(kind, tmp_path / "tok").save_pretrained(tmp_path / "pipe")
    out = tmp_path / "img.png"
    assert highres.main(["--model", str(tmp_path / "pipe"), "--prompt", "a cat", "--height", "64", "--width", "64",
                         "--steps", "2", "--ratio", "64:0.5", "--out", str(out)]) in (0, None)
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    assert "ratio 0.5" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_bench_runs_the_mmdit_architectures(arch, tmp_path):
    from tomesd import bench
    from tomesd.tools import archs

    cfg = bench.default_config("cpu", arch=arch, layers=1, resolutions=(64,), ratios=(0.5,), steps=1, warmup=0,
                               isolate=False)
    assert bench.denoiser_batch(cfg) == (1 if arch == "flux" else 2)
    result = bench.run(cfg, progress=False)
    rows = {r["method"]: r for r in result.rows}
    assert rows.keys() == {"baseline", "tome"} and all(r["status"] == "ok" for r in rows.values())
    assert "cut to 1 block(s)" in result.env["arch"] and archs.TRANSFORMER_ARCHS[arch].description in result.env["arch"]
    with pytest.raises(ValueError, match="layers must be"):
        bench.default_config("cpu", arch="sd15", layers=2)


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


# Flux img_ids layouts, positional img_ids, ControlNets (issue 22 items 4-6, issue 17 items 2, 10, 11) ----

@pytest.fixture
def builds(monkeypatch):
    """(h, w, r, tail, num_in, num_out) of every plan built: what merged, and on which grid."""
    from tomesd.patch.plans import PlanProvider

    seen = []
    build = PlanProvider.build

    def counted(self, request):
        plan = build(self, request)
        seen.append((request.h, request.w, request.r, request.tail, plan.num_in, plan.num_out))
        return plan

    monkeypatch.setattr(PlanProvider, "build", counted)
    return seen


def test_flux_ids_layouts():
    from tomesd.patch.hosts.mmdit import ids_layout

    g = tiny.grid_ids
    assert ids_layout(g(4, 8)) == (4, 8, 0)
    assert ids_layout(g(4, 8)[None]) == (4, 8, 0)  # deprecated batched ids
    assert ids_layout(torch.cat([g(4, 8), g(8, 4, first=1)])) == (4, 8, 32)  # Kontext, swapped aspect
    assert ids_layout(torch.cat([g(4, 8), g(8, 4)])) == (4, 8, 32)  # bounding box 8×8 would be a made-up grid
    assert ids_layout(torch.cat([g(4, 4), g(4, 4, col0=4)])) == (4, 4, 16)  # a reference beside the image
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
    from tomesd.patch.plans import with_tail

    base = matching.build_plan(torch.randn(1, 16, 4), *matching.partition(4, 4, 2, 2, None, "cpu"), 6)
    extended = with_tail(base, 3)
    x = torch.randn(1, 19, 4)
    merged = matching.merge(x, extended)
    assert torch.equal(merged[:, base.num_out:], x[:, 16:])  # reference tokens pass through exactly
    assert torch.equal(matching.unmerge(merged, extended)[:, 16:], x[:, 16:])


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


@pytest.mark.parametrize("kind", ["sd3", pytest.param("flux", marks=needs_split_single_blocks)])
def test_mmdit_controlnets_merge(kind, builds):
    net = getattr(tiny, kind + "_controlnet")()
    if kind == "sd3":
        inputs = dict(tiny.sd3_inputs(), controlnet_cond=torch.randn(2, 4, 16, 16))
    else:
        inputs = dict(tiny.flux_inputs(), controlnet_cond=torch.randn(2, 64, 16))
    with torch.no_grad():
        want = net(**inputs)[0][0]
    tomesd.apply_patch(net, ratio=0.5)
    with torch.no_grad():
        got = net(**inputs)[0][0]
    assert len(builds) == len(patched_state(net).host.blocks) > 0 and not torch.equal(got, want)
    tomesd.remove_patch(net)
    with torch.no_grad():
        assert torch.equal(net(**inputs)[0][0], want)

    class Pipeline:  # a pipeline's transformer and controlnet (patch_controlnet=True)
        transformer = getattr(tiny, kind)()
        controlnet = net

    pipe = Pipeline()
    tomesd.apply_patch(pipe, ratio=0.5, patch_controlnet=True)
    assert tomesd.is_patched(pipe.transformer) and tomesd.is_patched(pipe.controlnet)


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

"""Merging modes and plan options: kv mode, proportional attention, shared plans, reused plans, and
timestep-aware ratios. The default (tokens mode) is tomesd 0.1.3's and is tested elsewhere."""
import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import Transformer2DModel
from diffusers.models.attention import BasicTransformerBlock

import ldm_like
import tiny
import tomesd
from tiny import run as _run


def _attn1_inputs(model):
    """Per attn1 call: (query tokens, key/value tokens)."""
    seen = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        kv = kwargs.get("encoder_hidden_states")
        seen.append((x.shape[1], (kv if kv is not None else x).shape[1]))

    for b in (m for m in model.modules() if isinstance(m, BasicTransformerBlock)):
        b.attn1.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _duplicated_model_and_input(num_layers=2):
    """A Transformer2DModel and a latent whose every 2×2 cell holds four identical tokens: merging
    within cells is lossless, so exact attention over the merged tokens must give the plain output."""
    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8,
                               cross_attention_dim=8, num_layers=num_layers).eval()
    x = F.interpolate(torch.randn(2, 16, 8, 8), scale_factor=2, mode="nearest")
    return model, x, torch.randn(2, 3, 8)


# kv mode ----------------------------------------------------------------------------------------

def test_kv_mode_keeps_all_queries_and_merges_keys_values():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, mode="kv")
    seen = _attn1_inputs(unet)
    out = _run(unet)
    assert (256, 128) in seen and all(q == kv or (q, kv) == (256, 128) for q, kv in seen)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_kv_mode_with_crossattn_and_mlp_merges_those_as_tokens():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, mode="kv", merge_crossattn=True, merge_mlp=True)
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    seen = {}
    for name in ("attn2", "ff"):
        getattr(block, name).register_forward_pre_hook(
            lambda m, a, k, name=name: seen.setdefault(name, (a[0] if a else k["hidden_states"]).shape[1]) and None,
            with_kwargs=True)
    out = _run(unet)
    assert seen == {"attn2": 128, "ff": 128} and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["kv", "tokens"])
def test_proportional_attention_is_exact_for_duplicated_tokens(mode):
    model, x, text = _duplicated_model_and_input()
    with torch.no_grad():
        want = model(x, encoder_hidden_states=text).sample
        # ratio 0.5: some cells merge whole, others in part, so merged keys stand for 1 to 4 tokens
        tomesd.apply_patch(model, ratio=0.5, mode=mode, prop_attn=True, use_rand=False)
        exact = model(x, encoder_hidden_states=text).sample
        tomesd.apply_patch(model, ratio=0.5, mode=mode, prop_attn=False, use_rand=False)
        plain = model(x, encoder_hidden_states=text).sample
    torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, want, rtol=1e-4, atol=1e-5)  # without the size bias it is not exact


@pytest.mark.parametrize("mode", ["kv", "tokens"])
@pytest.mark.parametrize("options", [dict(share_plan=True), dict(merge_mlp=True), dict(plan_every=2),
                                     dict(share_plan=True, merge_mlp=True, plan_every=2)])
def test_proportional_attention_stays_exact_with_plan_options(mode, options):
    """Shared and reused plans carry their group sizes: three blocks, the later ones on the first's plan
    (share_plan) or on the previous call's (plan_every), stay exact on duplicated tokens."""
    model, x, text = _duplicated_model_and_input(num_layers=3)
    with torch.no_grad():
        want = model(x, encoder_hidden_states=text).sample
        tomesd.apply_patch(model, ratio=0.5, mode=mode, prop_attn=True, use_rand=False, **options)
        for _ in range(2):  # the second call reuses the first's plans under plan_every=2
            torch.testing.assert_close(model(x, encoder_hidden_states=text).sample, want, rtol=1e-4, atol=1e-5)


def test_prop_attn_defaults_follow_the_mode():
    """A prop_attn left to follow the mode is resolved when patching: on in kv mode (where the attention
    takes a bias), off in tokens mode and without merge_attn; given values are kept."""
    unet = tiny.unet("sd1")
    for kwargs, want in [(dict(), False), (dict(mode="tokens"), False), (dict(mode="kv"), True),
                         (dict(mode="kv", merge_attn=False, merge_mlp=True), False), (dict(mode="kv", prop_attn=False), False),
                         (dict(mode="tokens", prop_attn=True), True)]:
        tomesd.apply_patch(unet, **kwargs)
        config = tomesd.patch.patched_state(unet).config
        assert config.prop_attn is want and config.mode == kwargs.get("mode", "tokens"), kwargs
    assert tomesd.ToMeConfig(mode="kv").prop_attn is None  # not resolved before patching


def test_a_refused_setting_leaves_the_patch_in_place():
    """Every refusal comes before anything changes: a bad mode or a refused option on a patched model
    keeps its patch and configuration."""
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.3)
    for bad in (dict(mode="fast"), dict(merge_crossattn=True, mode="nope")):
        with pytest.raises(ValueError, match="mode must be one of"):
            tomesd.apply_patch(unet, **bad)
        assert tomesd.patch.patched_state(unet).config.ratio == 0.3


def test_kv_mode_ratio_zero_and_removal_are_bit_exact():
    unet = tiny.unet("sd1")
    want = _run(unet)
    tomesd.apply_patch(unet, ratio=0.0, mode="kv")
    assert torch.equal(_run(unet), want)
    tomesd.apply_patch(unet, ratio=0.6, mode="kv", share_plan=True, plan_every=2)
    assert not torch.equal(_run(unet), want)
    tomesd.remove_patch(unet)
    assert torch.equal(_run(unet), want)


def test_kv_mode_refuses_fused_qkv_projections():
    unet = tiny.unet("sd1")
    unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        tomesd.apply_patch(unet, mode="kv")
    tomesd.apply_patch(unet, mode="tokens")  # tokens mode does not care
    assert torch.isfinite(_run(unet)).all()
    tomesd.remove_patch(unet)
    unet.unfuse_qkv_projections()
    tomesd.apply_patch(unet, mode="kv")
    assert torch.isfinite(_run(unet)).all()


def test_kv_mode_on_ldm_models(caplog):
    torch.manual_seed(0)
    model = ldm_like.LatentDiffusion().eval()
    unet = model.model.diffusion_model
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 3, 8)
    with torch.no_grad():
        want = unet(x, t, context)
        with pytest.raises(ValueError, match="prop_attn=False"):  # asked for, and LDM attention takes no bias
            tomesd.apply_patch(model, mode="kv", prop_attn=True)
        with caplog.at_level(logging.INFO, logger="tomesd"):
            tomesd.apply_patch(model, ratio=0.5, mode="kv")  # prop_attn left to follow the mode: off, said
        assert "prop_attn is off" in caplog.text and tomesd.patch.patched_state(model).config.prop_attn is False
        tomesd.apply_patch(model, ratio=0.5, mode="kv", prop_attn=False)
        keys = []
        unet.input_blocks[1][0].transformer_blocks[0].attn1.register_forward_pre_hook(
            lambda m, a, k: keys.append(k["context"].shape[1]), with_kwargs=True)
        out = unet(x, t, context)
    assert keys == [32] and out.shape == want.shape and not torch.equal(out, want)


@pytest.mark.parametrize("kwargs", [dict(mode="fast"), dict(prop_attn="yes"), dict(plan_every=0),
                                    dict(plan_every=1.5), dict(share_plan=None), dict(mode="kv", prop_attn=True,
                                                                                      merge_attn=False)])
def test_bad_mode_options_fail_in_apply_patch(kwargs):
    with pytest.raises((TypeError, ValueError)):
        tomesd.apply_patch(tiny.unet("sd1"), **kwargs)


# shared and reused plans ----------------------------------------------------------------------------

def test_share_plan_builds_one_plan_per_level_per_call(plan_builds):
    unet = tiny.unet("sd2")
    tomesd.apply_patch(unet, ratio=0.5, max_downsample=2, share_plan=True)
    seen = _attn1_inputs(unet)
    _run(unet, "sd2")
    assert sorted(plan_builds) == [64, 256]  # one per level, though each level has several blocks
    assert sorted(set(q for q, _ in seen)) == [16, 32, 128]  # /1 and /2 merged, /4 (16 tokens) not
    tomesd.apply_patch(unet, ratio=0.5, max_downsample=2)
    plan_builds.clear()
    _run(unet, "sd2")
    assert len(plan_builds) > 2


def test_plan_every_reuses_plans_between_rebuilds(plan_builds):
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, plan_every=3, seed=1)
    per_call = []
    outs = []
    for i, size in enumerate([16, 16, 16, 16, 12, 12]):
        plan_builds.clear()
        outs.append(_run(unet, size=size, timestep=900 - 100 * i))
        per_call.append(len(plan_builds))
    blocks = per_call[0]
    assert blocks > 0
    # call 0 builds; 1, 2 reuse; 3 rebuilds (every 3rd); 4 has another size: rebuilds; 5 reuses
    assert per_call == [blocks, 0, 0, blocks, blocks, 0]
    fresh = tiny.unet("sd1")
    tomesd.apply_patch(fresh, ratio=0.5, seed=1)
    assert torch.equal(outs[0], _run(fresh, size=16, timestep=900))
    assert not torch.equal(outs[1], _run(fresh, size=16, timestep=800))  # reused, not rebuilt


def test_plan_every_composes_with_share_plan(plan_builds):
    unet = tiny.unet("sd2")
    tomesd.apply_patch(unet, ratio=0.5, max_downsample=2, share_plan=True, plan_every=2)
    counts = []
    for _ in range(4):
        plan_builds.clear()
        _run(unet, "sd2")
        counts.append(len(plan_builds))
    assert counts == [2, 0, 2, 0]


def test_plan_every_identical_pipeline_calls_give_identical_images(tmp_path):
    pipe = tiny.pipeline("sd1", tmp_path)
    pipe.set_progress_bar_config(disable=True)
    tomesd.apply_patch(pipe, ratio=0.5, plan_every=2, seed=3)

    def image():
        return pipe("a cat", num_inference_steps=3, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    first, second = image(), image()
    assert torch.equal(first, second)


def test_plan_every_a_run_stopped_between_steps_does_not_shift_the_next(tmp_path):
    """A pipeline call stopped after step 0 (its step callback raises) leaves plans kept at a timestep the
    next call starts at again; the next pipeline call still starts a new run (the pipeline's scheduler is
    set up again), so identical calls after it give the image of an undisturbed call. Also with a
    scheduler set on the pipeline after patching."""
    pipe = tiny.pipeline("sd1", tmp_path)
    pipe.set_progress_bar_config(disable=True)
    tomesd.apply_patch(pipe, ratio=0.5, plan_every=2, seed=3)

    def image(**kwargs):
        return pipe("a cat", num_inference_steps=4, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    def stop(pipeline, step, timestep, tensors):
        raise KeyboardInterrupt("stopped by the user")

    for _ in range(2):
        want = image()
        with pytest.raises(KeyboardInterrupt):
            image(callback_on_step_end=stop)
        assert torch.equal(image(), want) and torch.equal(image(), want)
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)


def test_plan_every_new_run_when_the_timestep_goes_up(plan_builds):
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, plan_every=4, seed=1)
    per_call = []
    for t in (900, 600, 300, 900, 600):  # a 3-step run, then a new run: rebuild at its first call
        plan_builds.clear()
        _run(unet, timestep=t)
        per_call.append(len(plan_builds))
    blocks = per_call[0]
    assert blocks > 0 and per_call == [blocks, 0, 0, blocks, 0]


def test_plan_every_drops_kept_plans_after_a_failed_call(plan_builds):
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, plan_every=4, seed=1)
    _run(unet, timestep=900)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    handle = block.ff.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        _run(unet, timestep=800)
    handle.remove()
    plan_builds.clear()
    _run(unet, timestep=700)  # same run by its timestep, but the failed call dropped the kept plans
    assert len(plan_builds) > 0


# timestep-aware ratio ------------------------------------------------------------------------------

def test_ratio_callable_with_timestep_stops_merging_late():
    unet = tiny.unet("sd1")
    want_late = _run(unet, timestep=100)
    seen = []
    tomesd.apply_patch(unet, ratio=lambda h, w, timestep: seen.append(timestep) or (0.6 if timestep > 200 else 0.0))
    early = _run(unet, timestep=900)
    late = _run(unet, timestep=100)
    assert seen == [900.0, 100.0]
    assert torch.equal(late, want_late) and not torch.equal(early, _run(tomesd.remove_patch(unet), timestep=900))


def test_timestep_ratio_with_differing_per_sample_timesteps_is_refused():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=lambda h, w, timestep: 0.5 if timestep > 500 else 0.0)
    _run(unet, timestep=torch.tensor([900, 900]))  # equal per-sample timesteps are fine
    for t in ([100, 900], [900, 100]):
        with pytest.raises(ValueError, match="different timesteps"):
            _run(unet, timestep=torch.tensor(t))


# training and compile with the options ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(mode="kv"), dict(share_plan=True, merge_mlp=True),
                                    dict(mode="kv", plan_every=2)])
def test_checkpoint_recompute_replays_the_forward_plans(kwargs):
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=3, **kwargs)

    def grads():
        unet.zero_grad(set_to_none=True)
        args, kw = tiny.unet_inputs("sd1", size=8, seed=5)
        x = args[0]
        for i in range(4):
            x = x - 0.1 * unet(x, torch.tensor(900 - 100 * i), **kw).sample
        x.square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    want = grads()
    unet.enable_gradient_checkpointing()
    got = grads()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [dict(mode="kv"), dict(mode="tokens", prop_attn=True, share_plan=True)])
def test_options_compile_fullgraph(kwargs):
    torch._dynamo.reset()
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=2, **kwargs)
    eager = _run(unet)
    compiled = torch.compile(unet, fullgraph=True)
    torch.testing.assert_close(_run(compiled), eager, rtol=1e-4, atol=1e-4)


def test_plan_every_under_compile_is_a_clear_error():
    torch._dynamo.reset()
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, plan_every=2)
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="plan_every > 1"):
        _run(compiled)


@pytest.mark.slow
def test_plan_every_under_compile_without_fullgraph_equals_eager(plan_builds):
    """README: without fullgraph, the hooks that keep plans run between graphs (graph breaks): the
    compiled model reuses plans exactly as the eager one does."""
    torch._dynamo.reset()
    eager, unet = tiny.unet("sd1"), tiny.unet("sd1")
    for model in (eager, unet):
        tomesd.apply_patch(model, ratio=0.5, plan_every=2, seed=0)
    compiled = torch.compile(unet, backend="eager")
    counts = {"eager": [], "compiled": []}
    for t in (900, 700, 500):
        for name, model in (("eager", eager), ("compiled", compiled)):
            plan_builds.clear()
            out = _run(model, timestep=t)
            counts[name].append(len(plan_builds))
            if name == "eager":
                want = out
        torch.testing.assert_close(out, want)
    blocks = counts["eager"][0]
    assert blocks > 0 and counts["eager"] == counts["compiled"] == [blocks, 0, blocks]


@pytest.mark.slow
def test_timestep_ratio_compiles_with_graph_breaks_and_equals_eager():
    torch._dynamo.reset()
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=lambda h, w, timestep: 0.5 if timestep > 200 else 0.0, seed=0)
    compiled = torch.compile(unet, backend="eager")
    for t in (900, 100):
        torch.testing.assert_close(_run(compiled, timestep=t), _run(unet, timestep=t))

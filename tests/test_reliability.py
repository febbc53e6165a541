"""Nothing silently wrong, second round (issue 17): plan reuse stays within a sampling run, per-sample
timesteps, what is not merged is said, only_cross_attention with prop_attn, copies of patched models,
compile with timestep ratios and plan_every, patching while another thread is inside a call."""
import copy
import io
import logging
import pickle
import threading

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import ldm_like
import tiny
import tomesd
from tomesd.patch import patched_state


def _run(model, arch="sd1", size=16, batch=2, timestep=500, seed=1):
    args, kwargs = tiny.unet_inputs(arch, size=size, batch=batch, seed=seed)
    with torch.no_grad():
        return model(args[0], torch.as_tensor(timestep), **kwargs).sample


# 1. plan_every keeps plans within one sampling run ------------------------------------------------------


def test_plan_every_identical_pipeline_calls_give_identical_images(tmp_path):
    pipe = tiny.pipeline("sd1", tmp_path)
    pipe.set_progress_bar_config(disable=True)
    tomesd.apply_patch(pipe, ratio=0.5, plan_every=2, seed=3)

    def image():
        return pipe("a cat", num_inference_steps=3, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    first, second = image(), image()
    assert torch.equal(first, second)


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


# 3. per-sample timesteps and one timestep scale ---------------------------------------------------------


def test_timestep_ratio_with_differing_per_sample_timesteps_is_refused():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=lambda h, w, timestep: 0.5 if timestep > 500 else 0.0)
    _run(unet, timestep=torch.tensor([900, 900]))  # equal per-sample timesteps are fine
    for t in ([100, 900], [900, 100]):
        with pytest.raises(ValueError, match="different timesteps"):
            _run(unet, timestep=torch.tensor(t))


def test_flux_timestep_ratio_sees_the_0_1000_scale():
    model = tiny.flux()
    seen = []
    tomesd.apply_patch(model, ratio=lambda h, w, timestep: seen.append(timestep) or 0.5, seed=0)
    kwargs = tiny.flux_inputs(batch=1)
    kwargs["timestep"] = torch.tensor([0.25])  # the pipeline passes t / 1000
    with torch.no_grad():
        model(**kwargs)
    assert seen and seen[0] == pytest.approx(250.0)


# 4. what is not merged is said ---------------------------------------------------------------------------


def test_all_sublayer_flags_off_is_said(caplog):
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        tomesd.apply_patch(tiny.unet("sd1"), merge_attn=False)
    assert "all False" in caplog.text


def test_merge_crossattn_on_a_model_without_cross_attention_is_refused():
    with pytest.raises(ValueError, match="merge_crossattn=True"):
        tomesd.apply_patch(tiny.sd3(), merge_crossattn=True)


def test_ratio_that_merges_no_token_is_said(caplog):
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.001)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        out = _run(unet)
    assert "nothing is merged there" in caplog.text
    tomesd.remove_patch(unet)
    assert torch.equal(out, _run(unet))


# 5. only_cross_attention blocks with prop_attn ----------------------------------------------------------


def test_only_cross_attention_blocks_merge_with_prop_attn(caplog):
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8,
                               cross_attention_dim=12, only_cross_attention=True).eval()
    x, text = torch.randn(2, 16, 8, 8), torch.randn(2, 7, 12)
    with torch.no_grad():
        want = model(x, encoder_hidden_states=text).sample
        tomesd.apply_patch(model, ratio=0.5, prop_attn=True, seed=0)
        with caplog.at_level(logging.WARNING, logger="tomesd"):
            got = model(x, encoder_hidden_states=text).sample
    assert got.shape == want.shape and torch.isfinite(got).all() and not torch.equal(got, want)
    assert "only_cross_attention" in caplog.text


# 6. copies of a patched model ----------------------------------------------------------------------------


def _copies(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]


def test_copies_of_a_patched_unet_compute_what_it_computes():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=1)
    want = _run(unet)
    plain = tiny.unet("sd1")
    for twin in _copies(unet):
        assert tomesd.is_patched(twin) and torch.equal(_run(twin), want)
        tomesd.remove_patch(twin)  # the copy's patch is its own
        assert torch.equal(_run(twin), _run(plain)) and tomesd.is_patched(unet)
    assert torch.equal(_run(unet), want)


def test_copies_of_a_patched_ldm_model_use_their_own_weights():
    torch.manual_seed(0)
    model = ldm_like.LatentDiffusion().eval()
    tomesd.apply_patch(model, ratio=0.5, seed=0)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 3, 8)
    with torch.no_grad():
        twin = copy.deepcopy(model)
        block = twin.model.diffusion_model.input_blocks[1][0].transformer_blocks[0]
        out = block.attn1.to_out
        torch.nn.init.zeros_((out[0] if isinstance(out, torch.nn.Sequential) else out).weight)  # the copy only
        twin_out = twin.model.diffusion_model(x, t, context)
        tomesd.remove_patch(twin)
        twin_plain = twin.model.diffusion_model(x, t, context)
        tomesd.apply_patch(twin, ratio=0.5, seed=0)
        assert torch.equal(twin.model.diffusion_model(x, t, context), twin_out)
    assert not torch.equal(twin_out, model.model.diffusion_model(x, t, context))
    assert not torch.equal(twin_out, twin_plain)


# 9. compile with a timestep ratio, and plan_every ------------------------------------------------------


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


# 13. apply / remove while another thread is inside a call --------------------------------------------------


def test_remove_patch_while_another_thread_is_in_a_call_is_refused():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5)
    inside, release = threading.Event(), threading.Event()
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert isinstance(block, BasicTransformerBlock)

    def wait(*args):
        inside.set()
        release.wait(10)

    handle = block.register_forward_pre_hook(wait)
    worker = threading.Thread(target=_run, args=(unet,))
    worker.start()
    try:
        assert inside.wait(10)
        with pytest.raises(RuntimeError, match="running in other threads"):
            tomesd.remove_patch(unet)
        with pytest.raises(RuntimeError, match="running in other threads"):
            tomesd.apply_patch(unet, ratio=0.3)
        assert patched_state(unet).config.ratio == 0.5
    finally:
        release.set()
        worker.join(10)
        handle.remove()
    tomesd.remove_patch(unet)  # the call ended: allowed
    assert not tomesd.is_patched(unet)


def test_copies_of_a_patched_flux_compute_what_it_computes():
    model = tiny.flux()
    tomesd.apply_patch(model, ratio=0.5, seed=0)
    inputs = tiny.flux_inputs(batch=2)
    with torch.no_grad():
        want = model(**inputs).sample
        for twin in _copies(model):
            assert torch.equal(twin(**inputs).sample, want)
            tomesd.remove_patch(twin)
            assert not any(type(m.processor).__name__.startswith("Wrapped") for m in twin.modules() if hasattr(m, "processor"))
        assert torch.equal(model(**inputs).sample, want)

"""Real use that must neither crash nor silently change results: threads, unrolled training with
checkpointing, LDM checkpointing, compile after patching, odd grids, fp16 sums, interrupted calls,
level detection, silent no-ops, ratio callables, the global RNG, block subclasses."""
import logging
import threading
import time

import pytest
import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

import ldm_like
import tiny
import tomesd
from tomesd.matching import MergePlan, merge
from tomesd.patch import level_of, patched_state

# Four levels, attention at /1, /2, /4 and (mid block) /8, like SD 1.5.
FOUR_LEVELS = dict(
    tiny.SD1_UNET,
    block_out_channels=(32, 32, 32, 32),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def _run(model, arch="sd1", batch=2, size=16, seed=1, width=None, **kwargs):
    args, kw = tiny.unet_inputs(arch, batch=batch, size=size, seed=seed)
    sample = args[0]
    if width is not None:
        sample = torch.randn(batch, 4, size, width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(sample, *args[1:], **kw, **kwargs).sample


def _attn1_lengths(model, **run_kwargs):
    seen = []
    blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    handles = [b.attn1.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]),
                                                 with_kwargs=True) for b in blocks]
    _run(model, **run_kwargs)
    for h in handles:
        h.remove()
    return seen


# 1. Threads --------------------------------------------------------------------------------------

def test_concurrent_calls_equal_sequential_calls():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=3, merge_mlp=True)
    jobs = [dict(size=16, batch=2, seed=1), dict(size=12, batch=2, seed=2), dict(size=16, batch=3, seed=3),
            dict(size=10, width=14, batch=2, seed=4)]
    want = [_run(unet, **job) for job in jobs]
    for block in (m for m in unet.modules() if isinstance(m, BasicTransformerBlock)):
        # release the GIL between merging and unmerging, so the calls interleave inside blocks
        block.attn1.register_forward_pre_hook(lambda m, a: time.sleep(0.002))
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        try:
            barrier.wait()
            results[i] = [_run(unet, **jobs[i]) for _ in range(3)]
        except Exception as exc:  # reported below with the thread's job
            errors.append((jobs[i], exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, outs in results.items():
        for out in outs:
            assert torch.equal(out, want[i]), jobs[i]


# 2. Unrolled training with checkpointing ----------------------------------------------------------

def _unrolled_grads(unet, steps=20, size=8):
    unet.zero_grad(set_to_none=True)
    args, kwargs = tiny.unet_inputs("sd1", size=size, seed=5)
    x = args[0]
    for i in range(steps):
        x = x - 0.05 * unet(x, torch.tensor(999 - 50 * i), **kwargs).sample
    x.square().mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def _checkpoint_transformers(unet):
    """Checkpoint whole Transformer2DModels (block inputs are recomputed, not saved), non-reentrant."""
    for attn in (m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"):
        forward = attn.forward
        attn.forward = lambda *a, _f=forward, **k: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False, **k)


@pytest.mark.parametrize("how", ["blocks", "transformers"])
def test_twenty_unrolled_checkpointed_calls_give_exact_gradients(how):
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=7)
    want = _unrolled_grads(unet)
    if how == "blocks":
        unet.enable_gradient_checkpointing()
    else:
        _checkpoint_transformers(unet)
    got = _unrolled_grads(unet)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not patched_state(unet).live or all(c.records for c in patched_state(unet).live.values())


def test_call_contexts_live_only_while_their_graph_does():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=7)
    unet.enable_gradient_checkpointing()
    args, kwargs = tiny.unet_inputs("sd1", size=8)
    outs = [unet(*args, **kwargs).sample for _ in range(20)]
    state = patched_state(unet)
    assert len(state.live) == 20  # no cap: every call that can still be backpropagated is findable
    del outs
    assert len(state.live) == 0


# 3. LDM checkpointing ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["compvis", "webui", "non-reentrant"])
def test_ldm_checkpointed_blocks_give_the_gradients_of_the_plain_model(mode, monkeypatch):
    torch.manual_seed(0)
    model = ldm_like.LatentDiffusion()
    unet = model.model.diffusion_model
    tomesd.apply_patch(model, ratio=0.5, seed=2, max_downsample=2, merge_crossattn=True, merge_mlp=True)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)

    def grads():
        unet.zero_grad(set_to_none=True)
        loss = sum(unet(x, torch.tensor([t, t]), context).square().mean() for t in (10, 20))
        loss.backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters()}

    want = grads()
    monkeypatch.setitem(ldm_like.CHECKPOINT, "mode", mode)
    got = grads()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    tomesd.remove_patch(model)
    assert all("_forward" not in vars(b) for b in unet.modules() if isinstance(b, ldm_like.BasicTransformerBlock))


# 4. Patching after torch.compile ------------------------------------------------------------------

@pytest.mark.slow
def test_patching_a_compiled_model_takes_effect(caplog):
    torch._dynamo.reset()
    unet = tiny.unet("sd1")
    reference = tiny.unet("sd1")
    plain = _run(unet)
    compiled = torch.compile(unet, fullgraph=True)
    torch.testing.assert_close(_run(compiled), plain, rtol=1e-4, atol=1e-4)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        tomesd.apply_patch(compiled, ratio=0.5, use_rand=False)
    assert any("torch.compiler.reset()" in r.getMessage() for r in caplog.records)
    tomesd.apply_patch(reference, ratio=0.5, use_rand=False)
    torch.testing.assert_close(_run(compiled), _run(reference), rtol=1e-4, atol=1e-4)
    tomesd.remove_patch(compiled)
    torch.testing.assert_close(_run(compiled), plain, rtol=1e-4, atol=1e-4)


# 5. Grids narrower than a dst cell ----------------------------------------------------------------

@pytest.mark.parametrize("arch,size,width,kwargs", [
    ("sdxl", 1, 16, {}), ("sdxl", 16, 1, {}), ("sdxl", 2, 16, {}), ("sd2", 3, 40, dict(max_downsample=8)),
    ("sd1", 16, 16, dict(sx=100)), ("sd1", 16, 16, dict(sy=17, sx=1)),
])
def test_levels_without_a_dst_cell_are_skipped(arch, size, width, kwargs, caplog):
    unet = tiny.unet(arch)
    plain = _run(unet, arch, size=size, width=width)
    tomesd.apply_patch(unet, ratio=0.0 if kwargs.get("sx", 2) * kwargs.get("sy", 2) == 1 else 0.5, use_rand=False,
                       **kwargs)
    with caplog.at_level(logging.INFO, logger="tomesd"):
        out = _run(unet, arch, size=size, width=width)
        _run(unet, arch, size=size, width=width)
    assert torch.isfinite(out).all()
    narrow = [r for r in caplog.records if "narrower than one" in r.getMessage()]
    assert narrow and len({r.getMessage() for r in narrow}) == len(narrow)  # each level once
    if arch == "sdxl" or kwargs.get("sx") == 100 or kwargs.get("sy") == 17:
        assert torch.equal(out, plain)  # nothing could merge


# 6. fp16 sums -------------------------------------------------------------------------------------

def test_fp16_merge_of_a_flat_region_does_not_overflow():
    n = 5000
    x = torch.full((1, n, 8), 60.0, dtype=torch.float16)
    plan = MergePlan(slot=torch.zeros(1, n, dtype=torch.int64), counts=torch.tensor([[n]], dtype=torch.int32), num_out=1)
    out = merge(x, plan)
    assert out.dtype == torch.float16 and torch.equal(out, torch.full((1, 1, 8), 60.0, dtype=torch.float16))
    ramp = torch.linspace(-1, 1, n, dtype=torch.float64).to(torch.float16)[None, :, None].expand(1, n, 8)
    torch.testing.assert_close(merge(ramp, plan).float(), ramp.double().mean(1, keepdim=True).float(),
                               rtol=0, atol=1e-3)


# 7. An interrupted call -------------------------------------------------------------------------

def test_call_interrupted_inside_a_block_leaves_nothing_behind():
    unet, fresh = tiny.unet("sd1"), tiny.unet("sd1")
    for m in (unet, fresh):  # 16×16 latents (128 px) merge, 12×12 ones do not
        tomesd.apply_patch(m, ratio=lambda h, w: 0.5 if h == 128 else 0.0, seed=1, merge_crossattn=True)
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    fired = []

    def interrupt(module, args, kwargs):
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt

    handle = block.attn2.register_forward_pre_hook(interrupt, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        _run(unet, size=16)
    handle.remove()
    assert torch.equal(_run(unet, size=12), _run(fresh, size=12))
    assert torch.equal(_run(unet, size=16), _run(fresh, size=16))


# 8. Level detection -----------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(49, 49), (33, 17), (9, 9), (5, 5), (57, 41), (64, 64)])
def test_levels_follow_the_grid_chain(height, width):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**FOUR_LEVELS).eval()
    seen = []
    tomesd.apply_patch(unet, ratio=lambda h, w, downsample: seen.append(downsample) or 0.5, max_downsample=8,
                       use_rand=False)
    lengths = _attn1_lengths(unet, size=height, width=width)
    merged, expected, h, w = set(), set(), height, width
    for d in (1, 2, 4, 8):
        n, dst = h * w, (h // 2) * (w // 2)
        if dst:
            merged.add(d)
        expected.add(n - min(int(n * 0.5), n - dst) if dst else n)
        h, w = -(-h // 2), -(-w // 2)
    assert set(seen) == merged and merged <= {1, 2, 4, 8}
    assert set(lengths) == expected


def test_level_of():
    assert level_of(57, 41, 8 * 6) == (8, 8, 6)
    assert level_of(49, 49, 25 * 25) == (2, 25, 25)
    assert level_of(9, 9, 9) == (4, 3, 3)
    assert level_of(5, 5, 1) == (8, 1, 1)
    assert level_of(16, 16, 100) is None


# 9. Silent no-ops -------------------------------------------------------------------------------

def test_max_downsample_below_the_first_attention_level_warns(caplog):
    unet = tiny.unet("sdxl")
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        tomesd.apply_patch(unet, max_downsample=1)
    assert any("nothing is merged" in r.getMessage() for r in caplog.records)


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


# 10. Ratio callables ----------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [lambda h, w, a, b: 0.5, lambda h, w, *, k: 0.5, lambda: 0.5])
def test_ratio_callables_that_cannot_be_called_fail_at_apply_patch(fn):
    with pytest.raises(TypeError, match="ratio callable must accept"):
        tomesd.apply_patch(tiny.unet("sd1"), ratio=fn)


# 11. The global RNG -----------------------------------------------------------------------------

def test_patching_and_patched_calls_leave_the_global_rng_alone():
    unet = tiny.unet("sd1")
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    tomesd.apply_patch(unet, ratio=0.0)
    _run(unet)
    tomesd.apply_patch(unet, ratio=0.5)
    _run(unet)
    assert torch.equal(torch.rand(4), want)


def test_seed_none_follows_manual_seed_and_a_reloaded_twin_merges_alike(tmp_path):
    unet = tiny.unet("sd1")
    unet.save_pretrained(tmp_path)
    twin = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    outs = []
    for model, seed in ((unet, 1), (twin, 1), (unet, 2)):
        torch.manual_seed(seed)
        tomesd.apply_patch(model, ratio=0.5)
        outs.append(_run(model))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# 12. Subclasses of BasicTransformerBlock ----------------------------------------------------------

def test_ldm_block_subclasses_are_patched():
    class HijackedBlock(ldm_like.BasicTransformerBlock):
        pass

    torch.manual_seed(0)
    model = ldm_like.LatentDiffusion().eval()
    for st in (m for m in model.modules() if isinstance(m, ldm_like.SpatialTransformer)):
        old = st.transformer_blocks[0]
        new = HijackedBlock(old.norm1.normalized_shape[0], old.attn2.to_k.in_features)
        new.load_state_dict(old.state_dict())
        st.transformer_blocks[0] = new
    tomesd.apply_patch(model, ratio=0.5)
    assert len(patched_state(model).host.blocks) == 4

"""Gradient checkpointing and training: a block recomputed in backward merges with its forward's partition, so
gradients equal those without checkpointing (diffusers', unrolled, LDM); call contexts live as long as their graph."""
import inspect
from functools import partial

import pytest
import torch
import torch.utils.checkpoint
from diffusers.models.attention import BasicTransformerBlock

import ldm_like
import tiny
import tomesd
from tomesd.patch import patched_state

CHECKPOINTS = {
    "diffusers default": None,
    "reentrant": partial(torch.utils.checkpoint.checkpoint, use_reentrant=True),
}


def _loss(unet, seeds=(1,)):
    total = 0
    for seed in seeds:
        args, kwargs = tiny.unet_inputs("sd1", seed=seed)
        total = total + unet(*args, **kwargs).sample.square().mean()
    return total


def _grads(unet, seeds=(1,)):
    unet.zero_grad(set_to_none=True)
    _loss(unet, seeds).backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def _checkpointing(unet, how):
    if CHECKPOINTS[how] is None:
        unet.enable_gradient_checkpointing()
        return
    if "gradient_checkpointing_func" not in inspect.signature(unet.enable_gradient_checkpointing).parameters:
        pytest.skip("this diffusers cannot choose the checkpoint function")
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=CHECKPOINTS[how])


def _count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


@pytest.mark.parametrize("how", list(CHECKPOINTS))
@pytest.mark.parametrize("seeds", [(1,), (1, 2)], ids=["one forward", "two forwards one backward"])
def test_checkpoint_recompute_uses_the_forward_partition(how, seeds):
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, use_rand=True, seed=11, merge_crossattn=True, merge_mlp=True)
    want = _grads(unet, seeds)
    _checkpointing(unet, how)
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    calls = _count_calls(block)
    got = _grads(unet, seeds)
    assert len(calls) == 2 * len(seeds)  # each forward's block ran again in backward
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_recompute_under_another_partition_would_differ():
    """The comparison above can fail: another seed's partition gives other gradients."""
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, use_rand=True, seed=11)
    a = _grads(unet)
    tomesd.apply_patch(unet, ratio=0.5, use_rand=True, seed=12)
    b = _grads(unet)
    assert any(not torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6) for n in a)


def test_lora_training_step_on_patched_checkpointed_unet():
    peft = pytest.importorskip("peft")
    unet = tiny.unet("sd1").train()
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert lora and all("lora" in n for n in lora)
    tomesd.apply_patch(unet, ratio=0.5, seed=4)
    want = _grads(unet)
    unet.enable_gradient_checkpointing()
    got = _grads(unet)
    assert got.keys() == want.keys() == lora.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    before = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    optimizer.zero_grad()
    loss = _loss(unet)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, before[n]) for n, p in lora.items() if "lora_B" in n)


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

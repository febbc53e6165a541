"""Gradient checkpointing and training: a block recomputed in backward merges with the partition of
its forward, so gradients with random partitions equal those without checkpointing."""
import inspect
from functools import partial

import pytest
import torch
import torch.utils.checkpoint
from diffusers.models.attention import BasicTransformerBlock

import tiny
import tomesd

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

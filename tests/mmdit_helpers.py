"""What the SD 3 / Flux (MMDiT) tests share: whether this diffusers splits Flux's single-stream blocks, the
(query, key) lengths of every SDPA call, one call of a model, the token counts a sub-layer sees, and
gradients with and without checkpointing."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

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


def run(model, inputs, record=False):
    with torch.no_grad():
        if not record:
            return model(**inputs).sample
        with KeyLengths() as lengths:
            model(**inputs)
        return lengths.seen


def hidden_lengths(model, name):
    """hidden_states lengths seen by sub-layer `name` of every block."""
    seen = []
    for block in patched_state(model).host.blocks:
        sub = getattr(block, name, None)
        if sub is not None:
            sub.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]),
                                          with_kwargs=True)
    return seen


def assert_checkpointing_keeps_gradients(model, loss):
    """The parameter gradients of loss(model) are the same after model.enable_gradient_checkpointing()."""
    def grads():
        model.zero_grad(set_to_none=True)
        loss(model).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    got = grads()
    assert got.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)

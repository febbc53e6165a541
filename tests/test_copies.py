"""Copies of a patched model (copy.deepcopy, pickle, torch.save / torch.load): each computes what the
original computes, on its own weights, and its patch is its own to remove."""
import copy
import io
import pickle

import torch

import ldm_like
import tiny
import tomesd
from tiny import run as _run


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

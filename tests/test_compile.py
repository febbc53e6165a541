"""torch.compile: a patched tiny UNet compiled (CPU, inductor, whole graph) matches eager, and patching a
model after compiling it takes effect (and is undone by remove_patch)."""
import logging

import pytest
import torch

import tiny
import tomesd
from tiny import run as _run


@pytest.mark.slow
@pytest.mark.parametrize(
    "patch_kwargs",
    [dict(ratio=0.5, use_rand=False), dict(ratio={64: 0.3, 256: 0.6}, seed=3)],
    ids=["float-deterministic", "mapping-seeded"],
)
def test_compiled_patched_unet_matches_eager(patch_kwargs):
    torch._dynamo.reset()
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, **patch_kwargs)
    args, kwargs = tiny.unet_inputs("sd1")
    with torch.no_grad():
        eager = unet(*args, **kwargs).sample
        compiled = torch.compile(unet, fullgraph=True)  # no graph break anywhere in the patched forward
        out = compiled(*args, **kwargs).sample
        again = compiled(*args, **kwargs).sample
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-4)
    tomesd.remove_patch(unet)
    with torch.no_grad():
        assert not torch.allclose(unet(*args, **kwargs).sample, eager, atol=1e-4)  # merging was in effect


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

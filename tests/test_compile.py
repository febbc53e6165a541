"""A patched tiny UNet under torch.compile (CPU, inductor) matches eager."""
import pytest
import torch

import tiny
import tomesd


@pytest.mark.slow
@pytest.mark.parametrize("use_rand", [False, True])
def test_compiled_patched_unet_matches_eager(use_rand):
    torch._dynamo.reset()
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, use_rand=use_rand, seed=3)
    args, kwargs = tiny.unet_inputs("sd1")
    with torch.no_grad():
        eager = unet(*args, **kwargs).sample
        compiled = torch.compile(unet)
        out = compiled(*args, **kwargs).sample
        again = compiled(*args, **kwargs).sample
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-4)

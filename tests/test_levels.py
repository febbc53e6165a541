"""Which levels merge: each block's level found from the grid chain (odd sizes included), level_of,
grids too narrow for a dst cell (skipped, said once), and a max_downsample below every attention level (said)."""
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

import tiny
import tomesd
from tiny import run as _run
from tomesd.patch import level_of

# Four levels, attention at /1, /2, /4 and (mid block) /8, like SD 1.5.
FOUR_LEVELS = dict(
    tiny.SD1_UNET,
    block_out_channels=(32, 32, 32, 32),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def _attn1_lengths(model, **run_kwargs):
    seen = []
    blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    handles = [b.attn1.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]),
                                                 with_kwargs=True) for b in blocks]
    _run(model, **run_kwargs)
    for h in handles:
        h.remove()
    return seen


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
    warned = [r.getMessage() for r in narrow if r.levelno >= logging.WARNING]
    if arch == "sdxl" or kwargs.get("sx") == 100 or kwargs.get("sy") == 17:
        assert torch.equal(out, plain)  # nothing could merge
        assert len(warned) == 1 and "nothing is merged" in warned[0]  # said as a warning, once
    else:
        assert not warned  # a coarser level without a dst cell, while finer ones merge: INFO


def test_max_downsample_below_the_first_attention_level_warns(caplog):
    unet = tiny.unet("sdxl")
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        tomesd.apply_patch(unet, max_downsample=1)
    assert any("nothing is merged" in r.getMessage() for r in caplog.records)

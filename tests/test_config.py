"""Argument validation in apply_patch (settings that merge nothing are said or refused), and the ratio
schedule (callables that cannot be called fail at apply_patch; a ratio that merges no token is said)."""
import logging
import math

import pytest
import torch

import tiny
import tomesd
from tiny import run as _run
from tomesd.config import RatioSchedule


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(ratio=-0.1), ValueError, r"ratio must be in \[0, 0.75\]"),
        (dict(ratio=0.76), ValueError, r"ratio must be in \[0, 0.75\]"),
        (dict(ratio=0.6, sx=1, sy=2), ValueError, r"ratio must be in \[0, 0.5\]"),
        (dict(ratio=math.nan), ValueError, "ratio must be in"),
        (dict(ratio="0.5"), TypeError, "ratio must be a real number"),
        (dict(ratio=True), TypeError, "ratio must be a real number"),
        (dict(ratio={512: 0.3, 1024: 0.9}), ValueError, r"ratio\[1024\] must be in \[0, 0.75\]"),
        (dict(ratio={512: "a"}), TypeError, r"ratio\[512\] must be a real number"),
        (dict(ratio={-5: 0.3}), ValueError, "ratio mapping keys"),
        (dict(ratio={}), ValueError, "must not be empty"),
        (dict(ratio=lambda h: 0.5), TypeError, "ratio callable must accept"),
        (dict(max_downsample=3), ValueError, r"max_downsample must be one of \(1, 2, 4, 8\)"),
        (dict(max_downsample=0), ValueError, "max_downsample"),
        (dict(sx=0), ValueError, "sx must be a positive int"),
        (dict(sy=2.5), ValueError, "sy must be a positive int"),
        (dict(use_rand=1), TypeError, "use_rand must be a bool"),
        (dict(seed="x"), TypeError, "seed must be an int"),
        (dict(patch_controlnet="yes"), TypeError, "patch_controlnet must be a bool"),
    ],
)
def test_bad_arguments_fail_in_apply_patch(kwargs, error, match):
    unet = tiny.unet("sd1")
    with pytest.raises(error, match=match):
        tomesd.apply_patch(unet, **kwargs)
    assert not tomesd.is_patched(unet)


def test_ratio_at_the_geometric_maximum_is_allowed():
    for sx, sy in [(1, 1), (2, 2), (4, 3)]:
        tomesd.ToMeConfig(ratio=1 - 1 / (sx * sy), sx=sx, sy=sy)


def test_model_without_blocks_and_non_models():
    with pytest.raises(ValueError, match="holds no transformer blocks"):
        tomesd.apply_patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a diffusers pipeline"):
        tomesd.apply_patch(object())
    assert not tomesd.is_patched(torch.nn.Linear(2, 2))


def test_table_interpolates_by_image_side_and_clamps():
    s = RatioSchedule.parse({512: 0.2, 1024: 0.5, 2048: 0.6}, 2, 2)
    assert s.resolve(256, 256, 1) == 0.2
    assert s.resolve(512, 512, 1) == 0.2
    assert s.resolve(768, 768, 1) == pytest.approx(0.35)
    assert s.resolve(512, 2048, 1) == pytest.approx(0.5)  # side = sqrt(512·2048) = 1024
    assert s.resolve(1536, 1536, 1) == pytest.approx(0.55)
    assert s.resolve(4096, 4096, 1) == 0.6


def test_constant_and_callable_schedules():
    assert RatioSchedule.parse(0.4, 2, 2).resolve(1, 1, 1) == 0.4
    two = RatioSchedule.parse(lambda h, w: h / 4096, 2, 2)
    assert two.resolve(1024, 512, 1) == 0.25 and not two.fn_takes_level
    three = RatioSchedule.parse(lambda h, w, d: 0.1 * d, 2, 2)
    assert three.resolve(1, 1, 4) == pytest.approx(0.4)
    with pytest.raises(ValueError, match=r"ratio\(8192, 8, 1\)"):
        RatioSchedule.parse(lambda h, w, d=1: h / 4096, 2, 2).resolve(8192, 8, 1)


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


@pytest.mark.parametrize("fn", [lambda h, w, a, b: 0.5, lambda h, w, *, k: 0.5, lambda: 0.5])
def test_ratio_callables_that_cannot_be_called_fail_at_apply_patch(fn):
    with pytest.raises(TypeError, match="ratio callable must accept"):
        tomesd.apply_patch(tiny.unet("sd1"), ratio=fn)

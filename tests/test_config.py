"""Argument validation in apply_patch, and the ratio schedule."""
import math

import pytest
import torch

import tiny
import tomesd
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

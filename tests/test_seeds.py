"""Random partitions: a seed reproduces them, seed=None follows torch.manual_seed, an odd batch turns
randomness off, the partition varies with timestep and block, and the global RNG is left alone."""
import logging

import torch
from diffusers import UNet2DConditionModel

import tiny
import tomesd
from tiny import run as _run


def test_seed_gives_reproducible_random_partitions():
    a, b = tiny.unet("sd1"), tiny.unet("sd1")
    tomesd.apply_patch(a, ratio=0.5, seed=11)
    tomesd.apply_patch(b, ratio=0.5, seed=11)
    first = _run(a, "sd1")
    assert torch.equal(first, _run(a, "sd1")) and torch.equal(first, _run(b, "sd1"))
    tomesd.apply_patch(b, ratio=0.5, seed=12)
    assert not torch.equal(first, _run(b, "sd1"))
    tomesd.apply_patch(b, ratio=0.5, use_rand=False)
    assert not torch.equal(first, _run(b, "sd1"))


def test_odd_batch_turns_randomness_off_with_one_message(caplog):
    a, b = tiny.unet("sd1"), tiny.unet("sd1")
    tomesd.apply_patch(a, ratio=0.5, seed=5)
    tomesd.apply_patch(b, ratio=0.5, use_rand=False)
    with caplog.at_level(logging.INFO, logger="tomesd"):
        out = _run(a, "sd1", batch=1)
        _run(a, "sd1", batch=3)
    assert torch.equal(out, _run(b, "sd1", batch=1))
    assert sum("odd size" in r.getMessage() for r in caplog.records) == 1


def test_random_partition_varies_with_timestep_and_block_but_not_between_calls(monkeypatch):
    import tomesd.matching

    dsts = []

    def recording_partition(*args):
        dst_idx, src_idx = partition(*args)
        dsts.append(dst_idx.clone())
        return dst_idx, src_idx

    partition = tomesd.matching.partition
    monkeypatch.setattr(tomesd.matching, "partition", recording_partition)
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=1, sx=1, sy=2)
    args, kwargs = tiny.unet_inputs("sd1")
    calls = []
    for t in (torch.tensor(500), torch.tensor(500), 499):
        dsts.clear()
        with torch.no_grad():
            unet(args[0], t, **kwargs)
        calls.append(list(dsts))
    first, again, later = calls
    assert len(first) == len(again) == len(later) >= 2
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.equal(a, b) for a, b in zip(first, later))
    assert not torch.equal(first[0], first[1])


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

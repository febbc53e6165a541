"""Each call's state is its own: calls from several threads at once equal sequential calls, patching or
removing while another thread is inside a call is refused, and a call interrupted inside a block leaves nothing."""
import threading
import time

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import tiny
import tomesd
from tiny import run as _run
from tomesd.patch import patched_state


def test_concurrent_calls_equal_sequential_calls():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=3, merge_mlp=True)
    jobs = [dict(size=16, batch=2, seed=1), dict(size=12, batch=2, seed=2), dict(size=16, batch=3, seed=3),
            dict(size=10, width=14, batch=2, seed=4)]
    want = [_run(unet, **job) for job in jobs]
    for block in (m for m in unet.modules() if isinstance(m, BasicTransformerBlock)):
        # release the GIL between merging and unmerging, so the calls interleave inside blocks
        block.attn1.register_forward_pre_hook(lambda m, a: time.sleep(0.002))
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        try:
            barrier.wait()
            results[i] = [_run(unet, **jobs[i]) for _ in range(3)]
        except Exception as exc:  # reported below with the thread's job
            errors.append((jobs[i], exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, outs in results.items():
        for out in outs:
            assert torch.equal(out, want[i]), jobs[i]


def test_remove_patch_while_another_thread_is_in_a_call_is_refused():
    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5)
    inside, release = threading.Event(), threading.Event()
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert isinstance(block, BasicTransformerBlock)

    def wait(*args):
        inside.set()
        release.wait(10)

    handle = block.register_forward_pre_hook(wait)
    worker = threading.Thread(target=_run, args=(unet,))
    worker.start()
    try:
        assert inside.wait(10)
        with pytest.raises(RuntimeError, match="running in other threads"):
            tomesd.remove_patch(unet)
        with pytest.raises(RuntimeError, match="running in other threads"):
            tomesd.apply_patch(unet, ratio=0.3)
        assert patched_state(unet).config.ratio == 0.5
    finally:
        release.set()
        worker.join(10)
        handle.remove()
    tomesd.remove_patch(unet)  # the call ended: allowed
    assert not tomesd.is_patched(unet)


def test_call_interrupted_inside_a_block_leaves_nothing_behind():
    unet, fresh = tiny.unet("sd1"), tiny.unet("sd1")
    for m in (unet, fresh):  # 16×16 latents (128 px) merge, 12×12 ones do not
        tomesd.apply_patch(m, ratio=lambda h, w: 0.5 if h == 128 else 0.0, seed=1, merge_crossattn=True)
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    fired = []

    def interrupt(module, args, kwargs):
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt

    handle = block.attn2.register_forward_pre_hook(interrupt, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        _run(unet, size=16)
    handle.remove()
    assert torch.equal(_run(unet, size=12), _run(fresh, size=12))
    assert torch.equal(_run(unet, size=16), _run(fresh, size=16))

"""The CUDA kernels against the PyTorch path (needs a GPU; skipped without one).

Pairs: the kernel's plan equals matching.plan_from_matches applied to the kernel's own (score,
dst_pos) exactly, and the kernel's best_dst matches matching.best_dst except where two candidates
are within rounding of each other. Values: the error of each kernel against an fp64 evaluation of
the same plan is at most twice the PyTorch path's own error in that dtype (plus a tiny floor).
"""
from __future__ import annotations

import random

import pytest
import torch
from torch.library import opcheck

import tiny
import tomesd
from tomesd import matching, ops
from tomesd.ops import loader, selfcheck

pytestmark = pytest.mark.gpu
OPS = torch.ops.tomesd
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SCORE_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-3, torch.float32: 1e-5}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA kernel tests need a GPU")
    reason = ops.cuda_refusal(torch.empty(0, device="cuda", dtype=torch.float16))
    assert not reason, f"a GPU is present but the kernels did not load: {reason}"


def _case(B, h, w, C, sx, sy, dtype, seed, ratio=0.5):
    g = torch.Generator(device="cuda").manual_seed(seed)
    key = torch.tensor(seed * 7919 % 2**32)
    dst, src = matching.partition(h, w, sx, sy, key, "cuda")
    metric = torch.randn(B, h * w, C, device="cuda", generator=g).to(dtype)
    r = max(1, min(int(h * w * ratio), len(src)))
    return metric, dst, src, r


SHAPES = [  # B, h, w, C, sx, sy
    (1, 8, 8, 8, 2, 2), (2, 13, 21, 40, 2, 2), (3, 17, 9, 77, 3, 2), (2, 64, 64, 320, 2, 2),
    (8, 32, 48, 640, 2, 2), (2, 45, 31, 1280, 1, 2), (1, 128, 128, 320, 2, 2), (2, 256, 256, 320, 2, 2),
]


def _random_shapes(n=6, seed=0):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        sx, sy = rnd.choice([(2, 2), (1, 2), (2, 1), (3, 3), (4, 2)])
        out.append((rnd.randint(1, 8), rnd.randint(sy, 70), rnd.randint(sx, 70), rnd.choice([8, 24, 64, 100, 160, 1280]), sx, sy))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + _random_shapes())
def test_best_dst_matches_torch_path(shape, dtype):
    metric, dst, src, _ = _case(*shape, dtype=dtype, seed=sum(shape))
    score, pos = OPS.best_dst(metric, dst, src)
    ref_score, ref_pos = matching.best_dst(metric, dst, src)
    tol = SCORE_TOL[dtype]
    torch.testing.assert_close(score, ref_score, atol=tol, rtol=0)
    differ = pos != ref_pos
    if differ.any():  # only near-ties may pick another dst: its exact score must be within tolerance
        m = metric.double()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        b, s = differ.nonzero(as_tuple=True)
        a = m[b, src[s]]
        exact = (a * m[b, dst[pos[b, s]]]).sum(-1), (a * m[b, dst[ref_pos[b, s]]]).sum(-1)
        assert torch.all((exact[0] - exact[1]).abs() <= 2 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + _random_shapes(seed=1))
def test_plan_pairs_and_csr(shape, dtype):
    metric, dst, src, r = _case(*shape, dtype=dtype, seed=sum(shape) + 1)
    slot, counts, offsets, members = OPS.build_plan(metric, dst, src, r)
    score, pos = OPS.best_dst(metric, dst, src)
    ref = matching.plan_from_matches(score, pos, dst, src, r, metric.shape[1])
    assert torch.equal(slot, ref.slot), "selection or slot map differs from the PyTorch path"
    assert torch.equal(counts, ref.counts)
    exp_offsets, exp_members = ops.csr(ref.slot, ref.counts)
    assert torch.equal(offsets, exp_offsets) and torch.equal(members, exp_members)
    again = OPS.build_plan(metric, dst, src, r)
    assert all(torch.equal(u, v) for u, v in zip(again, (slot, counts, offsets, members)))


def test_zero_norm_tokens_and_r_zero():
    metric, dst, src, r = _case(2, 16, 16, 64, 2, 2, torch.float16, seed=5)
    metric[:, ::3] = 0
    score, pos = OPS.best_dst(metric, dst, src)
    assert torch.isfinite(score).all()
    ref = matching.plan_from_matches(score, pos, dst, src, r, metric.shape[1])
    assert torch.equal(OPS.build_plan(metric, dst, src, r)[0], ref.slot)
    slot, counts, _, _ = OPS.build_plan(metric, dst, src, 0)
    assert torch.equal(slot, torch.arange(256, device="cuda").expand(2, 256)) and bool((counts == 1).all())


def _value_error(fn, ref64):
    return (fn.double() - ref64).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 64, 64, 320, 2, 2), (3, 17, 9, 77, 3, 2), (8, 32, 48, 1280, 2, 2), (2, 256, 256, 320, 2, 2)])
def test_merge_unmerge_values(shape, dtype):
    metric, dst, src, r = _case(*shape, dtype=dtype, seed=3)
    plan = ops.build_plan(metric, dst, src, r)
    x = torch.randn_like(metric) * 4
    ref = matching.merge(x.double(), plan)
    floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
    merged = ops.merge(x, plan)
    bound = 2 * _value_error(matching.merge(x, plan), ref) + floor
    assert _value_error(merged, ref) <= bound
    assert torch.equal(ops.merge(x, plan), merged)  # deterministic
    y = torch.randn(x.shape[0], plan.num_out, x.shape[2], device="cuda").to(dtype)
    assert torch.equal(ops.unmerge(y, plan), matching.unmerge(y, plan))  # a gather is exact
    summed = OPS.merge(x, plan.slot, plan.offsets, plan.members, False)
    assert _value_error(summed, ref * plan.counts[..., None]) <= bound * plan.counts.max().item()


def test_opcheck_cuda():
    metric, dst, src, r = _case(2, 24, 20, 64, 2, 2, torch.float16, seed=9)
    slot, _, offsets, members = OPS.build_plan(metric, dst, src, r)
    x = torch.randn_like(metric, requires_grad=True)
    y = torch.randn(2, metric.shape[1] - r, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    opcheck(OPS.best_dst, (metric, dst, src))
    opcheck(OPS.build_plan, (metric, dst, src, r))
    opcheck(OPS.merge, (x, slot, offsets, members, True))
    opcheck(OPS.unmerge, (y, slot, offsets, members))


def test_gradients_match_cpu():
    metric, dst, src, r = _case(2, 24, 20, 48, 2, 2, torch.float32, seed=11)
    plan = [t for t in OPS.build_plan(metric, dst, src, r)]
    x = torch.randn_like(metric, requires_grad=True)
    w = torch.randn(2, metric.shape[1] - r, 48, device="cuda")
    out = OPS.unmerge(OPS.merge(x, plan[0], plan[2], plan[3], True) * w, plan[0], plan[2], plan[3])
    out.square().sum().backward()
    xc = x.detach().cpu().requires_grad_()
    cpu = [t.cpu() for t in plan]
    out_c = OPS.unmerge(OPS.merge(xc, cpu[0], cpu[2], cpu[3], True) * w.cpu(), cpu[0], cpu[2], cpu[3])
    out_c.square().sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xc.grad, rtol=1e-5, atol=1e-5)


def _patched_unet(dtype=torch.float16):
    unet = tiny.unet("sd1").to("cuda", dtype)
    tomesd.apply_patch(unet, ratio=0.5, seed=1)
    args, kwargs = tiny.unet_inputs("sd1", dtype=dtype)
    args = tuple(a.to("cuda") for a in args)
    kwargs = {k: v.to("cuda") for k, v in kwargs.items()}
    return unet, args, kwargs


def test_compiled_patched_unet_on_cuda():
    torch._dynamo.reset()
    unet, args, kwargs = _patched_unet()
    with torch.no_grad():
        eager = unet(*args, **kwargs).sample
        out = torch.compile(unet)(*args, **kwargs).sample
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)


def test_cuda_graph_capture_and_replay_of_patched_step():
    unet, args, kwargs = _patched_unet()
    static_args = tuple(a.clone() for a in args)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                unet(*static_args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = unet(*static_args, **kwargs).sample
        new_sample = torch.randn_like(args[0])
        static_args[0].copy_(new_sample)
        graph.replay()
        expected = unet(new_sample, static_args[1], **kwargs).sample
    torch.testing.assert_close(static_out, expected, rtol=1e-3, atol=1e-3)


def test_nan_and_inf_tokens_give_nan_like_the_torch_path():
    """A NaN or Inf token makes NaN scores on both paths; the kernels rank NaN as torch.max / topk
    do, so an all-NaN row still gets a valid dst (no read of dst_idx[INT_MAX]) and the context lives."""
    metric, dst, src, r = _case(3, 16, 12, 64, 2, 2, torch.float16, seed=13)
    metric[0, 5] = float("nan")
    metric[1, 17] = float("inf")
    metric[2] = float("nan")  # every score of this batch row is NaN
    score, pos = OPS.best_dst(metric, dst, src)
    ref_score, ref_pos = matching.best_dst(metric, dst, src)
    assert torch.equal(score.isnan(), ref_score.isnan()) and bool(score.isnan()[2].all())
    assert bool(((pos >= 0) & (pos < len(dst))).all())
    assert torch.equal(pos[2], ref_pos[2])  # all NaN: the first dst, as torch.max
    slot, counts, offsets, members = OPS.build_plan(metric, dst, src, r)
    torch.cuda.synchronize()
    assert bool(((slot >= 0) & (slot < metric.shape[1] - r)).all()) and int(counts.sum()) == 3 * metric.shape[1]
    ref = matching.plan_from_matches(score, pos, dst, src, r, metric.shape[1])
    assert torch.equal(slot[2], ref.slot[2])  # all-NaN row: the lowest src positions merge into dst 0
    merged = ops.merge(metric, ops.build_plan(metric, dst, src, r))
    ref_merged = matching.merge(metric, matching.build_plan(metric, dst, src, r))
    bad_rows = (~torch.isfinite(merged)).any(-1).sum(-1)  # output rows holding a NaN or Inf token
    assert torch.equal(bad_rows, (~torch.isfinite(ref_merged)).any(-1).sum(-1))
    assert bad_rows.tolist()[:2] == [1, 1] and bool(merged[2].isnan().all())
    healthy, hdst, hsrc, _ = _case(1, 8, 8, 8, 2, 2, torch.float32, seed=1)
    assert torch.isfinite(OPS.best_dst(healthy, hdst, hsrc)[0]).all()  # the context still works


@pytest.mark.parametrize("B, h, w", [(0, 16, 12), (2, 0, 0), (0, 0, 0)])
def test_empty_batch_or_grid_returns_empty_outputs(B, h, w):
    dst, src = matching.partition(h, w, 2, 2, None, "cuda")
    metric = torch.randn(B, h * w, 32, device="cuda", dtype=torch.float16)
    r = len(src) // 2
    outs = OPS.build_plan(metric, dst, src, r)
    cpu = OPS.build_plan(metric.cpu(), dst.cpu(), src.cpu(), r)
    assert [t.shape for t in outs] == [t.shape for t in cpu] and all(t.is_cuda for t in outs)
    assert [t.shape for t in OPS.best_dst(metric, dst, src)] == [(B, len(src))] * 2
    slot, _, offsets, members = outs
    x = torch.randn(B, h * w, 32, device="cuda", dtype=torch.float16)
    assert OPS.merge(x, slot, offsets, members, True).shape == (B, h * w - r, 32)
    torch.cuda.synchronize()


def test_self_check_passes_on_this_gpu():
    assert selfcheck.self_check(selfcheck.torch_kernels(), "cuda") == ""
    assert loader.self_check_status().startswith("passed")


def _fresh_loader(monkeypatch):
    """A new process-wide loader with the library loaded (a CPU device needs no check) and no check run."""
    fresh = loader.Loader()
    monkeypatch.setattr(loader, "loader", fresh)
    assert fresh.load_error("cpu") == "" and not fresh.checks
    return fresh


def test_self_check_under_a_cuda_default_device(monkeypatch):
    fresh = _fresh_loader(monkeypatch)
    torch.set_default_device("cuda")
    try:
        assert ops.cuda_refusal(torch.empty(0, dtype=torch.float16)) == ""
    finally:
        torch.set_default_device(None)
    assert fresh.self_check_status().startswith("passed")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_self_check_runs_on_the_tensors_device(monkeypatch):
    fresh = _fresh_loader(monkeypatch)
    with torch.cuda.device(0):
        assert ops.cuda_refusal(torch.empty(0, device="cuda:1", dtype=torch.float16)) == ""
        assert torch.cuda.current_device() == 0
    assert list(fresh.checks) == ["cuda:1"]


def test_first_call_inside_a_graph_capture_defers_the_self_check(monkeypatch):
    fresh = _fresh_loader(monkeypatch)
    t = torch.ones(8, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reason = ops.cuda_refusal(t)
        out = t * 2
    graph.replay()
    assert "deferred" in reason and not fresh.checks and bool((out == 2).all())
    assert ops.cuda_refusal(t) == "" and fresh.self_check_status().startswith("passed")


def _malformed(kind, dst, src, N):
    return {"repeated src": (dst, torch.cat([src[:1], src])),
            "out of range": (dst, torch.cat([src[:-1], src.new_tensor([N + 1000])])),
            "negative": (dst, torch.cat([src.new_tensor([-5]), src[1:]])),
            "dst also src": (dst, torch.cat([src[:-1], dst[:1]]))}[kind]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["repeated src", "out of range", "negative", "dst also src"])
def test_malformed_indices_never_corrupt_memory(kind, dtype, monkeypatch):
    """Without TOMESD_CHECK_INDICES the kernels stay inside their buffers (unspecified outputs, a
    live context); with it, the ops raise the CPU impls' ValueError."""
    metric, dst, src, _ = _case(2, 40, 36, 64, 2, 2, dtype, seed=21)
    N = metric.shape[1]
    bad_dst, bad_src = _malformed(kind, dst, src, N)
    r = len(bad_src)  # every src merges: the case that wrote out of bounds before
    monkeypatch.delenv("TOMESD_CHECK_INDICES", raising=False)
    OPS.best_dst(metric, bad_dst, bad_src)
    slot, counts, offsets, members = OPS.build_plan(metric, bad_dst, bad_src, r)
    x = torch.randn(2, N, 64, device="cuda", dtype=dtype)
    OPS.unmerge(OPS.merge(x, slot, offsets, members, True), slot, offsets, members)
    bad_slot = slot.clone()
    bad_slot[:, ::7] = 10**9
    OPS.unmerge(torch.randn(2, N - r, 64, device="cuda", dtype=dtype), bad_slot, offsets, members)
    OPS.merge(x, slot, offsets * 1000 - 7, members - 5, True)
    torch.cuda.synchronize()
    healthy, hdst, hsrc, hr = _case(1, 8, 8, 8, 2, 2, torch.float32, seed=1)
    assert torch.equal(OPS.build_plan(healthy, hdst, hsrc, hr)[0], OPS.build_plan(healthy.cpu(), hdst.cpu(), hsrc.cpu(), hr)[0].cuda())
    monkeypatch.setenv("TOMESD_CHECK_INDICES", "1")
    with pytest.raises(ValueError, match="distinct token indices"):
        OPS.build_plan(metric, bad_dst, bad_src, r)
    with pytest.raises(ValueError, match="slot must be in"):
        OPS.unmerge(torch.randn(2, N - r, 64, device="cuda", dtype=dtype), bad_slot, offsets, members)


def test_batch_over_65535_rows():
    """The batch is folded into grid.x: 70,000 rows launch and match the PyTorch path."""
    metric, dst, src, r = _case(70_000, 4, 4, 8, 2, 2, torch.float16, seed=17)
    score, pos = OPS.best_dst(metric, dst, src)
    ref_score, _ = matching.best_dst(metric, dst, src)
    torch.testing.assert_close(score, ref_score, atol=SCORE_TOL[torch.float16], rtol=0)
    slot = OPS.build_plan(metric, dst, src, r)[0]
    assert torch.equal(slot, matching.plan_from_matches(score, pos, dst, src, r, 16).slot)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_channels(dtype):
    """C = 0: every cosine is 0, the first dst wins (as the PyTorch path); no kernel reads a channel."""
    metric, dst, src, r = _case(2, 12, 10, 0, 2, 2, dtype, seed=19)
    score, pos = OPS.best_dst(metric, dst, src)
    ref_score, ref_pos = OPS.best_dst(metric.cpu(), dst.cpu(), src.cpu())
    assert torch.equal(score.cpu(), ref_score) and torch.equal(pos.cpu(), ref_pos)
    slot, counts, offsets, members = OPS.build_plan(metric, dst, src, r)
    assert bool(((slot >= 0) & (slot < 120 - r)).all()) and int(counts.sum()) == 2 * 120
    assert OPS.merge(metric, slot, offsets, members, True).shape == (2, 120 - r, 0)


def test_plan_kernel_has_no_shared_memory_races(tmp_path):
    """compute-sanitizer racecheck over build_plan (the radix select's sel_k handoff, the scans)."""
    import shutil
    import subprocess
    import sys

    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = ("import torch, tomesd\nfrom tomesd import matching\n"
              "dst, src = matching.partition(40, 36, 2, 2, None, 'cuda')\n"
              "m = torch.randn(2, 1440, 64, device='cuda', dtype=torch.float16)\n"
              "torch.ops.tomesd.build_plan(m, dst, src, 700)\ntorch.cuda.synchronize()\n")
    proc = subprocess.run([sanitizer, "--tool", "racecheck", "--error-exitcode", "3", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# ---- local matching (match_window): csrc/local.cu ----

LOCAL_SHAPES = [(2, 64, 48, 40, 2, 2, 5), (3, 17, 9, 77, 3, 2, 3), (1, 128, 128, 320, 2, 2, 3), (2, 13, 21, 8, 2, 2, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOCAL_SHAPES)
def test_local_matching_matches_torch_path(shape, dtype):
    B, h, w, C, sx, sy, k = shape
    metric, dst, src, r = _case(B, h, w, C, sx, sy, dtype, seed=31)
    win = matching.LocalWindow(h, w, sx, sy, k)
    score, pos = OPS.best_dst_local(metric, dst, src, h, w, sx, sy, k)
    ref_score, ref_pos = matching.best_dst_local(metric.cpu(), dst.cpu(), src.cpu(), win)
    torch.testing.assert_close(score.cpu(), ref_score, atol=SCORE_TOL[dtype], rtol=0)
    reason = selfcheck.check_matches(metric.cpu(), dst.cpu(), src.cpu(), score.cpu(), pos.cpu(), SCORE_TOL[dtype],
                                      (ref_score, ref_pos), "best_dst_local")
    assert reason == ""
    slot = ops.build_plan(metric, dst, src, r, win).slot
    assert torch.equal(slot.cpu(), matching.plan_from_matches(score.cpu(), pos.cpu(), dst.cpu(), src.cpu(), r,
                                                              h * w).slot)


def test_local_kernel_with_a_whole_grid_window_equals_the_global_kernel():
    metric, dst, src, r = _case(2, 24, 20, 64, 2, 2, torch.float32, seed=33)
    score, pos = OPS.best_dst_local(metric, dst, src, 24, 20, 2, 2, 23)  # the op itself, not ops' shortcut
    glob_score, glob_pos = matching.best_dst(metric.cpu(), dst.cpu(), src.cpu())
    torch.testing.assert_close(score.cpu(), glob_score, atol=SCORE_TOL[torch.float32], rtol=0)
    assert (pos.cpu() != glob_pos).float().mean() < 0.01


def test_local_matching_opcheck_empty_and_zero_channels():
    metric, dst, src, r = _case(2, 16, 12, 32, 2, 2, torch.float16, seed=35)
    opcheck(OPS.best_dst_local, (metric, dst, src, 16, 12, 2, 2, 3))
    opcheck(OPS.build_plan_local, (metric, dst, src, 16, 12, 2, 2, 3, r))
    empty = OPS.build_plan_local(metric[:0], dst, src, 16, 12, 2, 2, 3, r)
    assert [tuple(t.shape) for t in empty] == [(0, 192), (0, 192 - r), (0, 193 - r), (0, 192)]
    zero = metric[..., :0]
    score, pos = OPS.best_dst_local(zero, dst, src, 16, 12, 2, 2, 3)
    ref = OPS.best_dst_local(zero.cpu(), dst.cpu(), src.cpu(), 16, 12, 2, 2, 3)
    assert torch.equal(score.cpu(), ref[0]) and torch.equal(pos.cpu(), ref[1])


@pytest.mark.parametrize("kind", ["repeated src", "out of range", "negative", "dst also src"])
def test_local_kernel_stays_in_bounds_on_malformed_indices(kind, monkeypatch):
    metric, dst, src, _ = _case(2, 40, 36, 64, 2, 2, torch.float16, seed=37)
    bad_dst, bad_src = _malformed(kind, dst, src, metric.shape[1])
    monkeypatch.delenv("TOMESD_CHECK_INDICES", raising=False)
    OPS.best_dst_local(metric, bad_dst, bad_src, 40, 36, 2, 2, 3)
    OPS.build_plan_local(metric, bad_dst, bad_src, 40, 36, 2, 2, 3, len(bad_src))
    torch.cuda.synchronize()
    healthy, hdst, hsrc, hr = _case(1, 8, 8, 8, 2, 2, torch.float32, seed=1)
    want = OPS.build_plan_local(healthy.cpu(), hdst.cpu(), hsrc.cpu(), 8, 8, 2, 2, 3, hr)[0]
    assert torch.equal(OPS.build_plan_local(healthy, hdst, hsrc, 8, 8, 2, 2, 3, hr)[0].cpu(), want)


def test_patched_unet_with_local_matching_on_cuda(monkeypatch, request):
    """fp16 UNet, match_window=3: compiled equals eager, and the plans are the local kernel's."""
    torch._dynamo.reset()
    unet, args, kwargs = _patched_unet()
    with torch.no_grad():
        glob = unet(*args, **kwargs).sample
    tomesd.apply_patch(unet, ratio=0.5, seed=1, match_window=3)
    seen = request.getfixturevalue("recorded_plans")
    with torch.no_grad():
        eager = unet(*args, **kwargs).sample
    monkeypatch.undo()
    assert seen and all(window == matching.LocalWindow(16, 16, 2, 2, 3) for *_, window, _ in seen)
    for metric, dst, src, r, window, plan in seen:
        score, pos = OPS.best_dst_local(metric, dst, src, 16, 16, 2, 2, 3)
        assert torch.equal(plan.slot, matching.plan_from_matches(score, pos, dst, src, r, 256).slot)
    assert torch.isfinite(eager).all() and not torch.equal(eager, glob)
    with torch.no_grad():
        out = torch.compile(unet)(*args, **kwargs).sample
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prop_attn_channel_form_equals_mask_form_on_cuda(dtype, monkeypatch):
    """MMDiT joint attention on CUDA takes the head-channel form (SDPA's flash kernels): equal to the mask."""
    from tomesd import prop_attention

    assert prop_attention.choose_form("cuda") == "channel"
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", generator=g).to(dtype) for _ in range(3))
    log_size = torch.randint(1, 9, (2, 256), device="cuda", generator=g).float().log()
    mask = prop_attention.prop_attention(q, k, v, log_size, form="mask")
    channel = prop_attention.prop_attention(q, k, v, log_size, form="channel")
    torch.testing.assert_close(channel, mask, rtol=2e-2, atol=2e-2)
    model, inputs = tiny.sd3(), tiny.sd3_inputs()
    model = model.to("cuda", dtype)
    inputs = {n: v.to("cuda", dtype) if torch.is_floating_point(v) else v.to("cuda") for n, v in inputs.items()}
    tomesd.apply_patch(model, ratio=0.5, seed=2, mode="kv", prop_attn=True)
    with torch.no_grad():
        got = model(**inputs).sample
        monkeypatch.setattr(prop_attention, "choose_form", lambda device: "mask")
        want = model(**inputs).sample
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("mode", ["tokens", "kv"])
def test_unet_prop_attn_takes_the_channel_form_on_cuda(mode, monkeypatch):
    """A UNet's self-attention on CUDA (torch's SDPA processor) takes prop_attn as the extra head channel,
    equal to the mask form to fp16 rounding."""
    from tomesd import prop_attention

    unet = tiny.unet().to("cuda", torch.float16)
    args, kwargs = tiny.unet_inputs("sd1", dtype=torch.float16)
    args = tuple(a.to("cuda") for a in args)
    kwargs = {n: v.to("cuda") for n, v in kwargs.items()}
    tomesd.apply_patch(unet, ratio=0.5, seed=2, mode=mode, prop_attn=True)
    forms = []
    real = prop_attention.prop_attention
    monkeypatch.setattr(prop_attention, "prop_attention", lambda *a, **k: forms.append(a[5]) or real(*a, **k))
    with torch.no_grad():
        got = unet(*args, **kwargs).sample
        assert forms and set(forms) == {"channel"}
        monkeypatch.setattr(prop_attention, "choose_form", lambda device: "mask")
        want = unet(*args, **kwargs).sample
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)

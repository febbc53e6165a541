"""The kernels' load-time self-check on a GPU (needs one; skipped without): it passes, runs under a CUDA
default device and on the tensor's own device; a first call inside a graph capture records the PyTorch
path and says so, and local matching's cache keeps nothing made inside a capture."""
import pytest
import torch

from tomesd import matching, ops
from tomesd.ops import loader, selfcheck

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_kernels")]


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


def test_first_call_inside_a_graph_capture_records_the_pytorch_path_and_says_so(monkeypatch):
    fresh = _fresh_loader(monkeypatch)
    t = torch.ones(8, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(RuntimeWarning, match="the capture records the PyTorch path"):
        with torch.cuda.graph(graph):
            reason = ops.cuda_refusal(t)
            out = t * 2
    graph.replay()
    assert "before this CUDA-graph capture" in reason and not fresh.checks and bool((out == 2).all())
    assert ops.prepare(t.device) == "" and fresh.self_check_status().startswith("passed")


def test_local_matching_inside_a_capture_caches_nothing(monkeypatch):
    """A neighbourhood built inside a capture holds its values only once the graph replays: an eager
    call before the first replay must not find it cached."""
    monkeypatch.setenv("TOMESD_BACKEND", "torch")
    metric = torch.randn(2, 256, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    dst, src = matching.partition(16, 16, 2, 2, None, "cuda")
    win = matching.LocalWindow(16, 16, 2, 2, 3)
    want = ops.build_plan(metric.cpu(), dst.cpu(), src.cpu(), 100, win).slot
    side = torch.cuda.Stream()  # warm-up outside the capture (cuBLAS, allocator), as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.build_plan(metric, dst, src, 100, win)
    torch.cuda.current_stream().wait_stream(side)
    monkeypatch.setattr(matching, "NEIGHBOURHOODS", matching.NeighbourhoodCache())  # empty again
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.build_plan(metric, dst, src, 100, win)
    assert matching.NEIGHBOURHOODS.keys() == ()
    eager = ops.build_plan(metric, dst, src, 100, win)  # before any replay
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager.slot.cpu(), want) and torch.equal(captured.slot.cpu(), want)

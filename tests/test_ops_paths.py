"""Which path the ops take, said in the user's process (issue 27 items 5, 14, 19): tomesd.ops.report() per
device and dtype with why, tomesd.info printing it; a CUDA-graph capture before the kernels were checked
records the PyTorch path, builds and checks nothing inside the capture, and says so; tomesd.ops.prepare()
checks ahead of a capture; local matching's neighbourhood cache is bounded, never filled inside a
capture, and emptied by remove_patch once no patch uses it. CUDA-side steps are faked through the
loader's seams (tests/loader_fakes.py), so everything runs on a CPU."""
import copy
import warnings

import torch

import tiny
import tomesd
from loader_fakes import fake_loader
from tomesd import info, matching, ops
from tomesd.matching import LocalWindow
from tomesd.ops import selfcheck

CPU_REFUSAL = "tensor is on cpu, not cuda"


def test_report_lists_the_path_calls_took_per_device_and_dtype(monkeypatch):
    ops.clear_report()
    metric = torch.randn(2, 64, 8)
    dst, src = matching.partition(8, 8, 2, 2, None, "cpu")
    plan = ops.build_plan(metric, dst, src, 16)
    ops.unmerge(ops.merge(metric.half(), plan), plan)
    assert ops.report() == [ops.PathRow("cpu", "float16", False, "torch", CPU_REFUSAL),
                            ops.PathRow("cpu", "float32", False, "torch", CPU_REFUSAL)]
    monkeypatch.setenv("TOMESD_BACKEND", "torch")
    ops.merge(metric, plan)
    assert ops.report()[1].reason == "TOMESD_BACKEND=torch"  # the latest reason
    rows = dict(info.report(build=False))
    assert rows["path cpu float32"] == "torch (TOMESD_BACKEND=torch)" and rows["path cpu float16"] == f"torch ({CPU_REFUSAL})"
    ops.clear_report()
    assert ops.report() == []


def test_info_probes_every_dtype_of_every_device(monkeypatch, tmp_path):
    fake_loader(monkeypatch, tmp_path, selfcheck.torch_kernels)
    monkeypatch.setattr(info, "cuda_devices", lambda: ["cuda:0", "cuda:1"])
    ops.clear_report()
    rows = dict(info.report(build=True))
    for device in ("cuda:0", "cuda:1"):
        for dtype in ("float16", "bfloat16", "float32"):
            assert rows[f"path {device} {dtype}"].startswith("cuda (kernels JIT-built into")
            assert f"self-check on {device}: passed" in rows[f"path {device} {dtype}"]
    assert "path cpu float32" not in rows  # a probe is not a call: only CUDA devices are probed


def test_a_capture_before_the_check_records_the_pytorch_path_and_says_so(monkeypatch, tmp_path):
    """Issue 27 item 5: the first calls inside a capture silently took the PyTorch path, and the JIT
    build ran inside the capture. Now nothing is built or checked there, one warning names
    tomesd.ops.prepare, and report() shows the path the capture recorded."""
    capture, built = {"on": True}, []
    fake = fake_loader(monkeypatch, tmp_path, selfcheck.torch_kernels, capturing=lambda d: capture["on"], built=built)
    ops.clear_report()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops.backend_for("cuda:0", torch.float16) == "torch"
        assert ops.backend_for("cuda:0", torch.float16) == "torch"
    assert not built and not fake.tried and not fake.checks  # no build, load or check inside the capture
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1 and "records the PyTorch path" in said[0] and "tomesd.ops.prepare('cuda:0')" in said[0]
    (row,) = ops.report()
    assert row[:4] == ("cuda:0", "float16", True, "torch") and "before this CUDA-graph capture" in row.reason
    capture["on"] = False
    assert ops.backend_for("cuda:0", torch.float16) == "cuda" and built  # the next call outside loads and checks
    capture["on"] = True
    assert ops.backend_for("cuda:0", torch.float16) == "cuda"  # once checked, a capture records the kernels
    assert [r[:4] for r in ops.report()] == [("cuda:0", "float16", False, "cuda"), ("cuda:0", "float16", True, "cuda"),
                                             ("cuda:0", "float16", True, "torch")]
    assert "self-check on cuda:0: passed" in ops.report()[0].reason


def test_prepare_loads_and_checks_ahead_of_a_capture(monkeypatch, tmp_path):
    checked = []
    fake = fake_loader(monkeypatch, tmp_path, selfcheck.torch_kernels, checked=checked)
    assert ops.prepare("cuda:1") == "" and list(fake.checks) == ["cuda:1"] and checked == [torch.device("cuda", 1)]
    monkeypatch.setenv("TOMESD_BACKEND", "torch")
    assert ops.prepare("cuda:0") == "TOMESD_BACKEND=torch" and list(fake.checks) == ["cuda:1"]


# ---- local matching's neighbourhood cache (tomesd.matching.NEIGHBOURHOODS) ----

def test_neighbourhood_cache_keeps_the_most_recently_used_shapes():
    """Issue 27 item 14: the cache never shrank (2 MiB per 2048 px size)."""
    cache = matching.NeighbourhoodCache(size=3)
    wins = [LocalWindow(8 + i, 8, 2, 2, 3) for i in range(5)]
    for win in wins[:3]:
        cache.get(win, "cpu")
    cache.get(wins[0], "cpu")  # used again: now the most recent
    cache.get(wins[3], "cpu")
    cache.get(wins[4], "cpu")
    assert [win for win, _ in cache.keys()] == [wins[0], wins[3], wins[4]]
    for k in range(1, 40, 2):
        matching.neighbourhood(LocalWindow(16, 16, 2, 2, k), "cpu")
    assert len(matching.NEIGHBOURHOODS.keys()) <= matching.NEIGHBOURHOOD_CACHE_SIZE <= 8


def test_neighbourhood_cache_is_not_used_inside_a_capture():
    """Issue 27 item 5: a neighbourhood built inside a capture holds its values only once the graph
    replays; cached, an eager call before the first replay read garbage."""
    capture = {"on": True}
    cache = matching.NeighbourhoodCache(capturing=lambda device: capture["on"])
    win = LocalWindow(12, 10, 2, 2, 3)
    inside = cache.get(win, "cpu")
    assert cache.keys() == ()
    capture["on"] = False
    outside = cache.get(win, "cpu")
    assert cache.keys() == ((win, "cpu"),) and all(torch.equal(a, b) for a, b in zip(inside, outside))
    capture["on"] = True
    assert cache.get(win, "cpu") is not outside  # a capture builds its own, even when one is cached


def test_remove_patch_empties_the_cache_once_no_patch_uses_it(monkeypatch):
    monkeypatch.setattr(matching, "NEIGHBOURHOODS", matching.NeighbourhoodCache())
    local, other, glob = tiny.unet("sd1"), tiny.unet("sd1"), tiny.unet("sd1")
    for model, window in ((local, 3), (other, 5), (glob, None)):
        tomesd.apply_patch(model, match_window=window)
    tiny.run(local)
    assert matching.NEIGHBOURHOODS.keys()
    twin = copy.deepcopy(other)
    for model in (glob, local, other):
        tomesd.remove_patch(model)
        assert matching.NEIGHBOURHOODS.keys()  # the twin (a copy of a patch with match_window) still uses it
    tomesd.remove_patch(twin)
    assert matching.NEIGHBOURHOODS.keys() == ()

"""ONNX (torch.onnx.export(dynamo=True), run by onnxruntime) and OpenVINO of patched denoisers against eager at two
timesteps, and examples/export.py. Skipped, with the reason, without the `[export]` extra."""
import importlib.util
import os

import pytest
import torch

import tiny
import tomesd
import tomesd.export as tx
from test_export import t2d, t2d_call, with_timestep
from tomesd.tools import cli

pytest.importorskip("onnxscript", reason="needs the [export] extra: pip install -e \".[export]\"")
ort = pytest.importorskip("onnxruntime", reason="needs the [export] extra: pip install -e \".[export]\"")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"defaults": {}, "local_prop_kv": dict(mode="kv", match_window=3, prop_attn=True),
            "preset": dict(ratio=0.9, sx=4, sy=4, prop_attn=True)}


def feeds(model, args, kwargs):
    """The call's tensors as numpy arrays by forward parameter name (what the ONNX inputs are called)."""
    from tomesd.tools import deploy

    return {k: v.numpy() for k, v in deploy.named_inputs(model, args, kwargs).items()}


def check(run, model, args, kwargs, timesteps, rtol=1e-4):
    """run(feeds) → output array equals the eager patched model at each timestep, to rtol of its scale."""
    for t in timesteps:
        a, kw = with_timestep(args, kwargs, t)
        with torch.no_grad():
            want = model(*a, **kw).sample
        got = torch.from_numpy(run(feeds(model, a, kw)))
        assert (got - want).abs().max() <= rtol * want.abs().max(), f"timestep {t}"


def onnxruntime_run(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda f: session.run(None, {k: f[k] for k in names})[0]


@pytest.fixture(scope="module", params=list(SETTINGS))
def exported(request, tmp_path_factory):
    """(patched model, ONNX path, example args, kwargs) of a one-block Transformer2DModel per setting."""
    model = tomesd.apply_patch(t2d(), seed=5, **SETTINGS[request.param])
    args, kwargs = t2d_call()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    if request.param == "defaults":  # the plain call: on a CPU the graph is ATen only already
        torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, verbose=False)
    else:
        with tx.exporting(model, args, kwargs, ops="aten"):
            torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, verbose=False)
    return model, path, args, kwargs


def test_onnxruntime_equals_eager(exported):
    model, path, args, kwargs = exported
    check(onnxruntime_run(path), model, args, kwargs, (500.0, 250.0))


def test_openvino_runs_the_onnx_model(exported):
    ov = pytest.importorskip("openvino", reason="needs the [export] extra: pip install -e \".[export]\"")
    model, path, args, kwargs = exported
    compiled = ov.Core().compile_model(str(path), "CPU")
    names = [i.get_any_name() for i in compiled.inputs]
    check(lambda f: compiled([f[k] for k in names])[0], model, args, kwargs, (500.0, 250.0))


@pytest.mark.slow
def test_openvino_converts_the_exported_program():
    ov = pytest.importorskip("openvino", reason="needs the [export] extra: pip install -e \".[export]\"")
    model = tomesd.apply_patch(t2d(), seed=5, match_window=3, prop_attn=True)
    args, kwargs = t2d_call()
    program = tx.export(model, args, kwargs, ops="aten").run_decompositions()
    compiled = ov.Core().compile_model(ov.convert_model(program), "CPU")
    check(lambda f: compiled([f["hidden_states"], f["timestep"]])[0], model, args, kwargs, (500.0, 250.0))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["unet", "flux"])
def test_onnx_model_families(family, tmp_path):
    if family == "unet":
        model = tomesd.apply_patch(tiny.unet("sd1"), seed=0)
        args, kwargs = tiny.unet_inputs("sd1")
        times = (500, 250)
    else:
        model = tomesd.apply_patch(tiny.flux(), seed=0)
        args, kwargs = (), tiny.flux_inputs(grid=4, width=8)
        times = (0.5, 0.25)
    with tx.exporting(model, args, kwargs):
        torch.onnx.export(model, args, str(tmp_path / "m.onnx"), kwargs=kwargs, dynamo=True, verbose=False)
    check(onnxruntime_run(tmp_path / "m.onnx"), model, args, kwargs, times)


def _example():
    spec = importlib.util.spec_from_file_location("export_example", os.path.join(ROOT, "examples", "export.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_missing_package_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "available", lambda name: name != "onnxruntime")
    assert _example().main(["--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['export.py: error: the onnx format needs onnxruntime: pip install -e ".[export]"']


@pytest.mark.slow
def test_example_runs(capsys):
    assert _example().main(["--format", "torch", "--arch", "tiny", "--size", "64", "--rounds", "2", "--calls", "1",
                            "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "max relative error" in out and "speed-up" in out and "noise band" in out
    error = float(out.split("eager patched: ")[1].split()[0])
    assert error <= 1e-5

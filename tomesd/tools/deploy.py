"""Exported denoisers as callables, for examples/export.py and benchmarks/bench_export.py.

`build(model, args, kwargs, fmt, workdir)` exports `model` (patched or not) with its example inputs to one
format and returns a callable taking the same (args, kwargs) and returning the output tensor:
- "torch": `tomesd.export.export` (torch.export), run as `ExportedProgram.module()`;
- "aoti": that program compiled by AOTInductor (`torch._inductor.aoti_compile_and_package`, a C++
  compiler), loaded with `aoti_load_package`;
- "onnx": `torch.onnx.export(..., dynamo=True)` with the ATen graph (`ops="aten"`), run by onnxruntime;
- "openvino": that ONNX file compiled by OpenVINO for its CPU plugin.
`missing(fmt)` says in one line which optional package a format lacks ("" if none). `interleaved` times
several callables in interleaved rounds (tomesd.tools.timing.time_calls) and gives each one's median and
speed-up band against the first.
"""
from __future__ import annotations

import inspect
import os
import statistics
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .. import export as tome_export
from . import timing
from . import cli

FORMATS = ("torch", "aoti", "onnx", "openvino")
NEEDS = {"torch": (), "aoti": (), "onnx": ("onnx", "onnxscript", "onnxruntime"),
         "openvino": ("onnx", "onnxscript", "openvino")}
Runner = Callable[..., torch.Tensor]


def missing(fmt: str) -> str:
    """One line naming the packages format `fmt` needs that are not installed ("" if none)."""
    absent = [name for name in NEEDS[fmt] if not cli.available(name)]
    if not absent:
        return ""
    return f"the {fmt} format needs {', '.join(absent)}: pip install -e \".[export]\""


def output_tensor(out) -> torch.Tensor:
    """The sample of a denoiser's output: `.sample`, the first of a tuple / list, or the tensor itself."""
    out = getattr(out, "sample", out)
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def named_inputs(model, args: tuple, kwargs: dict) -> Dict[str, torch.Tensor]:
    """The call's tensors by the names of the model's forward parameters (ONNX inputs carry them)."""
    return _tensors(inspect.signature(model.forward), args, kwargs)


def _tensors(signature: inspect.Signature, args: tuple, kwargs: dict) -> Dict[str, torch.Tensor]:
    bound = signature.bind(*args, **kwargs).arguments
    return {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}


def build(model, args: tuple, kwargs: dict, fmt: str, workdir: str) -> Runner:
    """`model` exported to `fmt` with these example inputs, as a callable(*args, **kwargs) → tensor."""
    if fmt in ("torch", "aoti"):
        program = tome_export.export(model, args, kwargs)
        if fmt == "torch":
            module = program.module()
            return lambda *a, **kw: output_tensor(module(*a, **kw))
        package = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(workdir, "model.pt2"))
        compiled = torch._inductor.aoti_load_package(package)
        return lambda *a, **kw: output_tensor(compiled(*a, **kw))
    path = os.path.join(workdir, "model.onnx")
    with tome_export.exporting(model, args, kwargs, ops="aten"):
        torch.onnx.export(model, tuple(args), path, kwargs=kwargs, dynamo=True, verbose=False)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        run = lambda feeds: session.run(None, {k: feeds[k] for k in names})[0]  # noqa: E731
    else:
        import openvino

        compiled = openvino.Core().compile_model(path, "CPU")
        names = [i.get_any_name() for i in compiled.inputs]
        run = lambda feeds: compiled([feeds[k] for k in names])[0]  # noqa: E731

    signature = inspect.signature(model.forward)  # the runner keeps this, not the model (its weights)

    def runner(*a, **kw):
        feeds = {k: v.detach().cpu().numpy() for k, v in _tensors(signature, a, kw).items()}
        return torch.from_numpy(run(feeds))

    return runner


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want|."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def interleaved(runners: Sequence[Runner], args: tuple, kwargs: dict, rounds: int, calls: int,
                warmup: int) -> List[dict]:
    """Per runner: its milliseconds per call in each round (rounds of `calls` calls, every runner in turn,
    the timestep changing as in a sampler), their median, and the speed-up band against runners[0]."""
    times: List[List[float]] = [[] for _ in runners]
    for r in range(rounds):
        for i, runner in enumerate(runners):
            times[i] += timing.time_calls(runner, args, kwargs, calls=calls, warmup=warmup if r == 0 else 0,
                                          first=r * calls)
    base = statistics.median(times[0])
    return [dict(ms=t, median_ms=statistics.median(t), speedup=base / statistics.median(t),
                 **timing.noise_band(times[0], t)) for t in times]


def unet_call(config: dict, size_px: int, batch: int, text_len: int, seed: int = 0) -> Tuple[tuple, dict]:
    """(args, kwargs) of a UNet2DConditionModel(**config) call at size_px (latent = size_px / 8)."""
    g = torch.Generator().manual_seed(seed)
    side = size_px // 8
    sample = torch.randn(batch, config.get("in_channels", 4), side, side, generator=g)
    text = torch.randn(batch, text_len, config["cross_attention_dim"], generator=g)
    return (sample, torch.tensor(999)), dict(encoder_hidden_states=text)

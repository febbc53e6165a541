"""diffusers' compile-test properties on patched models (tiny UNet, SD 3, Flux in kv and tokens mode): a
patched model compiles as often as the unpatched one (no recompilation across calls, error_on_recompile),
with no graph break (fullgraph=True, batch 1 and 2), logs what it logs once, and merges while compiled."""
import logging

import pytest
import torch

import tiny
import tomesd

pytestmark = pytest.mark.slow


def _model(kind, batch):
    if kind == "unet":
        args, kwargs = tiny.unet_inputs("sd1", batch=batch)
        return tiny.unet("sd1"), dict(sample=args[0], timestep=args[1], **kwargs)
    return getattr(tiny, kind)(), getattr(tiny, kind + "_inputs")(batch=batch)


FLUX_TOKENS = dict(mode="tokens", prop_attn=True, merge_mlp=True, share_plan=True, match_window=3)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", ["unet", "sd3", "flux", "flux tokens"])
def test_patched_model_compiles_once_fullgraph(kind, batch):
    model, inputs = _model(kind.split()[0], batch)
    with torch.no_grad():
        plain = model(**inputs).sample
        tomesd.apply_patch(model, ratio=0.5, seed=0, **(FLUX_TOKENS if kind == "flux tokens" else {}))
        eager = model(**inputs).sample
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs = [compiled(**inputs).sample for _ in range(3)]
    assert not torch.allclose(eager, plain, atol=1e-4)  # merging is in effect
    for out in outs:
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_batch_one_logs_once_under_fullgraph(caplog):
    model, inputs = tiny.sd3(), tiny.sd3_inputs(batch=1)
    tomesd.apply_patch(model, ratio=0.5, seed=0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with caplog.at_level(logging.INFO, logger="tomesd"), torch.no_grad():
        for _ in range(3):
            compiled(**inputs)
    odd = [r for r in caplog.records if "batch of odd size" in r.getMessage()]
    assert len(odd) == 1


def test_compiled_flux_kv_runs_and_merges():
    """Plain torch.compile of a patched Flux (kv mode, prop_attn): its first call used to raise about an
    attention mask (a graph break inside the joint attention's interception)."""
    model, inputs = tiny.flux(), tiny.flux_inputs()
    with torch.no_grad():
        plain = model(**inputs).sample
        tomesd.apply_patch(model, ratio=0.5, seed=0)
        eager = model(**inputs).sample
        torch._dynamo.reset()
        out = torch.compile(model, backend="eager")(**inputs).sample
    assert not torch.allclose(eager, plain, atol=1e-4)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_flux_img_ids_read_once_per_tensor(monkeypatch):
    """A pipeline passes the same img_ids at every step: they are read (a host sync) once."""
    from tomesd.patch.hosts import mmdit

    reads = []
    layout = mmdit.ids_layout
    monkeypatch.setattr(mmdit, "ids_layout", lambda ids: reads.append(1) or layout(ids))
    model, inputs = tiny.flux(), tiny.flux_inputs()
    tomesd.apply_patch(model, ratio=0.5)
    with torch.no_grad():
        for _ in range(3):
            model(**inputs)
    assert len(reads) == 1


@pytest.mark.parametrize("kwargs", [{}, FLUX_TOKENS])
def test_compile_repeated_blocks_shares_compiled_code_between_blocks(kwargs):
    """Regional compilation (diffusers' compile_repeated_blocks) of a patched Flux with 10 + 10 blocks (kv
    mode, and tokens mode with whole single-stream blocks): the hooks carry no per-block constant and the
    attention keeps one processor type, so the number of compiles does not grow with the number of blocks
    (a recompile limit of 4 fails otherwise)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**dict(tiny.FLUX_TRANSFORMER, num_layers=10, num_single_layers=10)).eval()
    inputs = tiny.flux_inputs(batch=2)
    with torch.no_grad():
        plain = model(**inputs).sample
        tomesd.apply_patch(model, ratio=0.5, seed=0, **kwargs)
        eager = model(**inputs).sample
        torch._dynamo.reset()
        model.compile_repeated_blocks(backend="eager", fullgraph=True)
        with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
            outs = [model(**inputs).sample for _ in range(2)]
    assert not torch.allclose(eager, plain, atol=1e-4)
    for out in outs:
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def _graph_breaks(model, inputs, grad):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch.set_grad_enabled(grad):
        torch.compile(model, backend="eager")(**inputs)
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("kind", ["unet", "flux"])
def test_compiled_training_records_blocks_without_graph_breaks(kind):
    """With gradients on (compiled training), each merged block records its input for checkpoint
    recomputes inside the graph: the only break gradients add is one at the root's end, where the call
    is kept for its recomputes, however many blocks merge (torch._dynamo's graph-break counter)."""
    model, inputs = _model(kind, 2)
    tomesd.apply_patch(model, ratio=0.5, seed=0)
    assert _graph_breaks(model, inputs, grad=True) <= _graph_breaks(model, inputs, grad=False) + 1


def test_dynamic_shapes_give_eager_results_and_one_compile_per_size():
    """torch.compile(dynamic=True) across latent sizes: results equal eager; each new size compiles once
    (the call's size is read by the root hook outside the graph: README, Limitations), a size seen before
    does not compile again."""
    from torch._dynamo.utils import counters

    unet = tiny.unet("sd1")
    tomesd.apply_patch(unet, ratio=0.5, seed=0)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="eager", dynamic=True)
    seen = []
    for size in (16, 24, 16, 24):
        args, kwargs = tiny.unet_inputs("sd1", size=size)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*args, **kwargs).sample, unet(*args, **kwargs).sample,
                                       rtol=1e-4, atol=1e-4)
        seen.append(counters["stats"]["unique_graphs"])
    assert seen[2:] == [seen[1], seen[1]] and seen[1] > seen[0]

"""torch.export of patched denoisers (tomesd.export): every model family and static option computes what the
eager patched model computes at two timesteps (exported at one, run at both: the random dst choice is a
function of the timestep input, not baked), the refusals, the ops in the graph, AOTInductor, and the keys an
exported graph computes."""
import pytest
import torch

import tiny
import tomesd
import tomesd.export as tx
from tomesd import keys


def t2d(seed: int = 0):
    """A one-block Transformer2DModel: the smallest denoiser with a timestep argument (a 16 × 16 latent)."""
    from diffusers import Transformer2DModel

    torch.manual_seed(seed)
    return Transformer2DModel(in_channels=32, num_attention_heads=2, attention_head_dim=16, norm_num_groups=8,
                              num_layers=1).eval()


def t2d_call(t=500.0):
    return (torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(1)),), dict(timestep=torch.tensor(t))


def with_timestep(args, kwargs, t):
    """(args, kwargs) with the timestep (the second positional argument, or `timestep`) set to t."""
    if "timestep" in kwargs:
        return args, {**kwargs, "timestep": torch.full_like(kwargs["timestep"], t)}
    return (args[0], torch.full_like(args[1], t), *args[2:]), kwargs


def assert_matches_eager(program, model, args, kwargs, timesteps, rtol=1e-5):
    """The exported program equals the eager patched model at each timestep (relative to the output's scale)."""
    module = program.module()
    for t in timesteps:
        a, kw = with_timestep(args, kwargs, t)
        with torch.no_grad():
            want = model(*a, **kw).sample
            got = module(*a, **kw).sample
        assert (got - want).abs().max() <= rtol * want.abs().max(), f"timestep {t}"


def graph_targets(program) -> set:
    """str of every op called in the program, nested graphs (no_grad regions) included."""
    return {str(n.target) for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function"}


OPTIONS = {
    "defaults": {},
    "mapping": dict(ratio={64: 0.3, 256: 0.6}),
    "callable": dict(ratio=lambda h, w: 0.6 if h * w >= 128 * 128 else 0.2),
    "preset": dict(ratio=0.9, sx=4, sy=4, prop_attn=True),
    "local": dict(match_window=3, prop_attn=True),
    "kv": dict(mode="kv"),
    "share_mlp": dict(share_plan=True, merge_mlp=True, merge_crossattn=False),
    "no_rand": dict(use_rand=False),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_static_option_exports(name):
    model = tomesd.apply_patch(t2d(), seed=3, **OPTIONS[name])
    args, kwargs = t2d_call()
    program = torch.export.export(model, args, kwargs=kwargs)  # grad mode on, as a user would
    assert_matches_eager(program, model, args, kwargs, (500.0, 250.0))


def test_strict_export():
    model = tomesd.apply_patch(t2d(), seed=3, prop_attn=True, match_window=3)
    args, kwargs = t2d_call()
    program = torch.export.export(model, args, kwargs=kwargs, strict=True)
    assert_matches_eager(program, model, args, kwargs, (500.0, 250.0))


def test_exported_program_merges():
    """The exported program is not the unpatched model: it differs from it as the eager patched one does."""
    model = t2d()
    args, kwargs = t2d_call()
    with torch.no_grad():
        plain = model(*args, **kwargs).sample
    tomesd.apply_patch(model, seed=3)
    program = torch.export.export(model, args, kwargs=kwargs)
    with torch.no_grad():
        got = program.module()(*args, **kwargs).sample
    assert (got - plain).abs().max() > 1e-3
    tomesd.remove_patch(model)
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs).sample, plain)


@pytest.mark.parametrize("arch", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_unet_exports(arch):
    model = tomesd.apply_patch(tiny.unet(arch), seed=0)
    args, kwargs = tiny.unet_inputs(arch)
    program = torch.export.export(model, args, kwargs=kwargs)
    assert_matches_eager(program, model, args, kwargs, (500, 250))


@pytest.mark.slow
def test_unet_strict_export():
    model = tomesd.apply_patch(tiny.unet("sd1"), seed=0, ratio=0.6, prop_attn=True)
    args, kwargs = tiny.unet_inputs("sd1")
    program = torch.export.export(model, args, kwargs=kwargs, strict=True)
    assert_matches_eager(program, model, args, kwargs, (500, 250))


@pytest.mark.parametrize("mode", ["tokens", pytest.param("kv", marks=pytest.mark.slow)])
def test_sd3_exports(mode):
    model = tomesd.apply_patch(tiny.sd3(), seed=0, mode=mode)
    kwargs = tiny.sd3_inputs()
    program = torch.export.export(model, (), kwargs=kwargs)
    assert_matches_eager(program, model, (), kwargs, (500.0, 250.0))


@pytest.mark.parametrize("strict", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_flux_exports_with_its_layout(strict):
    """Flux reads its token layout from img_ids' values: tomesd.export.export reads them from the example
    inputs (a non-square grid, so a layout guessed from the token count would be wrong)."""
    model = tomesd.apply_patch(tiny.flux(), seed=0)
    kwargs = tiny.flux_inputs(grid=4, width=8)
    program = tx.export(model, (), kwargs, strict=strict)
    assert_matches_eager(program, model, (), kwargs, (0.5, 0.25))


def test_flux_plain_export_says_how():
    model = tomesd.apply_patch(tiny.flux(), seed=0)
    with pytest.raises(RuntimeError, match="tomesd.export.export"):
        torch.export.export(model, (), kwargs=tiny.flux_inputs())


REFUSED = {"plan_every": dict(plan_every=2),
           "ratio": dict(ratio=lambda h, w, timestep: 0.5 if timestep > 300 else 0.2)}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("option", list(REFUSED))
def test_options_that_cannot_export_are_refused(option, strict):
    model = tomesd.apply_patch(t2d(), **REFUSED[option])
    args, kwargs = t2d_call()
    with pytest.raises(ValueError, match=f"cannot be exported: {option}"):
        torch.export.export(model, args, kwargs=kwargs, strict=strict)
    with pytest.raises(ValueError, match=f"cannot be exported: {option}"):  # before tracing starts
        tx.export(model, args, kwargs)
    with torch.no_grad():  # the eager model still runs
        model(*args, **kwargs)


def test_graph_ops_choice():
    """ops="tomesd": the graph holds the tomesd:: custom ops (traced through their fake impls) and computes what
    eager computes; "aten" and the CPU default: ATen ops only."""
    model = tomesd.apply_patch(t2d(), seed=3, prop_attn=True)
    args, kwargs = t2d_call()
    custom = tx.export(model, args, kwargs, ops="tomesd")
    assert {"tomesd.build_plan.default", "tomesd.merge.default", "tomesd.unmerge.default"} <= graph_targets(custom)
    assert_matches_eager(custom, model, args, kwargs, (500.0, 250.0))
    for ops in ("aten", "auto"):
        program = tx.export(model, args, kwargs, ops=ops)
        assert not [t for t in graph_targets(program) if t.startswith("tomesd")], ops
    local = tomesd.apply_patch(t2d(), seed=3, match_window=3)
    assert "tomesd.build_plan_local.default" in graph_targets(tx.export(local, args, kwargs, ops="tomesd"))


def test_graph_ops_bad_kind():
    with pytest.raises(ValueError, match="auto, aten, tomesd"):
        with tomesd.ops.graph_ops("onnx"):
            pass
    with pytest.raises(ValueError, match="ops must be one of"):
        tx.export(t2d(), *t2d_call(), ops="cuda")


def test_unpatched_model_exports_through_the_helper():
    model = t2d()
    args, kwargs = t2d_call()
    program = tx.export(model, args, kwargs, ops="aten")
    assert_matches_eager(program, model, args, kwargs, (500.0,))


def test_float32_bits_without_bitcast():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(-2 ** 31, 2 ** 31, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0, 1, 0x007FFFFF, 0x00800000, 0x3F7FFFFF, 0x3F800000, 0x7F7FFFFF, 0x7F800000, -2 ** 31,
                          0x43FA0000], dtype=torch.int64).to(torch.int32)  # zero, subnormals, 1, max, inf, -0, 500
    raw = torch.cat([raw, edges])
    x = raw.view(torch.float32)
    keep = ~torch.isnan(x)
    want = raw.to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(keys.float32_bits(x)[keep], want[keep])


@pytest.mark.parametrize("t", [0, 999, 500.0, 0.5, 1e-3, 3e-40, -0.0, float("inf")])
def test_limb_keys_equal_int_keys(t):
    """Exported graphs carry keys as 16-bit limbs: the same step, block and cell keys as eager's int64 ones."""
    base = keys.base_key(1234)
    whole = keys.step_key(base, torch.tensor(t), "cpu")
    limbs = keys.step_key(base, torch.tensor(t), "cpu", limbs=True)
    assert int(whole) == int(limbs[0]) * 65536 + int(limbs[1])
    for index in (0, 5, 4000):
        a, b = keys.block_key(whole, index), keys.block_key(limbs, index)
        assert int(a) == int(b[0]) * 65536 + int(b[1])
        for cells, n in ((64, 4), (70_000, 16), (33, 6)):
            assert torch.equal(keys.cell_choices(a, cells, n, "cpu"), keys.cell_choices(b, cells, n, "cpu"))


@pytest.mark.slow
def test_aot_inductor_runs_and_equals_eager(tmp_path):
    model = tomesd.apply_patch(t2d(), seed=3, prop_attn=True, match_window=3)
    args, kwargs = t2d_call()
    program = tx.export(model, args, kwargs)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for t in (500.0, 250.0):
        a, kw = with_timestep(args, kwargs, t)
        with torch.no_grad():
            want = model(*a, **kw).sample
            got = compiled(*a, **kw)
        got = getattr(got, "sample", got)
        got = got[0] if isinstance(got, (tuple, list)) else got
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), f"timestep {t}"

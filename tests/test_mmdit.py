"""SD 3 and Flux alike (MMDiT): the joint attention against attention written out, the pipelines after a
save / load, their ControlNets, the high-resolution example and the benchmark on them."""
import logging

import pytest
import torch
import torch.nn.functional as F

import tiny
import tomesd
from mmdit_helpers import needs_split_single_blocks
from tomesd.patch import patched_state


@pytest.mark.parametrize("kind,mode", [("sd3", None), pytest.param("flux", None, marks=needs_split_single_blocks),
                                       pytest.param("flux", "tokens", marks=needs_split_single_blocks)])
def test_pipelines_after_save_and_load(kind, mode, tmp_path, caplog):
    from diffusers import DiffusionPipeline

    tiny.mmdit_pipeline(kind, tmp_path / "tok").save_pretrained(tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a cat", height=32, width=48, num_inference_steps=2, output_type="pt", max_sequence_length=16)

    def images():
        return pipe(generator=torch.Generator().manual_seed(0), **call).images

    want = images()
    tomesd.apply_patch(pipe, ratio=0.5, mode=mode)
    assert tomesd.is_patched(pipe) and tomesd.is_patched(pipe.transformer)
    with caplog.at_level(logging.WARNING, logger="tomesd"):
        got = images()
    ours = [r.getMessage() for r in caplog.records if r.name == "tomesd"]
    assert not ours, ours
    assert got.shape == want.shape == (1, 3, 32, 48) and not torch.equal(got, want)
    tomesd.remove_patch(pipe)
    assert torch.equal(images(), want)


@pytest.mark.parametrize("image_first", [True, False])
@pytest.mark.parametrize("merge_kv", [True, False])
def test_joint_sdpa_merges_the_image_keys_and_biases_their_logits(image_first, merge_kv):
    """Against attention written out: softmax(q·k/√d + log size) over [merged image keys, text keys]."""
    from tomesd.matching import build_plan, merge, partition
    from tomesd.patch.hosts.sdpa import joint_attention

    g = torch.Generator().manual_seed(0)
    B, H, N, T, D = 2, 2, 16, 3, 8
    tokens = torch.randn(B, N, H * D, generator=g)
    dst, src = partition(4, 4, 2, 2, None, "cpu")
    plan = build_plan(tokens, dst, src, 7)
    n = N if merge_kv else plan.num_out
    q = torch.randn(B, H, n + T, D, generator=g)
    k, v = torch.randn(B, H, n + T, D, generator=g), torch.randn(B, H, n + T, D, generator=g)
    img = slice(0, n) if image_first else slice(T, T + n)
    txt = slice(n, n + T) if image_first else slice(0, T)

    def heads(t):
        if not merge_kv:
            return t
        return merge(t.transpose(1, 2).reshape(B, N, H * D), plan).view(B, -1, H, D).transpose(1, 2)

    k_img, v_img = heads(k[:, :, img]), heads(v[:, :, img])
    logits = torch.cat([q @ k_img.transpose(-1, -2) / D ** 0.5 + plan.counts.float().log()[:, None, None, :],
                        q @ k[:, :, txt].transpose(-1, -2) / D ** 0.5], dim=-1)
    want = torch.softmax(logits, dim=-1) @ torch.cat([v_img, v[:, :, txt]], dim=2)
    got = joint_attention(F.scaled_dot_product_attention, q, k, v, plan, merge_kv, True, image_first)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generate_highres_example_runs_mmdit_pipelines(kind, tmp_path, capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "generate_highres.py")
    spec = importlib.util.spec_from_file_location("generate_highres_mmdit", path)
    highres = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(highres)
    tiny.mmdit_pipeline(kind, tmp_path / "tok").save_pretrained(tmp_path / "pipe")
    out = tmp_path / "img.png"
    assert highres.main(["--model", str(tmp_path / "pipe"), "--prompt", "a cat", "--height", "64", "--width", "64",
                         "--steps", "2", "--ratio", "64:0.5", "--out", str(out)]) in (0, None)
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    assert "ratio 0.5" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_bench_runs_the_mmdit_architectures(arch, tmp_path):
    from tomesd import bench
    from tomesd.tools import archs

    cfg = bench.default_config("cpu", arch=arch, layers=1, resolutions=(64,), ratios=(0.5,), steps=1, warmup=0,
                               isolate=False)
    assert bench.denoiser_batch(cfg) == (1 if arch == "flux" else 2)
    result = bench.run(cfg, progress=False)
    rows = {r["method"]: r for r in result.rows}
    assert rows.keys() == {"baseline", "tome"} and all(r["status"] == "ok" for r in rows.values())
    assert "cut to 1 block(s)" in result.env["arch"] and archs.TRANSFORMER_ARCHS[arch].description in result.env["arch"]
    with pytest.raises(ValueError, match="layers must be"):
        bench.default_config("cpu", arch="sd15", layers=2)


@pytest.mark.parametrize("sizes", ["100", "512,72", "abc"])
def test_bench_mmdit_script_takes_sizes_the_transformers_take(sizes, capsys):
    """benchmarks/bench_mmdit.py: sides not multiples of 16 (VAE 8 × patch 2) are one error line, not a
    run at a smaller size (or a traceback)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_mmdit.py")
    spec = importlib.util.spec_from_file_location("bench_mmdit", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--resolutions", sizes])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--resolutions" in err[0]


@pytest.mark.parametrize("kind", ["sd3", pytest.param("flux", marks=needs_split_single_blocks)])
def test_mmdit_controlnets_merge(kind, builds):
    net = getattr(tiny, kind + "_controlnet")()
    if kind == "sd3":
        inputs = dict(tiny.sd3_inputs(), controlnet_cond=torch.randn(2, 4, 16, 16))
    else:
        inputs = dict(tiny.flux_inputs(), controlnet_cond=torch.randn(2, 64, 16))
    with torch.no_grad():
        want = net(**inputs)[0][0]
    tomesd.apply_patch(net, ratio=0.5)
    with torch.no_grad():
        got = net(**inputs)[0][0]
    assert len(builds) == len(patched_state(net).host.blocks) > 0 and not torch.equal(got, want)
    tomesd.remove_patch(net)
    with torch.no_grad():
        assert torch.equal(net(**inputs)[0][0], want)

    class Pipeline:  # a pipeline's transformer and controlnet (patch_controlnet=True)
        transformer = getattr(tiny, kind)()
        controlnet = net

    pipe = Pipeline()
    tomesd.apply_patch(pipe, ratio=0.5, patch_controlnet=True)
    assert tomesd.is_patched(pipe.transformer) and tomesd.is_patched(pipe.controlnet)

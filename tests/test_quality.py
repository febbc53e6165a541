"""tomesd.quality and the shipped reference model (CPU): loading, bit-identity at ratio 0, the
classifier still reading the requested digit when patched, the contact sheet, CLI errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tomesd
from tomesd import quality
from tomesd.quality import generate
from tomesd.tools import models
from tomesd.reference import DigitClassifier, DigitsPipeline, load_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = tuple(str(d) for d in range(10))
# Patched accuracy may differ from unpatched by at most this on 30 samples (3 images). Measured on
# 100 samples (BENCHMARKS.md): 1.00 unpatched, 0.99-1.00 at every ratio 0.3-0.7 setting (guidance 2).
ACCURACY_MARGIN = 0.1


@pytest.fixture(scope="module")
def pipe():
    return models.load_pipeline("reference")


@pytest.fixture(scope="module")
def small_result(pipe):
    cfg = quality.QualityConfig(prompts=("3", "7"), seeds=(0, 1), grid={"ratio": (0.0, 0.5)}, steps=5, batch=4)
    return quality.run(cfg, pipe=pipe, progress=False)


def test_reference_model_loads(pipe):
    assert isinstance(pipe, DigitsPipeline) and pipe.vae_scale_factor == 1
    assert isinstance(load_classifier(), DigitClassifier)
    unet = models.load_unet("reference")
    assert unet.config.sample_size == 16 and unet.config.cross_attention_dim == pipe.class_embedding.config.dim
    tokens = []
    from diffusers.models.attention import BasicTransformerBlock

    handles = [m.register_forward_pre_hook(lambda m, a, kw: tokens.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
               for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]
    try:
        image = pipe("5", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    finally:
        for h in handles:
            h.remove()
    assert image.size == (16, 16)
    assert max(tokens) == 16 * 16 and min(tokens) == 8 * 8  # two transformer levels, the top one 16×16


def test_patch_sees_pixel_resolution(pipe):
    seen = []
    tomesd.apply_patch(pipe, ratio=lambda h, w: seen.append((h, w)) or 0.5)
    try:
        pipe("1", num_inference_steps=1)
    finally:
        tomesd.remove_patch(pipe)
    assert seen and set(seen) == {(16, 16)}  # vae_scale_factor 1: image px = latent cells


def test_ratio_zero_is_bit_identical_and_half_is_not(small_result):
    base, zero, half = small_result.rows
    assert base["setting"] == "no ToMe" and base["psnr"] == math.inf and base["identical"]
    assert zero["params"] == {"ratio": 0.0}
    assert zero["identical"] and zero["psnr"] == math.inf and zero["ssim"] == pytest.approx(1.0)
    assert not half["identical"] and 10 < half["psnr"] < math.inf and half["psnr_min"] <= half["psnr"]
    assert all(math.isfinite(p) for p in small_result.tile_psnr[2])
    assert all(r["s_per_image"] > 0 and r["accuracy"] is not None for r in small_result.rows)


def test_run_leaves_pipeline_unpatched(pipe, small_result):
    assert not tomesd.is_patched(pipe)


def test_psnr_ssim_match_scikit_image(small_result):
    metrics = pytest.importorskip("skimage.metrics")
    a = torch.from_numpy(small_result.tiles[0][0]).float() / 255
    b = torch.from_numpy(small_result.tiles[2][0]).float() / 255
    ours = quality.Metrics("cpu")(b.permute(2, 0, 1)[None], a.permute(2, 0, 1)[None])
    assert ours["psnr"] == pytest.approx(metrics.peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1.0), rel=1e-4)
    ref_ssim = metrics.structural_similarity(a[..., 0].numpy(), b[..., 0].numpy(), data_range=1.0, gaussian_weights=True,
                                             sigma=1.5, use_sample_covariance=False)
    assert ours["ssim"] == pytest.approx(ref_ssim, abs=0.02)  # same formula; borders are handled differently


@pytest.mark.slow
def test_patched_model_still_draws_the_requested_digit(pipe):
    cfg = quality.QualityConfig(prompts=DIGITS, seeds=(0, 1, 2), grid={"ratio": (0.5,)}, steps=20, batch=30)
    base, half = quality.run(cfg, pipe=pipe, progress=False).rows
    assert base["accuracy"] >= 0.8, base
    assert abs(half["accuracy"] - base["accuracy"]) <= ACCURACY_MARGIN, (base, half)
    assert half["psnr"] < math.inf


def test_contact_sheet_rows_and_tiles(small_result, tmp_path):
    from PIL import Image

    paths = quality.write_results(small_result, str(tmp_path), tile=48, max_columns=3)
    rows = json.loads(open(paths["results.json"]).read())["rows"]
    assert [r["setting"] for r in rows] == ["no ToMe", "r0", "r0.5"]
    assert rows[0]["psnr"] == math.inf and open(paths["results.csv"]).read().splitlines()[0].startswith("setting,")
    with Image.open(paths["contact_sheet.png"]) as png:
        assert png.format == "PNG"
        sheet = png.convert("RGB")
    pad, text_h, head_h = quality.SHEET_PAD, quality.SHEET_TEXT_H, quality.SHEET_HEAD_H
    cell_w, cell_h = 48 + 2 * pad, 48 + text_h + pad
    assert sheet.size == (3 * cell_w, head_h + 3 * cell_h)
    for i in range(3):
        for j in range(3):
            x, y = j * cell_w + pad, head_h + i * cell_h
            tile = sheet.crop((x, y, x + 48, y + 48))
            expected = Image.fromarray(small_result.tiles[i][j][..., 0]).convert("RGB").resize((48, 48), Image.NEAREST)
            assert np.array_equal(np.asarray(tile), np.asarray(expected)), (i, j)
            label = sheet.crop((x, y + 48, x + 48, y + 48 + text_h)).convert("L")
            assert label.getextrema()[0] < 128  # text under each tile


def test_grid_is_the_product_of_the_lists():
    args = quality.build_parser().parse_args(
        ["--ratios", "0.3,0.5,0.7", "--merge", "attn,attn+crossattn,attn+crossattn+mlp", "--max-downsample", "1,2",
         "--set", "use_rand=false"])
    cfg = quality.config_from_args(quality.build_parser(), args)
    settings = quality.grid_settings(cfg.grid)
    assert len(settings) == 18 and cfg.prompts == DIGITS
    assert settings[0] == dict(ratio=0.3, max_downsample=1, merge_attn=True, merge_crossattn=False, merge_mlp=False,
                               use_rand=False)
    assert settings[-1]["merge_mlp"] and settings[-1]["max_downsample"] == 2 and settings[-1]["ratio"] == 0.7
    assert quality.setting_label(settings[-1]) == "r0.7 md2 attn+crossattn+mlp use_rand=False"


def test_variants_are_whole_settings_the_axes_multiply():
    """--variant gives whole settings (a ratio in a variant replaces the default ratios); --set axes
    multiply them; a keyword given both ways is an error."""
    parser = quality.build_parser()
    cfg = quality.config_from_args(parser, parser.parse_args(
        ["--variant", "ratio=0.5", "--variant", "ratio=0.9,sx=4,sy=4,prop_attn=true", "--set", "match_window=none,3"]))
    assert quality.grid_settings(cfg.grid) == [
        dict(ratio=0.5, match_window=None), dict(ratio=0.5, match_window=3),
        dict(ratio=0.9, sx=4, sy=4, prop_attn=True, match_window=None), dict(ratio=0.9, sx=4, sy=4, prop_attn=True, match_window=3)]
    cfg = quality.config_from_args(parser, parser.parse_args(["--variant", "prop_attn=true", "--ratios", "0.5,0.7"]))
    assert quality.grid_settings(cfg.grid) == [dict(prop_attn=True, ratio=0.5), dict(prop_attn=True, ratio=0.7)]


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tomesd-quality: error: ") and not any(line.startswith("usage:") for line in err)
    return err[-1]


@pytest.mark.parametrize("argv, message", [
    (["--set", "nonsense=1"], "not apply_patch keywords: nonsense"),
    (["--set", "ratio"], "expected KEY=V1[,V2...]"),
    (["--merge", "attn+foo"], "sub-layer sets are attn/crossattn/mlp"),
    (["--ratios", "a,b"], "expected comma-separated numbers"),
    (["--merge-mlp", "maybe"], "expected true/false values"),
    (["--seeds", "x"], "expected seeds like 0,1,2 or 0-9"),
    (["--steps", "0"], "must be ≥ 1"),
    (["--prompt", "a cat"], "must name exactly one"),
    (["--merge", "attn", "--merge-mlp", "true"], "do not also give --merge-mlp"),
    (["--model", "someone/some-model"], "give --prompt"),
    (["--prompts", "/nonexistent/prompts.txt"], "--prompts /nonexistent/prompts.txt"),
    (["--ratios", "0.9", "--steps", "1"], "setting r0.9: ratio"),
    (["--set", "ratio=0.5", "--ratios", "0.3"], "--set ratio: already given by --ratios"),
    (["--set", "max_downsample=1", "--max-downsample", "2"], "--set max_downsample: already given by --max-downsample"),
    (["--set", "sx=2", "--set", "sx=4"], "--set sx: already given by another --set sx"),
    (["--model", "/nonexistent", "--prompt", "3"], "--model /nonexistent: no such model directory"),
    (["--model", "/nonexistent"], "--model /nonexistent: no such model directory"),
    (["--variant", "ratio=0.5", "--ratios", "0.3"], "ratio: both a grid axis and in a --variant"),
    (["--variant", "merge_mlp=true", "--merge", "attn"], "merge_mlp: both a grid axis and in a --variant"),
    (["--variant", "bogus=1"], "not apply_patch keywords: bogus"),
    (["--height", "15", "--steps", "1"], "--height 15: DigitsPipeline needs multiples of 2 px (its default is 16)"),
    (["--sizes", "16,15", "--steps", "1"], "--sizes 15: DigitsPipeline needs multiples of 2 px"),
])
def test_cli_errors_are_clear(capsys, argv, message):
    assert message in _cli_error(capsys, argv)


def test_set_ratio_alone_replaces_the_default_ratios():
    """Issue 17 item 14: `--set ratio=0.5` said "already given" although the user gave no ratio."""
    parser = quality.build_parser()
    cfg = quality.config_from_args(parser, parser.parse_args(["--set", "ratio=0.5", "--set", "use_rand=false"]))
    assert cfg.grid == {"ratio": (0.5,), "use_rand": (False,)}
    assert quality.config_from_args(parser, parser.parse_args([])).grid == {"ratio": (0.3, 0.5, 0.7)}


def test_unloadable_model_is_one_line(capsys, tmp_path, monkeypatch):
    """Issue 17 item 7: a model that passes the local checks but does not load ends in one line too."""
    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setattr(generate, "run", lambda *a, **k: pytest.fail("ran without a model"))
    err = _cli_error(capsys, ["--model", str(tmp_path), "--prompt", "a cat", "--steps", "1"])
    assert err.startswith(f"tomesd-quality: error: --model {tmp_path}: cannot load it (")


def test_missing_extra_is_one_line_before_any_work(capsys, monkeypatch):
    monkeypatch.setattr(generate, "missing_dependencies", lambda: ["torchmetrics"])
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    assert _cli_error(capsys, ["--steps", "1"]).endswith("needs torchmetrics: pip install 'tomesd[quality]'")


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "q"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# digits\n1\n\n7\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "tomesd.quality", "--prompts", str(prompts), "--seeds", "0-1", "--steps", "3",
         "--ratios", "0.5", "--merge", "attn,attn+mlp", "--set", "use_rand=false", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "LPIPS" in proc.stderr  # skipped here (no torchvision weights), and it says so
    data = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in data["rows"]] == ["no ToMe", "r0.5 attn use_rand=False", "r0.5 attn+mlp use_rand=False"]
    assert data["columns"] == [["1", 0], ["7", 0], ["1", 1], ["7", 1]]  # seed-major: every prompt in the first columns
    assert all(r["images"] == 4 for r in data["rows"]) and data["rows"][2]["params"]["merge_mlp"] is True
    assert (out / "contact_sheet.png").stat().st_size > 0 and (out / "results.csv").exists()
    assert "r0.5 attn+mlp" in proc.stdout


def test_reference_files_are_package_data():
    """`--model reference` works from an installed package: every shipped file matches package-data."""
    import glob

    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["tomesd.reference"]
    package = os.path.join(ROOT, "tomesd", "reference")
    listed = {path for pattern in patterns for path in glob.glob(os.path.join(package, pattern))}
    shipped = {os.path.join(d, name) for d, _, names in os.walk(package) if "__pycache__" not in d
               for name in names if not name.endswith(".py")}
    assert shipped and listed == shipped
    assert os.path.join(package, "digits", "unet", "diffusion_pytorch_model.safetensors") in shipped


def test_timing_is_interleaved_and_speedups_carry_their_noise_band(pipe, monkeypatch):
    """Round k makes chunk k with every setting in turn; the band is the lowest and highest per-round
    speed-up, and only a band wholly past 1 is called faster / slower."""
    from tomesd.tools import timing

    order, script = [], iter([1.0, 0.5, 1.2,   1.0, 0.4, 0.8,   1.0, 0.6, 0.9])  # rounds: base, 0.3, 0.6
    real = generate.timed_chunk

    def scripted(pipe_, cfg, chunk):
        state = tomesd.patch.patched_state(pipe_)
        order.append(None if state is None else state.config.ratio)
        images, _ = real(pipe_, cfg, chunk)
        return images, next(script) * len(chunk)

    monkeypatch.setattr(generate, "timed_chunk", scripted)
    monkeypatch.setattr(timing, "load_average", lambda: 99.0)
    cfg = quality.QualityConfig(model="reference", prompts=["3"], seeds=(0, 1, 2), grid={"ratio": (0.3, 0.6)},
                                steps=2, batch=1, warmup=0)
    result = quality.run(cfg, pipe=pipe, progress=False)
    assert order == [None, 0.3, 0.6] * 3
    base, fast, mixed = result.rows
    assert fast["speedup_min"] == pytest.approx(1 / 0.6) and fast["speedup_max"] == pytest.approx(2.5)
    assert fast["verdict"] == "faster" and mixed["verdict"] == "within noise"
    assert base.get("verdict") is None and "noise band" in quality.format_table(result)
    assert any("load average 99.0" in note for note in result.notes)


def test_one_timing_round_has_no_noise_band():
    from tomesd.tools import timing

    assert timing.noise_band([1.0], [0.5]) == dict(speedup_min=None, speedup_max=None, verdict="one round, no band")
    assert timing.noise_band([1.0, 1.0], [0.5, 0.9])["verdict"] == "faster"


def test_extras_install_what_the_tools_import():
    """[quality] runs tomesd.quality without diffusers' "accelerate was not found" warning; README's
    Install section names every extra."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert "accelerate" in extras["quality"] and "accelerate" in extras["bench"]
    with open(os.path.join(ROOT, "README.md")) as f:
        install = f.read().split("## Install", 1)[1].split("\n## ", 1)[0]
    assert all(f'pip install -e ".[{name}]"' in install for name in ("quality", "bench", "test", "examples"))

"""examples/generate_highres.py and examples/visualize_merges.py on tiny pipelines saved to a temp dir."""
import argparse
import importlib.util
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import tiny
import tomesd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


highres = _load("generate_highres")
visualize_merges = _load("visualize_merges")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    paths = {}
    for arch in ("sd1", "sdxl"):
        tiny.pipeline(arch, root / f"tok-{arch}").save_pretrained(root / arch)
        paths[arch] = str(root / arch)
    return paths


@pytest.fixture(scope="module")
def mmdit_pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit")
    paths = {}
    for kind in ("sd3", "flux"):
        tiny.mmdit_pipeline(kind, root / f"tok-{kind}").save_pretrained(root / kind)
        paths[kind] = str(root / kind)
    return paths


def _first_block_lengths(unet):
    """Token counts attn1 of the first transformer block sees (after tomesd's merge)."""
    block = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    lengths = []
    handle = block.attn1.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(
        (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    return lengths, handle


def test_hires_fix_refines_with_the_ratio_of_the_larger_size(pipes, tmp_path, capsys):
    out = tmp_path / "img.png"
    argv = ["--model", pipes["sd1"], "--prompt", "a cat", "--prompt", "a dog", "--height", "64", "--width", "64",
            "--steps", "2", "--ratio", "64:0.25,128:0.5", "--hires-fix", "2", "--strength", "0.6", "--out", str(out)]
    args = highres.parse_args(argv)
    assert args.ratio == {64.0: 0.25, 128.0: 0.5}
    pipe, img2img = highres.load_pipelines(args, "cpu")
    assert tomesd.is_patched(pipe) and tomesd.is_patched(img2img) and img2img.unet is pipe.unet
    lengths, handle = _first_block_lengths(pipe.unet)
    try:
        image = highres.generate(pipe, img2img, args, "a cat", 0, "cpu")
    finally:
        handle.remove()
    assert image.size == (128, 128)
    scale = pipe.vae_scale_factor
    n_low, n_high = (64 // scale) ** 2, (128 // scale) ** 2
    # two text-to-image steps at 64 px (ratio 0.25), then img2img steps at 128 px (ratio 0.5)
    assert lengths[:2] == [n_low - n_low // 4] * 2
    assert len(lengths) > 2 and set(lengths[2:]) == {n_high - n_high // 2}

    assert highres.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ratio 0.25 at 64x64; ratio 0.5 at 128x128" in printed
    for i in range(2):
        path = tmp_path / f"img-{i:03d}.png"
        assert f"{path} (128x128, seed {i})" in printed
        with Image.open(path) as png:
            assert png.size == (128, 128)


def test_sdxl_hires_fix_and_no_tome(pipes, tmp_path, capsys):
    out = tmp_path / "xl.png"
    assert highres.main(["--model", pipes["sdxl"], "--height", "64", "--width", "64", "--steps", "2",
                         "--hires-fix", "1.5", "--ratio", "0.4", "--out", str(out)]) == 0
    with Image.open(out) as png:
        assert png.size == (96, 96)
    assert "ratio 0.4 at 64x64; ratio 0.4 at 96x96" in capsys.readouterr().out
    args = highres.parse_args(["--model", pipes["sdxl"], "--no-tome", "--hires-fix", "2"])
    pipe, img2img = highres.load_pipelines(args, "cpu")
    assert type(img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert not tomesd.is_patched(pipe) and not tomesd.is_patched(img2img)


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "0.95"], "--ratio"),
    (["--ratio", "0.9", "--cells", "2"], "--ratio"),
    (["--ratio", "512:x"], "--ratio"),
    (["--ratio", "512:0.3,1024:0.97"], "--ratio"),
    (["--cells", "0"], "--cells"),
    (["--match-window", "4"], "--match-window"),
    (["--hires-fix", "1"], "--hires-fix"),
    (["--strength", "0"], "--strength"),
    (["--steps", "0"], "--steps"),
    (["--dtype", "fp8"], "invalid choice"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        highres.parse_args(["--model", str(tmp_path)] + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_mmdit_hires_fix_refines_at_the_larger_size(kind, mmdit_pipes, tmp_path, capsys):
    """SD 3 / Flux img2img takes its size as height / width (else its default size): the printed size is
    the image's."""
    out = tmp_path / "img.png"
    assert highres.main(["--model", mmdit_pipes[kind], "--prompt", "a cat", "--height", "32", "--width", "32",
                         "--steps", "2", "--hires-fix", "2", "--ratio", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio 0.5 at 32x32; ratio 0.5 at 64x64" in printed and "(64x64, seed 0)" in printed
    with Image.open(out) as png:
        assert png.size == (64, 64)


@pytest.mark.parametrize("kind, argv, message", [
    ("flux", ["--mode", "token"], "argument --mode: invalid choice: 'token'"),  # tokens mode runs on Flux now
    ("sd3", ["--height", "34"], "--height 34: StableDiffusion3Pipeline needs multiples of 4 px"),  # VAE 2 × patch 2
    ("flux", ["--width", "30"], "--width 30: FluxPipeline needs multiples of 4 px"),
    ("flux", ["--ratio", "0.8"], "(0 ≤ ratio ≤ 1 − 1/(sx·sy) with sx=2, sy=2), got 0.8"),  # Flux's default cells
])
def test_mmdit_problems_are_one_line(kind, argv, message, mmdit_pipes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        highres.load_pipelines(highres.parse_args(["--model", mmdit_pipes[kind], "--height", "32", "--width", "32"]
                                                  + argv), "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("text, message", [
    ("1.0", "a ratio must be a number in [0, 1), got 1.0"), ("nan", "got nan"), ("inf", "got inf"),
    ("512:0.8,512:0.9", "image side 512 is given twice"), ("512:0.8,1024", "expected side:ratio pairs"),
    ("0:0.5", "an image side must be a number of pixels > 0, got 0"), ("512:nan", "got nan"),
])
def test_ratio_is_checked_without_made_up_cells(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        highres.parse_ratio(text)
    assert message in str(info.value) and "sx=" not in str(info.value)


def test_missing_model_is_an_error_message_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "generate_highres.py"), "--model",
                           str(tmp_path / "no" / "such" / "model")], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "no such model directory (and not a hub id owner/name)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # no usage block before it, no traceback
    offline = dict(ENV, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # an empty cache, no network
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "generate_highres.py"), "--model", "nobody/no-such-model",
                           "--device", "cpu"], capture_output=True, text=True, env=offline, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "--model nobody/no-such-model: cannot load it" in err[0], err
    assert "above" not in err[0] and "(cause: " in err[0] and "offline" in err[0].lower()  # the cause, not a pointer


def test_an_error_pointing_to_a_stacktrace_gives_its_cause_instead():
    from tomesd.tools import cli

    try:
        try:
            raise ConnectionError("Cannot reach the hub: offline mode is enabled.\nmore")
        except ConnectionError as cause:
            raise OSError("Cannot load x: not cached. Please check out the root cause in the stacktrace above.") from cause
    except OSError as error:
        line = cli.error_line(error)
    assert line == "OSError: Cannot load x: not cached. (cause: ConnectionError: Cannot reach the hub: offline mode is enabled.)"
    assert cli.error_line(ValueError("plain\nsecond")) == "ValueError: plain"


def test_help_lists_every_shipped_model_the_loader_knows(capsys):
    from tomesd import bench, quality
    from tomesd.tools import models

    for parser in (highres.build_parser(), visualize_merges.build_parser(), bench.build_parser(), quality.build_parser()):
        text = " ".join(parser.format_help().split())
        assert all(f"'{name}' ({entry.description})" in text for name, entry in models.NAMED.items()), parser.prog
    assert {"reference", "photos"} <= set(models.NAMED)
    assert models.size_note("photos", 64, 64) == "" and models.size_note("reference", 16, 16) == ""
    assert models.size_note("reference", 64, 64) == "note: --model reference draws well at 16 px square; at 64x64 px " \
        "expect strokes, not digits"
    assert models.size_note("some/dir", 64, 64) == ""  # only the shipped models have sizes to say


def test_sizes_are_the_models_own_and_checked_against_it(pipes, tmp_path, capsys):
    args = highres.parse_args(["--model", pipes["sd1"], "--height", "99", "--width", "64"])
    with pytest.raises(SystemExit) as exit_info:
        highres.load_pipelines(args, "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "--height 99: StableDiffusionPipeline needs multiples of 2 px" in err[0]  # the tiny VAE's factor
    args = highres.parse_args(["--model", pipes["sd1"], "--no-tome"])
    pipe, _ = highres.load_pipelines(args, "cpu")
    assert (args.height, args.width) == (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2


def test_examples_run_offline_on_the_reference_model(tmp_path, capsys):
    """`--model reference` (and its directory) runs in both examples at the model's own 16 px and at
    other sizes it takes (below 64 px); what it cannot do is one line each."""
    out = tmp_path / "digit.png"
    assert highres.main(["--model", "reference", "--prompt", "3", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert "(16x16, seed 0)" in capsys.readouterr().out and Image.open(out).size == (16, 16)
    from tomesd.reference import PIPELINE_DIR

    assert highres.main(["--model", PIPELINE_DIR, "--height", "24", "--width", "32", "--steps", "2", "--out", str(out),
                         "--device", "cpu"]) == 0
    below = min(highres.parse_ratio(highres.PRESET["ratio"]).items())[1]  # the preset's ratio below its first side
    printed = capsys.readouterr()
    assert f"ratio {below:g} at 32x24" in printed.out and Image.open(out).size == (32, 24)
    assert "note" not in printed.err  # a saved copy is a directory: no size to say
    assert highres.main(["--model", "reference", "--height", "32", "--width", "32", "--steps", "1", "--out", str(out),
                         "--device", "cpu", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "draws well at 16 px square; at 32x32 px expect strokes, not digits" in err and "torch threads: 1 as asked" in err
    for argv, message in [(["--hires-fix", "2"], "--hires-fix: DigitsPipeline has no img2img pipeline"),
                          (["--height", "15"], "--height 15: DigitsPipeline needs multiples of 2 px (its default is 16)"),
                          (["--prompt", "a cat"], "--prompt: the reference model draws one digit"),
                          (["--negative-prompt", "7"], "--negative-prompt: DigitsPipeline takes none")]:
        with pytest.raises(SystemExit) as exit_info:
            highres.load_pipelines(highres.parse_args(["--model", "reference"] + argv), "cpu")
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], (argv, err)

    merges = tmp_path / "merges.png"
    assert visualize_merges.main(["--model", "reference", "--steps", "2", "--step", "1", "--out", str(merges),
                                  "--device", "cpu"]) == 0
    assert "step 1, block 0 (16x16 tokens at /1): 128 of 256 tokens merged" in capsys.readouterr().out
    assert Image.open(merges).size == (16, 16)
    assert visualize_merges.main(["--model", "reference", "--prompt", "3", "--height", "48", "--width", "32",
                                  "--steps", "2", "--out", str(merges), "--device", "cpu"]) == 0
    assert "(48x32 tokens at /1): 768 of 1536 tokens merged" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        visualize_merges.main(["--model", "reference", "--prompt", "a corgi", "--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: --prompt: the reference model draws one digit" in err[0]


def test_missing_accelerate_says_which_extra_installs_it(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        highres.parse_args(["--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "needs accelerate: pip install 'tomesd[examples]'" in err


def test_docstrings_name_a_live_hub_id():
    """runwayml/stable-diffusion-v1-5 was removed from the hub."""
    for module in (highres, visualize_merges):
        assert "runwayml" not in module.__doc__ and "stable-diffusion-v1-5/stable-diffusion-v1-5" in module.__doc__


def test_jobs_are_numbered_and_seeded_independently_of_processes():
    jobs = highres.jobs(["a", "b"], 2, seed=10)
    assert jobs == [(0, "a", 10), (1, "a", 11), (2, "b", 12), (3, "b", 13)]
    assert highres.output_path("out/x.png", 3, 4) == "out/x-003.png" and highres.output_path("x.png", 0, 1) == "x.png"
    assert highres.hires_size(64, 96, 1.5) == (96, 144)
    assert highres.hires_size(40, 40, 1.5, 16) == (64, 64)  # SD 3 / Flux take multiples of 16
    assert isinstance(highres.parse_ratio("0.3"), float)
    with pytest.raises(argparse.ArgumentTypeError):
        highres.parse_ratio("1024")


def test_two_processes_split_the_prompts(pipes, tmp_path):
    """torchrun starts the processes accelerate's PartialState joins (gloo on a CPU)."""
    out = tmp_path / "img.png"
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
         os.path.join(EXAMPLES, "generate_highres.py"), "--model", pipes["sd1"], "--prompt", "a", "--prompt", "b",
         "--prompt", "c", "--height", "64", "--width", "64", "--steps", "2", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 image(s) on 2 process(es)" in proc.stdout
    by_process = {line.split("]")[0] for line in proc.stdout.splitlines() if line.startswith("[process")}
    assert by_process == {"[process 0", "[process 1"}
    single = tmp_path / "single.png"
    assert highres.main(["--model", pipes["sd1"], "--prompt", "c", "--height", "64", "--width", "64", "--steps", "2",
                         "--seed", "2", "--out", str(single)]) == 0
    # image 2 of the split run (seed 0 + 2) is the image a single process makes with seed 2, up to the
    # rounding of a different thread count (torchrun sets OMP_NUM_THREADS=1); image 0 is another image
    alone = np.asarray(Image.open(single), dtype=np.float32)
    split = [np.asarray(Image.open(tmp_path / f"img-{i:03d}.png"), dtype=np.float32) for i in (0, 2)]
    assert np.abs(split[1] - alone).mean() < 1.0 and np.abs(split[0] - alone).mean() > 5.0


def test_visualize_merges_example(pipes, tmp_path, capsys):
    out, plain = tmp_path / "merges.png", tmp_path / "plain.png"
    assert visualize_merges.main(["--model", pipes["sd1"], "--height", "64", "--width", "64", "--steps", "2",
                                  "--step", "1", "--ratio", "0.5", "--alpha", "1", "--out", str(out),
                                  "--image-out", str(plain), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "step 1, block 0 (32x32 tokens at /1): 512 of 1024 tokens merged, 512 rows left" in printed
    colors = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(colors, axis=0)) > 20  # many groups, each its own color
    assert Image.open(plain).size == (64, 64)
    with pytest.raises(SystemExit):
        visualize_merges.main(["--model", pipes["sd1"], "--steps", "2", "--step", "2"])


def test_the_high_resolution_preset_is_the_default_and_can_be_changed(pipes, capsys):
    """generate_highres patches with README's high-resolution preset (ratio by side, local matching,
    prop_attn) unless told otherwise."""
    from tomesd.patch import patched_state

    preset = highres.PRESET
    args = highres.parse_args(["--model", pipes["sd1"], "--height", "64", "--width", "64"])
    pipe, _ = highres.load_pipelines(args, "cpu")
    config = patched_state(pipe.unet).config
    assert config.match_window == preset["match_window"] and config.prop_attn is preset["prop_attn"]
    assert (config.sx, config.sy) == (preset["cells"], preset["cells"])
    assert config.ratio == args.ratio == highres.parse_ratio(preset["ratio"])
    args = highres.parse_args(["--model", pipes["sd1"], "--match-window", "3", "--no-prop-attn", "--ratio", "0.4",
                               "--cells", "2"])
    pipe, _ = highres.load_pipelines(args, "cpu")
    config = patched_state(pipe.unet).config
    assert config.match_window == 3 and config.prop_attn is False and config.ratio == 0.4 and config.sx == 2
    for bad in ("4", "x", "0"):
        with pytest.raises(SystemExit):
            highres.parse_args(["--model", pipes["sd1"], "--match-window", bad])
        assert "--match-window" in capsys.readouterr().err

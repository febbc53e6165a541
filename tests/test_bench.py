"""tomesd.bench: the CLI end to end on the toy architecture and on saved tiny pipelines (CPU).

Every test passes explicit small options: the CPU default (the real SD 1.5 UNet) takes minutes."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

import tiny
import tomesd
from tomesd import bench
from tomesd.bench import measure
from tomesd.tools import cli, timing
from tomesd.tools.archs import ARCHS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sdxl")
    tiny.pipeline("sdxl", directory / "tok").save_pretrained(directory / "pipe")
    return str(directory / "pipe")


def test_cli_writes_table_json_csv_png(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "tomesd.bench", "--arch", "tiny", "--resolutions", "64,128", "--ratios", "0.5",
         "--steps", "1", "--warmup", "0", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.split()[:2] == ["128", "tome"] for line in lines if line.strip()), proc.stdout
    assert lines[1] == f"[{bench.TOY_NOTE}]" and "TOY architecture" in proc.stderr  # labelled wherever it shows
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert [(r["resolution"], r["method"], r["ratio"]) for r in rows] == [
        (64, "baseline", None), (64, "tome", 0.5), (128, "baseline", None), (128, "tome", 0.5)]
    assert all(r["status"] == "ok" and r["ms_per_step"] > 0 and r["peak_mem_mib"] > 0 for r in rows)
    assert all(r["batch"] == 2 for r in rows)  # one image, doubled for classifier-free guidance
    base, tome = rows[2], rows[3]
    assert base["speedup"] == 1.0 and tome["speedup"] == pytest.approx(base["ms_per_step"] / tome["ms_per_step"])
    assert tome["mem_ratio"] == pytest.approx(tome["peak_mem_mib"] / base["peak_mem_mib"])
    env_json = data["environment"]
    assert env_json["torch"] == torch.__version__ and env_json["backend"] == "torch"
    assert env_json["backend_refused"]["cuda"] and env_json["gpu"] is None
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and table[1]["method"] == "tome" and float(table[1]["ratio"]) == 0.5
    from PIL import Image

    with Image.open(out / "bench.png") as png:
        assert png.format == "PNG" and png.width > 300


def test_model_dir_sdxl_in_process(sdxl_dir, tmp_path, capsys):
    rc = bench.main(["--model", sdxl_dir, "--resolutions", "64", "--ratios", "0.3,0.5", "--steps", "1",
                     "--warmup", "0", "--no-isolate", "--attention", "math", "--backend", "torch",
                     "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["ratio"] for r in rows] == [None, 0.3, 0.5] and all(r["status"] == "ok" for r in rows)
    assert "tome 0.3" in capsys.readouterr().out


def test_isolated_points_do_not_inherit_an_earlier_peak():
    """Peak RSS only grows within a process: measured in one process, the small resolution run after
    the large one would report the large one's peak. Each point in its own child must not."""
    cfg = bench.default_config("cpu", arch="tiny", resolutions=(512, 64), ratios=(0.5,), steps=1, warmup=0,
                               attention="math")
    assert cfg.isolated
    torch.set_num_threads(1)
    assert timing.run_in_child(torch.get_num_threads)[:2] == ("ok", 1)  # a child gets the caller's threads
    rows = bench.run(cfg, progress=False).rows
    assert timing.forkserver_pid() is None  # the run stopped its server (tests/test_forkserver.py: why)
    big, small = rows[0], rows[2]
    assert (big["resolution"], small["resolution"]) == (512, 64) and big["method"] == small["method"] == "baseline"
    # math attention at 512 px holds [2, 4 heads, 4096, 4096] fp32 probabilities: 512 MiB
    assert big["peak_mem_mib"] - small["peak_mem_mib"] > 200
    starts = [r["start_mem_mib"] for r in rows]
    assert max(starts) - min(starts) < 100  # every child starts from the same server process


def test_oom_is_a_row_and_the_grid_goes_on(monkeypatch):
    cfg = bench.default_config("cpu", arch="tiny", resolutions=(64, 128), ratios=(0.5,), steps=1, warmup=0,
                               isolate=False)
    real = timing.time_calls
    seen = []

    def flaky(unet, args, kwargs, **window):
        seen.append(tomesd.is_patched(unet))
        if args[0].shape[-1] == 128 // 8 and tomesd.is_patched(unet):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(unet, args, kwargs, **window)

    monkeypatch.setattr(timing, "time_calls", flaky)
    result = bench.run(cfg, progress=False)
    assert [r["status"] for r in result.rows] == ["ok", "ok", "ok", "OOM"]
    assert seen == [False, True, False, True]
    oom = result.rows[3]
    assert oom["ms_per_step"] is None and oom["speedup"] is None and oom["mem_ratio"] is None
    assert "OOM" in bench.format_table(result).splitlines()[-1]


def test_is_oom_recognizes_cpu_and_cuda_messages():
    assert bench.is_oom(torch.cuda.OutOfMemoryError("x"))
    assert bench.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert bench.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not bench.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not bench.is_oom(ValueError("out of memory"))


def test_other_errors_stop_the_run(tmp_path):
    """A UNet directory with a config but no weights: the settings check (on the config) passes, the
    isolated child cannot load the weights, and the run stops there."""
    tiny.unet("sd1").save_config(tmp_path)
    cfg = bench.default_config("cpu", model=str(tmp_path), resolutions=(64,), ratios=(0.5,), steps=1)
    assert cfg.isolated
    with pytest.raises(RuntimeError, match="measurement failed"):
        bench.run(cfg, progress=False)


@pytest.mark.parametrize("argv, message", [
    (["--resolutions", "100"], "multiples of 8"),
    (["--arch", "sd3", "--resolutions", "72"], "multiples of 16"),
    (["--ratios", "0.9"], "ratios must be in (0, 0.75], got (0.9,)"),
    (["--ratios", "a"], "comma-separated numbers"),
    (["--ratios", "0.9", "--variant", "sx=4,sy=4", "--variant", "prop_attn=true"],
     "ratios must be in (0, 0.75] with 2 x 2 cells (setting prop_attn=True), got (0.9,)"),
    (["--ratios", "0.95", "--variant", "sx=4,sy=4"], "ratios must be in (0, 0.9375] with 4 x 4 cells (setting sx=4 sy=4)"),
    (["--backend", "cuda", "--device", "cpu"], "needs a cuda device"),
    (["--arch", "sd4"], "invalid choice"),
    (["--arch", "sd15", "--layers", "2"], "layers must be"),
    (["--arch", "tiny", "--model", "x"], "not allowed with"),
    (["--steps", "0"], "must be ≥ 1"),
    (["--calls", "0"], "must be ≥ 1"),
    (["--set", "ratio=0.5"], "the ratio comes from --ratios"),
    (["--set", "bogus=1"], "not apply_patch keywords the bench can vary: bogus"),
    (["--set", "mode=fast"], "setting mode=fast: mode must be one of"),
    (["--set", "plan_every=1,0"], "setting plan_every=0: plan_every must be a positive int"),
    (["--set", "mode"], "expected KEY=V1[,V2...]"),
    (["--set", "mode=kv", "--set", "mode=tokens"], "--set mode: already given"),
    (["--variant", "mode"], "expected KEY=VALUE[,KEY=VALUE...]"),
    (["--variant", "mode=kv,mode=tokens"], "mode given twice"),
    (["--variant", "mode=kv", "--set", "mode=tokens"], "mode is both a --set axis and in a --variant"),
    (["--variant", "prop_attn=true,merge_attn=false"], "prop_attn=True needs merge_attn=True"),
    (["--target-speedup", "0"], "must be > 0"),
    (["--target-speedup", "fast"], "expected a number such as 1.5"),
    (["--interleave", "--isolate"], "cannot isolate"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_ratios_are_checked_against_each_settings_cells(monkeypatch):
    """Issue 27 item 8: the README's high-resolution preset (ratio 0.9 with 4 × 4 cells) was refused
    against 2 × 2 cells; each setting's own sx, sy bound the ratios (a --set axis too)."""
    started = []
    monkeypatch.setattr(measure, "run", lambda cfg, **kwargs: started.append(cfg) or sys.exit(0))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--arch", "tiny", "--resolutions", "64", "--ratios", "0.9", "--variant", "sx=4,sy=4,prop_attn=true",
                    "--steps", "1", "--warmup", "0", "--no-isolate", "--no-progress"])
    assert exit_info.value.code == 0 and started[0].variants == ({"sx": 4, "sy": 4, "prop_attn": True},)
    cfg = bench.default_config("cpu", arch="tiny", ratios=(0.5, 0.9), grid={"sx": (4,), "sy": (4, 8)})
    assert [p["sy"] for p in bench.settings(cfg)] == [4, 8]
    with pytest.raises(ValueError, match=r"ratios must be in \(0, 0.75\] with 2 x 2 cells \(setting mode=kv\)"):
        bench.default_config("cpu", arch="tiny", ratios=(0.9,), variants=({"sx": 4, "sy": 4}, {"mode": "kv"}))


def test_a_ratio_out_of_range_is_said_once_and_no_setting_is_nameless(capsys):
    """Issue 17 item 14: `--ratios 0.9` also named an empty setting ("setting : ratio must be ...")."""
    with pytest.raises(SystemExit):
        bench.main(["--ratios", "0.3,0.9"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ratios must be in" in err and "setting" not in err and err.count("0.9") == 1
    cfg = bench.default_config("cpu", arch="tiny")
    with pytest.raises(ValueError, match="setting apply_patch defaults: "):
        cli.check_settings(bench.load_unet(cfg), [{}], base={"ratio": 0.5, "merge_attn": False, "prop_attn": True})


def test_settings_the_model_refuses_fail_before_any_timing(monkeypatch, capsys):
    """Issue 17 item 8: Flux refused a setting (then mode=tokens; now merge_crossattn, it has no
    cross-attention); the bench timed the whole baseline first, then died with a nested traceback. Every
    setting is applied to the model once, before any timing."""
    monkeypatch.setattr(timing, "time_calls", lambda *a, **k: pytest.fail("timed before checking the settings"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--arch", "flux", "--layers", "1", "--resolutions", "64", "--ratios", "0.5", "--set",
                    "merge_crossattn=true", "--no-isolate", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tomesd-bench: error: setting tome 0.5 merge_crossattn=True: ")
    assert "FluxTransformer2DModel have no cross-attention sub-layer" in err
    cfg = bench.default_config("cpu", arch="flux", layers=1, resolutions=(64,), ratios=(0.5,),
                               variants=({"mode": "kv"}, {"merge_crossattn": True}))
    with pytest.raises(ValueError, match="setting tome 0.5 merge_crossattn=True"):
        bench.run(cfg, progress=False)  # the API checks too (isolated: on the model without weights)


def test_model_reference_is_the_shipped_digits_unet(tmp_path, capsys):
    """`--model reference` named "no such model directory" although tomesd.quality accepts it."""
    from tomesd.reference import UNET_CONFIG

    cfg = bench.default_config("cpu", model="reference", resolutions=(128,), ratios=(0.5,), steps=1, warmup=0)
    unet = bench.load_unet(cfg)
    assert unet.config.in_channels == UNET_CONFIG["in_channels"] and tuple(unet.config.block_out_channels) == (32, 64)
    assert bench.main(["--model", "reference", "--resolutions", "128", "--ratios", "0.5", "--steps", "1", "--warmup",
                       "0", "--no-isolate", "--no-progress", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("baseline", "ok"), ("tome", "ok")]
    assert "reference" in capsys.readouterr().err


def test_defaults_per_device():
    """The real SD 1.5 UNet on a GPU and on a CPU alike: what a user gets, not the toy."""
    gpu = bench.default_config("cuda")
    assert (gpu.arch, gpu.resolutions, gpu.dtype, gpu.isolated) == ("sd15", (512, 1024, 2048), "fp16", False)
    cpu = bench.default_config("cpu")
    assert (cpu.arch, cpu.resolutions, cpu.dtype, cpu.isolated, cpu.toy) == ("sd15", (256, 512), "fp32", True, False)
    assert bench.BenchConfig().arch == "sd15" and bench.default_config("cpu", arch="tiny").toy
    assert bench.default_config("cpu", model="some/model").arch is None


@pytest.mark.parametrize("name, params", [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)])
def test_builtin_archs_have_the_published_sizes(name, params):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHS[name].config)
    assert sum(p.numel() for p in unet.parameters()) == params


def test_inputs_match_the_unet():
    cfg = bench.default_config("cpu", arch="tiny")
    unet = bench.load_unet(cfg)
    args, kwargs = bench.unet_inputs(unet, cfg, 64)
    assert args[0].shape == (2, 4, 8, 8) and kwargs["encoder_hidden_states"].shape == (2, 77, 64)
    with torch.no_grad():
        assert unet(*args, **kwargs).sample.shape == args[0].shape


def test_noisy_rows_flag_steps_that_vary():
    steady = dict(resolution=64, method="baseline", ratio=None, status="ok", ms_per_step=100.0, ms_min=95.0, ms_max=110.0)
    busy = dict(steady, method="tome", ratio=0.5, ms_min=90.0, ms_max=400.0)
    oom = dict(steady, status="OOM", ms_per_step=None, ms_min=None, ms_max=None)
    assert bench.noisy_rows(bench.BenchResult(rows=[steady, busy, oom])) == [busy]


@pytest.mark.parametrize("model, message", [
    ("/no/such/dir", "--model /no/such/dir: no such model directory"),
    ("./my-sd-model", "--model ./my-sd-model: no such model directory"),
    ("EMPTY_DIR", "is a directory but holds no diffusers model"),
])
def test_bad_model_is_one_line_before_any_work(model, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = str(tmp_path) if model == "EMPTY_DIR" else model
    monkeypatch.setattr(measure, "run", lambda *a, **k: pytest.fail("the grid must not start"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", model, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("tomesd-bench: error: ")  # no usage block
    assert message in err[0]


def test_without_matplotlib_or_tqdm_it_says_so_up_front_and_writes_json_csv(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "available", lambda name: name not in ("matplotlib", "tqdm"))
    real_run, before_run = measure.run, []

    def run(*args, **kwargs):
        before_run.append(capsys.readouterr().err)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(measure, "run", run)
    rc = bench.main(["--arch", "tiny", "--resolutions", "64", "--ratios", "0.5", "--steps", "1", "--warmup", "0",
                     "--no-isolate", "--out", str(tmp_path)])
    assert rc == 0
    assert "matplotlib is not installed: writing results.json and results.csv only" in before_run[0]
    out = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.json"] and "bench.png" not in out


def test_backend_comes_from_the_environment(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TOMESD_BACKEND", "torch")
    args = ["--arch", "tiny", "--resolutions", "64", "--ratios", "0.5", "--steps", "1", "--warmup", "0",
            "--no-isolate", "--no-progress", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    env_json = json.loads((tmp_path / "results.json").read_text())["environment"]
    assert env_json["config"]["backend"] == "torch" and env_json["backend_refused"] == {"cuda": "TOMESD_BACKEND=torch"}
    monkeypatch.setenv("TOMESD_BACKEND", "bogus")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().splitlines()[-1] == (
        "tomesd-bench: error: TOMESD_BACKEND='bogus' is not one of auto, torch, cuda (unset it for auto)")


def test_settings_are_variants_times_axes_at_every_ratio():
    cfg = bench.default_config("cpu", arch="tiny", resolutions=(64,), ratios=(0.3, 0.5),
                               variants=({"mode": "tokens"}, {"mode": "kv", "prop_attn": False}),
                               grid={"share_plan": (False, True)})
    assert bench.settings(cfg) == [
        {"mode": "tokens", "share_plan": False}, {"mode": "tokens", "share_plan": True},
        {"mode": "kv", "prop_attn": False, "share_plan": False}, {"mode": "kv", "prop_attn": False, "share_plan": True}]
    points = bench.grid(cfg)
    assert points[0] == (64, None, {}) and len(points) == 1 + 4 * 2
    assert points[1:3] == [(64, 0.3, {"mode": "tokens", "share_plan": False}), (64, 0.5, {"mode": "tokens", "share_plan": False})]
    assert bench.settings(bench.default_config("cpu", arch="tiny")) == [{}]  # apply_patch's defaults
    plain = bench.default_config("cpu", arch="tiny", calls=3)
    assert [bench.calls_per_window(plain, {"plan_every": k}) for k in (1, 2, 3, 5)] == [3, 4, 3, 5]


def test_plan_every_windows_hold_one_build_per_period_and_vary_the_timestep(monkeypatch):
    """A reused plan must count at its real rate: every timed window holds whole plan_every periods
    (exactly one build per plan_every calls), and the timestep changes at every call as in a sampler."""
    from tomesd.patch import PlanProvider

    cfg = bench.default_config("cpu", arch="tiny", resolutions=(64,), ratios=(0.5,), steps=2, warmup=1, isolate=False,
                               calls=2, grid={"plan_every": (3,)})
    unet = bench.load_unet(cfg)
    calls, builds = [], []
    unet.register_forward_pre_hook(lambda m, args: calls.append(int(args[1])))
    real_build = PlanProvider.build
    monkeypatch.setattr(PlanProvider, "build", lambda self, request: builds.append(len(calls) - 1) or real_build(self, request))
    row = bench.measure_point(unet, cfg, 64, 0.5, {"plan_every": 3})
    assert row["calls"] == 3 and row["status"] == "ok" and row["params"] == {"plan_every": 3}
    assert len(calls) == 1 + 2 * 3 and len(set(calls)) == len(calls) == len(bench.timesteps(0, 7))
    assert calls == bench.timesteps(0, 7)
    built_at = sorted(set(builds))
    assert built_at == [0, 3, 6]  # calls 1-3 and 4-6 are the two windows: one build each
    assert not tomesd.is_patched(unet)


def test_interleaved_run_is_round_robin_with_one_warmup(monkeypatch):
    cfg = bench.default_config("cpu", arch="tiny", resolutions=(64,), ratios=(0.5,), steps=3, warmup=2,
                               interleave=True, variants=({"mode": "tokens"}, {"mode": "kv"}))
    assert not cfg.isolated
    order = []
    ms = iter(range(1, 100))

    def fake(unet, args, kwargs, calls=1, warmup=0, steps=1, first=0, **_):
        state = tomesd.patch.patched_state(unet)
        order.append((state.config.mode if state else "baseline", warmup, steps, first))
        return [float(next(ms))]

    monkeypatch.setattr(timing, "time_calls", fake)
    result = bench.run(cfg, progress=False)
    # window k of every point before window k + 1 of any; warmup calls only before a point's first window
    assert order == [(mode, 2 if k == 0 else 0, 1, k) for k in range(3) for mode in ("baseline", "tokens", "kv")]
    rows = result.rows
    assert [r["ms_per_step"] for r in rows] == [4.0, 5.0, 6.0]  # medians of windows (1, 4, 7), (2, 5, 8), (3, 6, 9)
    assert rows[1]["setting"] == "tome 0.5 mode=tokens" and rows[2]["speedup"] == pytest.approx(4 / 6)
    assert all(r["peak_mem_mib"] is None for r in rows)  # a CPU's peak RSS is not per point in one process


def _main_at_fake_speed(monkeypatch, tmp_path, *argv) -> dict:
    """bench.main(argv) on the toy with the timing replaced by ms = 100 · (1 − ratio), or 1.5× that in kv
    mode (speedups 1/(1 − r) and 2/(3(1 − r))); returns results.json's "target"."""

    def fake(unet, args, kwargs, **window):
        state = tomesd.patch.patched_state(unet)
        if state is None:
            return [100.0]
        return [100.0 * (1 - state.config.ratio) * (1.5 if state.config.mode == "kv" else 1.0)]

    monkeypatch.setattr(timing, "time_calls", fake)
    rc = bench.main(["--arch", "tiny", *argv, "--no-isolate", "--warmup", "0", "--steps", "1", "--no-progress",
                     "--out", str(tmp_path)])
    assert rc == 0
    return json.loads((tmp_path / "results.json").read_text())["target"]


def test_target_speedup_prints_a_mapping_ready_for_apply_patch(monkeypatch, tmp_path, capsys):
    import ast

    target = _main_at_fake_speed(monkeypatch, tmp_path, "--resolutions", "64,128", "--ratios", "0.3,0.5,0.7",
                                 "--set", "mode=tokens,kv", "--target-speedup", "1.9")
    out = capsys.readouterr().out.splitlines()
    # tokens: speedups 1.43 / 2 / 3.33 → 0.5 reaches 1.9x; kv: 0.95 / 1.33 / 2.22 → only 0.7
    lines = {line.split()[1]: line for line in out if line.startswith("  tome mode=")}
    assert lines["mode=tokens"].split(None, 2)[2].strip() == "{64: 0.5, 128: 0.5}"
    assert lines["mode=kv"].split(None, 2)[2].strip() == "{64: 0.7, 128: 0.7}"
    use = [line for line in out if line.startswith("use: ")]
    assert use == ["use: apply_patch(model, ratio={64: 0.5, 128: 0.5}, mode='tokens')"]
    mapping = ast.literal_eval(use[0].split("ratio=", 1)[1].split(", mode")[0])
    unet = bench.load_unet(bench.default_config("cpu", arch="tiny"))
    tomesd.apply_patch(unet, ratio=mapping, mode="tokens")  # ready as printed
    tomesd.remove_patch(unet)
    assert target["speedup"] == 1.9 and target["best"]["params"] == {"mode": "tokens"}
    assert target["best"]["ratio"] == {"64": 0.5, "128": 0.5} and target["settings"][1]["not_reached"] == {}


def test_target_not_reached_is_said_plainly(monkeypatch, tmp_path, capsys):
    target = _main_at_fake_speed(monkeypatch, tmp_path, "--resolutions", "64", "--ratios", "0.3,0.5",
                                 "--variant", "mode=kv", "--target-speedup", "1.5")
    out = capsys.readouterr().out
    assert "tome mode=kv  -   not reached at 64 px (best 1.33x at ratio 0.5)" in out
    assert "no setting reaches 1.5x at any resolution" in out and "use: apply_patch" not in out
    assert target["best"] is None and target["settings"][0]["not_reached"]["64"]["at_ratio"] == 0.5


def test_target_ratios_picks_the_setting_covering_most_resolutions():
    def row(res, ratio, params, speedup):
        return dict(resolution=res, method="tome", ratio=ratio, params=params, speedup=speedup, status="ok")

    rows = [dict(resolution=r, method="baseline", ratio=None, params=None, speedup=1.0, status="ok") for r in (512, 768)]
    rows += [row(512, 0.3, {"mode": "kv"}, 1.6), row(768, 0.3, {"mode": "kv"}, 1.2), row(768, 0.7, {"mode": "kv"}, 1.4),
             row(512, 0.5, {}, 1.5), row(768, 0.5, {}, 1.5), row(768, 0.3, {}, None)]
    target = bench.target_ratios(bench.BenchResult(rows=rows), 1.5)
    kv, plain = target["settings"]
    assert kv["ratio"] == {512: 0.3} and kv["not_reached"] == {768: {"best_speedup": 1.4, "at_ratio": 0.7}}
    assert plain["ratio"] == {512: 0.5, 768: 0.5} and target["best"] is plain
    text = bench.format_target(target)
    assert "not reached at 768 px (best 1.40x at ratio 0.7)" in text and "use: apply_patch(model, ratio={512: 0.5, 768: 0.5})" in text

"""The CPU default of tomesd.bench (tomesd.bench.cpu): interleaved rounds, noise bands, threads, load
warnings — on the toy UNet with the timing seam (timing.time_calls) replaced by scripted times."""
import json

import pytest
import torch

from tomesd import bench
from tomesd.bench import cpu as bench_cpu
from tomesd.tools import cli, threads, timing


def _fake_times(monkeypatch, ms):
    """time_calls → ms(part, setting label, round) for one window; records the order of the calls."""
    order = []

    def fake(model, args, kwargs, *, calls=1, warmup=0, steps=1, first=0, device="cpu", timestep_scale=1.0):
        import tomesd
        from tomesd.patch import patched_state

        part = "finest block" if "hidden_states" in kwargs else "whole step"
        state = patched_state(model)
        setting = "baseline" if state is None else ("fast" if state.config.prop_attn else "default")
        order.append((first, part, setting, warmup))
        assert tomesd.is_patched(model) == (setting != "baseline")
        return [ms(part, setting, first)] * steps

    monkeypatch.setattr(timing, "time_calls", fake)
    return order


def _machine(monkeypatch, load, physical=2):
    """A machine of `physical` idle-able cores at this load average, for the threads choice and the warnings."""
    monkeypatch.setattr(timing, "load_average", lambda: load)
    monkeypatch.setattr(threads, "read_machine", lambda: threads.Machine(physical, physical, physical, None, load))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def _main(tmp_path, capsys, *extra):
    rc = bench.main(["--arch", "tiny", "--device", "cpu", "--no-progress", "--out", str(tmp_path), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_default_cpu_run_is_interleaved_with_medians_bands_and_verdicts(tmp_path, capsys, monkeypatch):
    base = {"whole step": 1000.0, "finest block": 4000.0}
    speed = {"baseline": 1.0, "default": 1.02, "fast": 1.5}
    jitter = [1.0, 1.03, 0.98, 1.01]  # rounds that agree within a few percent
    order = _fake_times(monkeypatch, lambda part, s, k: base[part] / speed[s] * jitter[k] * (1.03 if s != "baseline" and k == 1 else 1))
    _machine(monkeypatch, 0.1)
    rc, out, err = _main(tmp_path, capsys)
    assert rc == 0
    # round-robin: every case once per round, the rounds in order, warmup only in the first
    assert [o[0] for o in order] == [k for k in range(4) for _ in range(6)]
    assert [o[1:3] for o in order[:6]] == [(p, s) for p in ("whole step", "finest block")
                                           for s in ("baseline", "default", "fast")]
    assert {o[3] for o in order[:6]} == {1} and {o[3] for o in order[6:]} == {0}
    data = json.load(open(tmp_path / "results.json"))
    rows = {(r["part"], r["setting"]): r for r in data["rows"]}
    rec = rows[("finest block", "fast")]
    assert rec["resolution"] == 1024 and rec["speedup"] == pytest.approx(1.5)  # medians: jitter cancels
    assert rec["verdict"] == "faster" and rec["speedup_min"] > 1
    assert rows[("whole step", "default")]["verdict"] == "within noise"  # 1.02x, one round slower than its baseline
    assert "torch threads: 2 (2 cores, load 0.1 → 2 free; --threads N to override)" in err and torch.get_num_threads() == 2
    assert "fast = apply_patch(ratio=0.7, prop_attn=True, merge_mlp=True)" in err
    assert "finest block" in out and "not a whole step" in out and "warning" not in err
    assert data["environment"]["load_average"] == 0.1 and data["environment"]["warnings"] == []
    assert (tmp_path / "bench.png").stat().st_size > 0 and "bench.png" in out  # README: the CPU default writes it too


def test_without_matplotlib_the_cpu_default_says_so_first_and_writes_no_png(tmp_path, capsys, monkeypatch):
    _fake_times(monkeypatch, lambda part, s, k: 100.0)
    _machine(monkeypatch, 0.1)
    real = cli.available
    monkeypatch.setattr(cli, "available", lambda name: name != "matplotlib" and real(name))
    rc, out, err = _main(tmp_path, capsys, "--steps", "2")
    assert rc == 0 and "matplotlib is not installed: writing results.json and results.csv only" in err.splitlines()[1]
    assert (tmp_path / "results.json").is_file() and not (tmp_path / "bench.png").exists()


def test_a_loaded_machine_or_disagreeing_rounds_are_warned(tmp_path, capsys, monkeypatch):
    _fake_times(monkeypatch, lambda part, s, k: 100.0 * (3 if k == 2 and part == "whole step" else 1))
    _machine(monkeypatch, 7.5)
    rc, out, err = _main(tmp_path, capsys, "--threads", "2")
    assert rc == 0 and "torch threads: 2 as asked (--threads; 2 cores, load 7.5 → 1 free)" in err
    assert "warning: load average 7.5 on 2 core(s): other processes are running" in err
    assert "warning: rounds disagree by more than 25% at whole step baseline, whole step default" in err
    _fake_times(monkeypatch, lambda part, s, k: 100.0)
    rc, out, err = _main(tmp_path, capsys)  # without --threads: the one free core
    assert rc == 0 and "torch threads: 1 (2 cores, load 7.5 → 1 free; --threads N to override)" in err
    assert torch.get_num_threads() == 1


def test_a_grid_argument_or_a_gpu_keeps_the_grid(monkeypatch):
    args = bench.build_parser().parse_args(["--arch", "tiny", "--resolutions", "64"])
    cfg = bench.default_config("cpu", arch="tiny", resolutions=(64,))
    assert not bench.cpu_default(args, cfg)
    args = bench.build_parser().parse_args([])
    assert bench.cpu_default(args, bench.default_config("cpu"))
    assert not bench.cpu_default(args, bench.default_config("cuda"))


def test_physical_cores_and_the_finest_block():
    assert timing.physical_cores() >= 1
    from tomesd.tools import models

    unet = models.load_denoiser("tiny")
    block, down = bench_cpu.finest_block(unet)
    assert type(block).__name__ == "Transformer2DModel" and down == 1
    (_, _, _, step_args, _), (_, px, model, args, kwargs) = bench_cpu.cases(unet, torch.float32)
    assert model is block and args == () and kwargs["hidden_states"].shape[-2:] == (px // 8, px // 8)
    assert step_args[0].shape[-1] == bench_cpu.STEP_PX // 8

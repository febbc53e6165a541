"""benchmarks/bench_modes.py and benchmarks/pareto.py (issue 11's measurement) end to end on the toy
UNet: the JSON they write and read, the speed-up formula, the Pareto marks. Timing values are not
checked (benchmarks measure, tests do not)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import pareto  # noqa: E402


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def modes_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("modes") / "modes.json"
    proc = run("benchmarks/bench_modes.py", "--arch", "tiny", "--resolutions", "64", "--ratios", "0.5",
               "--rounds", "2", "--full-calls", "1", "--extra",
               "--only", "tokens,kv+prop plan_every 5,kv+prop sx4 md2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_bench_modes_rows_and_formula(modes_json):
    block = modes_json["resolutions"]["64"]
    f = block["fraction"]["fraction"]
    assert 0 < block["fraction"]["level1"] < f < 1
    rows = block["rows"]
    names = [(r["setting"], r["ratio"]) for r in rows]
    assert names == [("no ToMe", None), ("tokens", 0.5), ("kv+prop plan_every 5", 0.5),
                     ("kv+prop sx4 md2", 0.7), ("kv+prop sx4 md2", 0.8),
                     ("kv+prop sx4 md2", 0.9)]
    base = rows[0]["ms"]
    for r in rows:
        assert len(r["ms_all"]) == 2  # one timed window (ms per call) per round
        assert r["step_speedup"] == pytest.approx(1 / (1 - f + f * r["ms"] / base))
    assert rows[3]["params"] == dict(mode="kv", prop_attn=True, sx=4, sy=4, max_downsample=2)


def test_bench_modes_unknown_setting_is_an_error():
    proc = run("benchmarks/bench_modes.py", "--arch", "tiny", "--only", "tokens,kv+propp", timeout=120)
    assert proc.returncode == 2 and "kv+propp" in proc.stderr and "known:" in proc.stderr


def test_pareto_joins_on_filled_in_defaults(modes_json, tmp_path):
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps(modes_json))
    rows = [dict(params={}, psnr=float("inf"), ssim=1.0, accuracy=1.0),
            # tokens @ 0.5 written with its defaults spelled out: must match the bench's dict(mode="tokens")
            dict(params=dict(ratio=0.5, mode="tokens", prop_attn=False, sx=2, max_downsample=1), psnr=40.0,
                 ssim=0.99, accuracy=1.0),
            # kv with prop_attn left to its default (on in kv mode)
            dict(params=dict(ratio=0.5, mode="kv", plan_every=5), psnr=60.0, ssim=1.0, accuracy=1.0),
            dict(params=dict(ratio=0.9, mode="kv", sx=4, sy=4, max_downsample=2), psnr=30.0,
                 ssim=0.9, accuracy=0.9)]
    quality = tmp_path / "q.json"
    quality.write_text(json.dumps(dict(rows=rows)))
    table = pareto.tables([str(speed)], [str(quality)])
    lines = [line for line in table.splitlines() if line.startswith("| ") and "@" in line]
    assert len(lines) == 3  # the two 4x4 rows at 0.7 / 0.8 have no quality: left out
    by_label = {line.split(" | ")[0][2:]: line for line in lines}
    assert set(by_label) == {"tokens @ 0.5", "kv+prop, plan_every 5 @ 0.5",
                             "kv+prop, 4x4 cells, max_downsample 2 @ 0.9"}
    assert " 40.0 " in by_label["tokens @ 0.5"] and " 60.0 " in by_label["kv+prop, plan_every 5 @ 0.5"]
    assert "1.00x" in by_label["tokens @ 0.5"]  # ÷ tokens 0.5's own speed-up
    # the only setting at ≥ tokens 0.5's PSNR (40 dB) is kv+prop plan_every 5 (60 dB), whatever the speeds
    assert "Fastest at PSNR ≥ tokens 0.5's (40.0 dB): kv+prop, plan_every 5 @ 0.5," in table
    front = pareto.tables([str(speed)], [str(quality)], front_only=True)
    kept = [line for line in front.splitlines() if line.startswith("| ") and "@" in line]
    assert all("| yes" in line or line.startswith("| tokens @ 0.5 ") for line in kept)
    assert len(kept) >= 2 and any(line.startswith("| tokens @ 0.5 ") for line in kept)


def test_pareto_front():
    assert pareto.pareto([(1.0, 40.0), (1.2, 50.0), (1.5, 30.0), (1.1, 45.0)]) == [False, True, True, False]
    assert pareto.pareto([(1.0, 40.0), (1.0, 40.0)]) == [True, True]  # ties dominate nothing


def test_bench_modes_refit_recomputes_step_speedups(modes_json, tmp_path):
    path = tmp_path / "modes.json"
    path.write_text(json.dumps(modes_json))
    proc = run("benchmarks/bench_modes.py", "--arch", "tiny", "--resolutions", "64", "--full-calls", "1",
               "--refit", str(path))
    assert proc.returncode == 0, proc.stderr
    block = json.loads(path.read_text())["resolutions"]["64"]
    assert block["fraction_before_refit"] == modes_json["resolutions"]["64"]["fraction"]
    f, rows = block["fraction"]["fraction"], block["rows"]
    assert [r["ms"] for r in rows] == [r["ms"] for r in modes_json["resolutions"]["64"]["rows"]]  # times kept
    for r in rows:
        assert r["step_speedup"] == pytest.approx(1 / (1 - f + f * r["ms"] / rows[0]["ms"]))


def test_pareto_combined_table_and_first_file_wins(modes_json, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(modes_json))
    other = json.loads(json.dumps(modes_json))
    for row in other["resolutions"]["64"]["rows"]:
        row["step_speedup"] = 9.99  # a second file's value for the same settings: ignored
    other["resolutions"]["128"] = other["resolutions"].pop("64")  # ... but it adds a resolution
    second.write_text(json.dumps(other))
    quality = tmp_path / "q.json"
    quality.write_text(json.dumps(dict(rows=[
        dict(params=dict(ratio=0.5), psnr=41.0, psnr_min=30.0, ssim=0.99, accuracy=1.0),
        dict(params=dict(ratio=0.5, mode="kv", plan_every=5), psnr=60.0, psnr_min=50.0, ssim=1.0, accuracy=1.0)])))
    table = pareto.combined([str(first), str(second), str(second)], [str(quality)])
    lines = table.splitlines()
    assert lines[0].startswith("| setting | 64 px | 128 px | PSNR dB | min PSNR dB |")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[2:]}
    want = {r["setting"]: r["step_speedup"] for r in modes_json["resolutions"]["64"]["rows"] if r["ratio"] == 0.5}
    assert rows["tokens @ 0.5"][1] == f"{want['tokens']:.2f}x" and rows["tokens @ 0.5"][2] == "9.99x"
    kv = rows["kv+prop, plan_every 5 @ 0.5"]
    assert kv[1] == f"{want['kv+prop plan_every 5']:.2f}x ({want['kv+prop plan_every 5'] / want['tokens']:.2f})"
    assert kv[2] == "9.99x (1.00)" and kv[3] == "60.0" and kv[4] == "50.0"

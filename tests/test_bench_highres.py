"""benchmarks/bench_highres.py (issue 19's high-resolution tables) and benchmarks/local_matching_where.py end
to end on small models: the points they time, the step formula, the memory child, the analysis table.
Timing values are not checked (benchmarks measure, tests do not)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_bench_highres_points_formula_and_memory(tmp_path):
    out = tmp_path / "highres.json"
    proc = run("benchmarks/bench_highres.py", "--arch", "tiny", "--resolutions", "128", "--rounds", "1",
               "--warmup", "", "--check-full", "128", "--memory", "128", "--windows", "3",
               "--prop-windows", "5", "--only", "no ToMe,tomesd 0.1.3 0.5,default (tokens 0.5),0.7 prop",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    entry = data["resolutions"]["128"]
    assert list(data["levels"]) == list(entry["levels"]) == ["1"] and "composed" not in entry
    rows = {r["setting"]: r for r in entry["levels"]["1"]["rows"]}
    assert list(rows) == ["no ToMe", "tomesd 0.1.3 0.5", "default (tokens 0.5) global", "default (tokens 0.5) k=3",
                          "0.7 prop global", "0.7 prop k=3", "0.7 prop k=5"]
    assert rows["0.7 prop k=5"]["params"] == dict(ratio=0.7, prop_attn=True, match_window=5)
    L, rest, base = data["levels"]["1"]["modules"], entry["rest_s"], rows["no ToMe"]["block_s"]
    for row in rows.values():  # step = L · block + rest, speed-up against the unpatched step
        assert row["step_s"] == pytest.approx(L * row["block_s"] + rest)
        assert row["step_speedup"] == pytest.approx((L * base + rest) / row["step_s"])
        assert ("matching_share" in row) == (row["params"] is not None)
    assert entry["full_step_s"] > 0 and 0 < entry["levels"]["1"]["share"] < 1
    memory = {name: row["peak_rss_growth_gib"] for name, row in rows.items() if "peak_rss_growth_gib" in row}
    assert set(memory) == set(rows)  # every setting --only names, the baselines named too
    assert all(v >= 0 for v in memory.values())
    assert "| 0.7 prop k=5 |" in proc.stdout


def test_bench_highres_composes_two_levels(tmp_path):
    """--level 1,2: both levels timed, every pair of settings composed (step = Σ L_d · block_d + rest)."""
    out = tmp_path / "levels.json"
    proc = run("benchmarks/bench_highres.py", "--arch", "tiny", "--level", "1,2", "--resolutions", "64", "--rounds", "1",
               "--warmup", "", "--check-full", "", "--memory", "", "--windows", "", "--prop-windows", "3",
               "--only", "0.5 prop mlp share", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    entry = data["resolutions"]["64"]
    rows = {d: {r["setting"]: r for r in entry["levels"][d]["rows"]} for d in ("1", "2")}
    assert list(rows["2"]) == ["no ToMe", "tomesd 0.1.3 0.5", "0.5 prop mlp share global", "0.5 prop mlp share k=3"]
    counts = {d: data["levels"][d]["modules"] for d in ("1", "2")}
    pairs = {tuple(c["settings"][d] for d in ("1", "2")): c for c in entry["composed"]}
    assert len(pairs) == 16
    base = entry["rest_s"] + sum(counts[d] * rows[d]["no ToMe"]["block_s"] for d in counts)
    for (a, b), c in pairs.items():
        step = entry["rest_s"] + counts["1"] * rows["1"][a]["block_s"] + counts["2"] * rows["2"][b]["block_s"]
        assert c["step_s"] == pytest.approx(step) and c["step_speedup"] == pytest.approx(base / step)
    assert rows["2"]["0.5 prop mlp share k=3"]["step_s"] == pytest.approx(  # /2 alone: /1 unpatched
        base - counts["2"] * (rows["2"]["no ToMe"]["block_s"] - rows["2"]["0.5 prop mlp share k=3"]["block_s"]))
    assert "| setting at /1 | setting at /2 | step speed-up |" in proc.stdout
def test_bench_highres_memory_only_measures_the_settings_named(tmp_path):
    """Issue 27 item 9: --memory-only --only SETTING measured no ToMe and tomesd 0.1.3 instead of SETTING."""
    out = tmp_path / "memory.json"
    proc = run("benchmarks/bench_highres.py", "--arch", "tiny", "--memory-only", "--memory", "64", "--windows", "",
               "--prop-windows", "", "--only", "4x4 0.9 prop", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(out.read_text())["memory_gib"]["64 px /1"]) == ["4x4 0.9 prop global"]


@pytest.mark.parametrize("argv, message", [
    (["--resolutions", "abc"], "argument --resolutions: expected comma-separated integers, got 'abc'"),
    (["--resolutions", "0"], "argument --resolutions: 0 is not a multiple of 8 px ≥ 8"),
    (["--resolutions", "100"], "argument --resolutions: 100 is not a multiple of 8 px ≥ 8 (8 px per latent token; not rounded)"),
    (["--resolutions", ""], "argument --resolutions: expected at least one value, each a multiple of 8 px"),
    (["--memory", "1000,12"], "argument --memory: 12 is not a multiple of 8 px"),
    (["--windows", "abc"], "argument --windows: expected comma-separated integers, got 'abc'"),
    (["--windows", "2"], "argument --windows: 2 is not an odd window k ≥ 1 (k × k cells)"),
    (["--prop-windows", "0"], "argument --prop-windows: 0 is not an odd window k ≥ 1"),
    (["--rounds", "0"], "argument --rounds: must be ≥ 1, got 0"),
    (["--rest-calls", "0"], "argument --rest-calls: must be ≥ 1, got 0"),
    (["--level", "0"], "argument --level: 0 is not a downsample factor ≥ 1"),
    (["--only", ","], "--only: unknown setting(s) []"),
])
def test_bench_highres_bad_arguments_are_one_line(argv, message, capsys):
    """Issue 27 item 9: tracebacks for --resolutions abc / 0, --windows abc / 2, --rounds 0; --resolutions
    100 silently ran at 96 px."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_highres

    with pytest.raises(SystemExit) as exit_info:
        bench_highres.main(["--arch", "tiny", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert message in err


def test_bench_highres_refuses_unknown_settings_and_levels():
    proc = run("benchmarks/bench_highres.py", "--arch", "tiny", "--only", "fastest")
    assert proc.returncode == 2 and "--only: unknown setting(s) ['fastest']" in proc.stderr
    proc = run("benchmarks/bench_highres.py", "--arch", "tiny", "--level", "3", "--resolutions", "64")
    assert proc.returncode == 2 and "--level 3: tiny has no transformer block at that downsample" in proc.stderr
    proc = run("benchmarks/bench_highres.py", "--arch", "tiny", "--level", "2,2", "--resolutions", "64")
    assert proc.returncode == 2 and "a level is given twice" in proc.stderr
    proc = run("benchmarks/bench_highres.py", "--arch", "tiny", "--level", "2", "--resolutions", "72")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        "--resolutions: 72 px is not a multiple of 16 (8 px per latent token × the level's downsample 2); not rounded")


def test_local_matching_where_reports_every_window(tmp_path):
    pytest.importorskip("sklearn")  # the photos model's photographs
    out = tmp_path / "where.json"
    proc = run("benchmarks/local_matching_where.py", "--size", "32", "--steps", "2", "--keep", "1",
               "--windows", "3,31", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {r["window"]: r for r in json.loads(out.read_text())["calls"]["1"]}
    assert list(rows) == ["global", "k=3", "k=31"]
    assert rows["global"]["forced"] == 0 and rows["global"]["same_as_global"] == 1.0
    # a 3 × 3 window has fewer candidates: its merged partners are less alike; a window covering the
    # 16 × 16 cells of a 32 px canvas is the global matching
    assert rows["k=3"]["mean_sim"] < rows["global"]["mean_sim"]
    assert rows["k=31"]["mean_sim"] == pytest.approx(rows["global"]["mean_sim"]) and rows["k=31"]["forced"] == 0

"""benchmarks/bench_mmdit.py end to end on toy-width SD 3.5 / Flux: the full step composed from the cut
model's blocks by kind, plan builds and rest; its strict command line. Timing values are not checked."""
import json

import pytest

from test_bench_highres import run

FLUX = {"double": 19, "single": 38}
SD3 = {"dual": 13, "joint": 10, "last": 1}


@pytest.mark.parametrize("arch,layers,counts", [("flux", "1", FLUX), ("sd3", "3", SD3)])
def test_full_step_is_composed_from_blocks_plans_and_rest(arch, layers, counts, tmp_path):
    out = tmp_path / "mmdit.json"
    proc = run("benchmarks/bench_mmdit.py", "--arch", arch, "--toy", "--layers", layers, "--resolutions", "64",
               "--rounds", "1", "--no-warmup", "--setting", "mode=tokens,ratio=0.5",
               "--setting", "mode=tokens,ratio=0.5,share_plan=true,match_window=3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["toy"] and data["full_blocks"] == counts
    entry = data["px"]["64"]
    rows = entry["rows"]
    assert list(rows) == ["no ToMe", "mode=tokens ratio=0.5", "mode=tokens ratio=0.5 share_plan=True match_window=3"]
    assert rows["no ToMe"]["builds_per_call"] == 0
    assert rows["mode=tokens ratio=0.5"]["builds_per_call"] == pytest.approx(sum(counts.values()))  # one per block
    assert rows["mode=tokens ratio=0.5 share_plan=True match_window=3"]["builds_per_call"] == 1
    for row in rows.values():
        blocks = sum(counts[k] * row["block_s"][k] for k in counts)
        assert row["block_s"].keys() == counts.keys()
        assert row["full_step_s"] == pytest.approx(row["rest_s"] + blocks + row["builds_per_call"] * row["plan_s"])
        assert row["speedup"] == pytest.approx(rows["no ToMe"]["full_step_s"] / row["full_step_s"])
    assert 0 < entry["blocks_share"] < 1 and entry["ceiling"] == pytest.approx(1 / (1 - entry["blocks_share"]))
    assert "ceiling" in proc.stdout and "share_plan=True match_window=3" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--setting", "mode=fast"], "mode must be one of"),
    (["--setting", "ratio"], "expected KEY=VALUE"),
    (["--resolutions", "100"], "multiples of 16 px"),
    (["--arch", "sd3", "--layers", "2"], "at least 3 blocks"),
    (["--setting", "ratio=0.5", "--ratios", "0.5"], "not both"),
    (["--modes", "kv"], "give --ratios too"),
    (["--ratios", "0.5,x"], "expected comma-separated numbers"),
])
def test_command_line_errors_are_one_line(args, message):
    proc = run("benchmarks/bench_mmdit.py", "--toy", "--resolutions", "64", *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1 and "Traceback" not in proc.stderr

"""examples/speed_memory.ipynb runs top to bottom: on a CPU it is tomesd.bench's CPU default (the
interleaved rounds of tomesd.bench.cpu.run, with noise bands and load warnings), here on the toy
architecture at small sizes (the parameters cell, as papermill would set it); its default, the real
SD 1.5 UNet at 512 / 1024 px, takes minutes on a CPU."""
import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_notebook_runs_the_cpu_default_with_bands_and_load(tmp_path, monkeypatch):
    nb = nbformat.read(os.path.join(ROOT, "examples", "speed_memory.ipynb"), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    out_dir = tmp_path / "results"
    params.source += (f"\narch = 'tiny'\nstep_px = 64\nblock_px = 128\nrounds = 2\nwarmup = 0\nthreads = 1\n"
                      f"out_dir = {str(out_dir)!r}\n")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "torch threads: 1 as asked (threads =; " in text
    assert "the CPU default: default = apply_patch(ratio=0.5)" in text
    assert "round 2/2: finest block 128 px, fast" in text  # the interleaved harness's progress
    table = [line.split() for line in text.splitlines()]
    header = next(row for row in table if row[:2] == ["part", "px"])
    assert "noise" in header and "speedup" in header
    assert any(row[:4] == ["whole", "step", "64", "baseline"] for row in table)
    assert "toy architecture (--arch tiny)" in text  # the toy is labelled
    data = json.loads((out_dir / "results.json").read_text())
    rows, env = data["rows"], data["environment"]
    assert [(r["part"], r["resolution"], r["setting"]) for r in rows] == [
        (part, px, s) for part, px in (("whole step", 64), ("finest block", 128)) for s in ("baseline", "default", "fast")]
    assert all(len(r["times_ms"]) == 2 for r in rows)
    assert all(r["speedup_min"] <= r["speedup"] <= r["speedup_max"] for r in rows if r["params"])
    assert env["cpu_default"]["rounds"] == 2 and env["config"]["arch"] == "tiny"
    assert "load average" in text and "(1 minute)" in text
    assert all(f"warning: {line}" in text for line in env["warnings"])  # whatever the load was, it is said
    for r in rows[1:3] + rows[4:]:  # one line per setting with its band and verdict
        assert f"{r['setting']:<8} speed-up {r['speedup']:.2f}x  (band {r['speedup_min']:.2f}-" in text
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
    assert (out_dir / "bench.png").is_file()

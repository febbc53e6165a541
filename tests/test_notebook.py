"""examples/speed_memory.ipynb runs top to bottom on the toy architecture (small grid, one step); its
default, the real SD 1.5 UNet, takes minutes on a CPU."""
import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_notebook_executes_and_shows_table_and_plot(tmp_path, monkeypatch):
    nb = nbformat.read(os.path.join(ROOT, "examples", "speed_memory.ipynb"), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    out_dir = tmp_path / "results"
    # what papermill would inject: the toy architecture on a small grid
    params.source += f"\narch = 'tiny'\nresolutions = (64, 128)\nratios = (0.5,)\nsteps = 1\nout_dir = {str(out_dir)!r}\n"
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    table = [line.split() for line in text.splitlines()]
    assert ["128", "tome", "0.5"] == next(row[:3] for row in table if row[:2] == ["128", "tome"])
    assert "toy architecture (--arch tiny)" in text  # the toy is labelled in the table
    assert "128 px  ratio 0.5:  ok" in text
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
    rows = json.loads((out_dir / "results.json").read_text())["rows"]
    assert [(r["resolution"], r["ratio"]) for r in rows] == [(64, None), (64, 0.5), (128, None), (128, 0.5)]
    assert json.loads((out_dir / "results.json").read_text())["environment"]["config"]["arch"] == "tiny"

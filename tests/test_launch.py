"""`accelerate launch --num_processes N [--cpu] examples/generate_highres.py`: where accelerate starts one
process (fewer than two GPUs, or --cpu without MPI), the script runs again as N torchrun workers, each
making its share of the prompts (tomesd.tools.launch). Two processes splitting the prompts through
torchrun itself: tests/test_examples.py."""
import importlib.util
import os
import subprocess
import sys

import pytest

from tomesd.tools import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "generate_highres.py")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
SIMPLE = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}

spec = importlib.util.spec_from_file_location("generate_highres_launch", SCRIPT)
highres = importlib.util.module_from_spec(spec)
spec.loader.exec_module(highres)


def test_one_process_started_for_several_is_recognized():
    assert launch.simple_launcher_asked(SIMPLE)
    assert not launch.simple_launcher_asked({**SIMPLE, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})  # torchrun's
    assert not launch.simple_launcher_asked({**SIMPLE, "OMPI_COMM_WORLD_SIZE": "2"})  # MPI's: accelerate's multi-CPU
    no_port = dict(SIMPLE)
    del no_port["MASTER_PORT"]  # accelerate sets it only for several processes
    assert not launch.simple_launcher_asked(no_port) and not launch.simple_launcher_asked({})


def test_the_processes_asked_are_read_from_the_launchers_command_line(tmp_path):
    argv = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "3", "--cpu", "g.py", "--prompt", "a"]
    assert launch.asked_processes(argv) == 3
    assert launch.asked_processes([sys.executable, "-m", "accelerate.commands.launch", "--num_processes=2", "g.py"]) == 2
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 4\n")
    assert launch.asked_processes(["accelerate", "launch", "--config_file", str(config), "g.py"]) == 4
    assert launch.asked_processes(["python", "g.py"]) is None  # not accelerate: cannot tell
    assert any("pytest" in part for part in launch.parent_argv(os.getpid())) and launch.parent_argv(0) == []
    assert launch.relaunch_command(2, "g.py", ["--x"])[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "g.py", "--x"]


def test_what_cannot_run_again_is_one_line():
    assert launch.relaunch_problem(2, on_cpu=True, gpus=0) == ""
    assert launch.relaunch_problem(2, on_cpu=False, gpus=2) == ""
    assert "on 1 GPU(s): one process per GPU; add --cpu" in launch.relaunch_problem(2, on_cpu=False, gpus=1)
    assert "accelerate launch --multi_gpu --num_processes N" in launch.relaunch_problem(None, on_cpu=True, gpus=0)


def test_generate_highres_runs_again_as_the_processes_asked(monkeypatch, tmp_path, capsys):
    for name, value in SIMPLE.items():
        monkeypatch.setenv(name, value)
    for name in launch.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "parent_argv", lambda pid=None: ["accelerate", "launch", "--num_processes", "2", "--cpu",
                                                                 SCRIPT])
    runs = []
    monkeypatch.setattr(launch, "relaunch", lambda n, script, argv: runs.append((n, script, list(argv))) or 0)
    argv = ["--model", "reference", "--prompt", "1", "--prompt", "2", "--steps", "1", "--out", str(tmp_path / "d.png")]
    assert highres.main(argv) == 0
    assert runs == [(2, SCRIPT, argv)] and not list(tmp_path.iterdir())  # the workers make the images, not this process
    assert "accelerate launch started one process for --num_processes 2: running 2 torchrun workers" in capsys.readouterr().err
    monkeypatch.setattr(launch, "parent_argv", lambda pid=None: [])
    with pytest.raises(SystemExit) as exit_info:
        highres.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "how many cannot be read here" in err[0]


@pytest.mark.slow  # five Python processes (accelerate, this script, torchrun, two workers) load torch
def test_accelerate_launch_cpu_two_processes_each_write_their_share(tmp_path):
    out = tmp_path / "digit.png"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, "--model", "reference", "--prompt", "1",
         "--prompt", "2", "--steps", "2", "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 image(s) on 2 process(es)" in proc.stdout
    wrote = sorted(line.split()[:2] for line in proc.stdout.splitlines() if line.startswith("[process"))
    assert wrote == [["[process", "0]"], ["[process", "1]"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digit-000.png", "digit-001.png"]

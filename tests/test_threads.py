"""torch threads from the cores actually free (tomesd.tools.threads), its inputs made up: affinity,
cgroup quota (v2 and v1 files), load average, OMP_NUM_THREADS, --threads, processes; and the tools
that take --threads (bench: tests/test_bench_cpu.py)."""
import pytest
import torch

from tomesd.tools import threads

M = threads.Machine


@pytest.mark.parametrize("machine, expected, words", [
    (M(2, 2, 2, None, 1.6), 1, "2 cores, load 1.6 → 1 free"),
    (M(2, 2, 2, None, 0.4), 2, "2 cores, load 0.4 → 2 free"),
    (M(2, 2, 2, None, 9.0), 1, "load 9.0 → 1 free"),  # at least one
    (M(8, 8, 8, None, 3.4), 5, "8 cores, load 3.4 → 5 free"),
    (M(8, 3, 8, None, 0.0), 3, "3 cores (affinity 3 CPUs)"),
    (M(8, 8, 8, 2.5, 0.0), 3, "3 cores (cgroup quota 2.5 CPUs)"),  # a quota rounds up
    (M(4, 4, 64, 4.0, 32.0), 2, "load 32.0 on 64 CPUs, 2.0 on ours → 2 free"),  # a host's load, scaled to our share
    (M(4, 4, 4, None, None), 4, "load unknown → 4 free"),
])
def test_threads_are_the_free_cores(machine, expected, words):
    choice = threads.choose(machine)
    assert choice.threads == expected and words in choice.line
    assert choice.line.startswith(f"torch threads: {expected} (") and choice.line.endswith("; --threads N to override)")


def test_requests_win_and_processes_share():
    busy = M(2, 2, 2, None, 1.6)
    assert threads.choose(busy, 2).line == "torch threads: 2 as asked (--threads; 2 cores, load 1.6 → 1 free)"
    assert threads.choose(busy, env={"OMP_NUM_THREADS": "2"}).line.startswith("torch threads: 2 as asked (OMP_NUM_THREADS;")
    assert threads.choose(busy, 1, env={"OMP_NUM_THREADS": "2"}).threads == 1  # the argument before the environment
    assert threads.choose(busy, env={"OMP_NUM_THREADS": ""}).threads == 1  # empty or not a number: not a request
    shared = threads.choose(M(8, 8, 8, None, 1.0), processes=2)
    assert shared.threads == 3 and "7 free, 3 for each of 2 processes" in shared.line
    assert "threads = N to override" in threads.choose(busy, name="threads =").line
    for bad in (dict(threads=0), dict(processes=0)):
        with pytest.raises(ValueError, match="positive integer"):
            threads.choose(busy, **bad)


def _cgroup(tmp_path, files, own="0::/"):
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "self").write_text(own + "\n")
    return threads.cgroup_quota(str(tmp_path / "fs"), str(tmp_path / "self"))


def test_cgroup_quota_v2_v1_and_none(tmp_path):
    assert _cgroup(tmp_path / "a", {"cpu.max": "150000 100000\n"}) == 1.5
    assert _cgroup(tmp_path / "b", {"cpu.max": "max 100000\n"}) is None
    # the process's own cgroup and its parents: the smallest quota on the way up
    assert _cgroup(tmp_path / "c", {"job/cpu.max": "400000 100000", "cpu.max": "200000 100000",
                                    "job/task/cpu.max": "max 100000"}, own="0::/job/task") == 2.0
    v1 = {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}
    assert _cgroup(tmp_path / "d", v1, own="3:cpu,cpuacct:/") == 3.0
    assert _cgroup(tmp_path / "e", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, own="3:cpu:/") is None
    assert _cgroup(tmp_path / "f", {}) is None  # nothing there


def test_set_threads_sets_torch_and_says_so(capsys):
    choice = threads.set_threads(machine=M(3, 3, 3, None, 0.2), env={})
    assert torch.get_num_threads() == 3 and capsys.readouterr().err == choice.line + "\n"
    threads.set_threads(1, machine=M(3, 3, 3, None, 0.2), env={}, say=False)
    assert torch.get_num_threads() == 1 and capsys.readouterr().err == ""
    assert threads.usable_cores(M(8, 6, 8, 2.0, None)) == 2
    real = threads.read_machine()
    assert real.physical >= 1 and real.allowed >= 1 and real.cpus >= real.allowed


def test_quality_takes_threads(monkeypatch, tmp_path, capsys):
    from tomesd import quality
    from tomesd.quality import generate

    seen = []
    monkeypatch.setattr(generate, "run", lambda cfg, pipe=None, progress=True: seen.append(torch.get_num_threads()) or
                        (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        quality.main(["--prompt", "3", "--ratios", "0.5", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert seen == [1] and "torch threads: 1 as asked (--threads; " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.main(["--threads", "0"])
    assert "--threads" in capsys.readouterr().err


@pytest.mark.slow  # a classifier epoch, a training step and an evaluation: a minute on a loaded 2-core machine
def test_reference_training_says_its_threads_in_its_log(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from tomesd.reference import train

    monkeypatch.setattr(threads, "read_machine", lambda: M(2, 2, 2, None, 0.3))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    log = tmp_path / "train.log"
    assert train.main(["--steps", "1", "--batch", "2", "--classifier-epochs", "1", "--eval-samples", "1",
                       "--out", str(tmp_path / "pipe"), "--classifier-out", str(tmp_path / "c.safetensors"),
                       "--log", str(log)]) == 0
    assert "torch threads: 2 (2 cores, load 0.3 → 2 free; --threads N to override)" in log.read_text()
    assert torch.get_num_threads() == 2

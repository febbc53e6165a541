"""How many torch threads a tool uses on a CPU: the cores actually free to this process, said in one line.

On a machine that other jobs share, threads beyond the free cores only add contention (a 2-core
machine at load 3–4: 68–75 s per image with 2 threads, 8.2 s with 1). So:

- cores = the physical cores (tomesd.tools.timing.physical_cores), at most the CPUs of this
  process's affinity mask (`os.sched_getaffinity`) and the cgroup CPU quota (v2 `cpu.max`, v1
  `cpu.cfs_quota_us / cpu.cfs_period_us`), rounded up, at least 1;
- load = the 1-minute load average; it counts the whole machine (a container sees its host's), so
  where this process may use only part of the machine's CPUs it is scaled by that part;
- free = cores − load, rounded, at least 1 (and at most cores); split between the processes of one
  launch (`processes`, e.g. accelerate's).

An explicit request wins: `--threads N` (a tool's argument), else OMP_NUM_THREADS when set (torchrun
and accelerate set it per process), else the free cores.

`Machine` holds what is read (`read_machine()` reads it), `choose(machine, ...)` is pure (tests give it
made-up machines), `set_threads(...)` sets torch's threads and says the choice on stderr, e.g.
"torch threads: 1 (2 cores, load 1.6 → 1 free; --threads N to override)".
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from . import timing

CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class Machine:
    """physical: physical cores; allowed: CPUs in the affinity mask; cpus: the machine's CPUs
    (os.cpu_count()); quota: CPUs the cgroup quota grants (None: no quota); load: the 1-minute load
    average (None: unknown)."""

    physical: int
    allowed: int
    cpus: int
    quota: Optional[float] = None
    load: Optional[float] = None


@dataclass(frozen=True)
class Choice:
    """threads: what torch gets; cores, free: as counted above; line: the choice in words."""

    threads: int
    cores: int
    free: int
    line: str


def cgroup_quota(root: str = CGROUP_ROOT, self_cgroup: str = "/proc/self/cgroup") -> Optional[float]:
    """CPUs this process's cgroup may use (quota / period; the smallest along its path, up to the root),
    None when unlimited or unknown. The path comes from `self_cgroup`; under `root`, v2 cpu.max ("max
    100000" or "150000 100000") or v1 cpu/cpu.cfs_quota_us and cpu.cfs_period_us (quota -1: none)."""
    own = {"v2": "", "v1": ""}
    try:
        with open(self_cgroup) as f:
            for line in f:
                _, controllers, path = line.strip().split(":", 2)
                if controllers == "":
                    own["v2"] = path.strip("/")
                elif "cpu" in controllers.split(","):
                    own["v1"] = path.strip("/")
    except (OSError, ValueError):
        pass
    found = []
    for version, path in own.items():
        parts = path.split("/") if path else []
        for depth in range(len(parts), -1, -1):
            here = "/".join(parts[:depth])
            if version == "v2":
                found.append(_read_quota(os.path.join(root, here, "cpu.max")))
            else:
                for mount in ("cpu", "cpu,cpuacct"):
                    v1 = os.path.join(root, mount, here)
                    found.append(_read_quota(os.path.join(v1, "cpu.cfs_quota_us"), os.path.join(v1, "cpu.cfs_period_us")))
    quotas = [q for q in found if q]
    return min(quotas) if quotas else None


def _read_quota(path: str, period_path: Optional[str] = None) -> Optional[float]:
    """quota / period from a v2 cpu.max (period_path None) or a v1 pair of files; None for no quota or
    when the files are not there or hold no numbers."""
    try:
        with open(path) as f:
            fields = f.read().split()
        if period_path is not None:
            with open(period_path) as f:
                fields += f.read().split()
        if fields[0] in ("max", "-1"):
            return None
        return float(fields[0]) / float(fields[1])
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        return None


def read_machine() -> Machine:
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Machine(physical=timing.physical_cores(), allowed=allowed, cpus=os.cpu_count() or allowed,
                   quota=cgroup_quota(), load=timing.load_average())


def usable_cores(machine: Optional[Machine] = None) -> int:
    """The cores this process may use on `machine` (read_machine() unless given): physical cores within
    the affinity mask and the cgroup quota (rounded up), at least 1."""
    m = machine or read_machine()
    return max(1, min(m.physical, m.allowed, math.ceil(m.quota) if m.quota else m.physical))


def requested_threads(threads: Optional[int], env: Mapping[str, str], name: str = "--threads") -> Tuple[Optional[int], str]:
    """(threads asked for, by what): `threads` (`name`), else OMP_NUM_THREADS when it is a positive
    integer ("OMP_NUM_THREADS"), else (None, "")."""
    if threads is not None:
        return threads, name
    text = env.get("OMP_NUM_THREADS", "").strip()
    if text.isdigit() and int(text) > 0:
        return int(text), "OMP_NUM_THREADS"
    return None, ""


def choose(machine: Machine, threads: Optional[int] = None, env: Optional[Mapping[str, str]] = None,
           processes: int = 1, name: str = "--threads") -> Choice:
    """The threads for `machine` (see the module's docstring); `threads` (positive) and OMP_NUM_THREADS in
    `env` (default: none) are requests; `processes` share the free cores; `name` is how the caller's
    user asks for threads (the tools' --threads), said in the line."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads}")
    if processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes}")
    cores = usable_cores(machine)
    limits = [f"affinity {machine.allowed} CPUs"] if machine.allowed < machine.physical else []
    if machine.quota and math.ceil(machine.quota) < min(machine.physical, machine.allowed):
        limits.append(f"cgroup quota {machine.quota:g} CPUs")
    where = f"{cores} core{'s' if cores != 1 else ''}" + (f" ({', '.join(limits)})" if limits else "")
    if machine.load is None:
        free, load_text = cores, "load unknown"
    else:
        share = min(1.0, min(machine.allowed, machine.quota or machine.allowed) / max(machine.cpus, 1))
        load = machine.load * share
        free = min(cores, max(1, math.floor(cores - load + 0.5)))
        load_text = f"load {machine.load:.1f}" + (f" on {machine.cpus} CPUs, {load:.1f} on ours" if share < 1 else "")
    mine = max(1, free // processes)
    split = f", {mine} for each of {processes} processes" if processes > 1 else ""
    asked, by = requested_threads(threads, env or {}, name)
    if asked is not None:
        line = f"torch threads: {asked} as asked ({by}; {where}, {load_text} → {free} free{split})"
        return Choice(asked, cores, free, line)
    line = f"torch threads: {mine} ({where}, {load_text} → {free} free{split}; {name} N to override)"
    return Choice(mine, cores, free, line)


def set_threads(threads: Optional[int] = None, machine: Optional[Machine] = None, env: Optional[Mapping[str, str]] = None,
                processes: int = 1, name: str = "--threads", say: bool = True) -> Choice:
    """torch.set_num_threads(choose(...).threads) for this machine (read_machine() unless given) and
    environment (os.environ unless given); the line is printed on stderr when `say`."""
    import torch

    choice = choose(machine or read_machine(), threads, os.environ if env is None else env, processes, name)
    torch.set_num_threads(choice.threads)
    if say:
        print(choice.line, file=sys.stderr, flush=True)
    return choice

"""Several processes from `accelerate launch --num_processes N` where accelerate starts one.

accelerate's launcher starts N processes (through torchrun) only for its multi-GPU kinds: on a
machine with fewer than two GPUs, `accelerate launch --num_processes 2 script.py` (with or without
`--cpu`) runs its "simple launcher", one process, and N CPU processes need MPI (`--mpirun_hostfile`).
That process can tell: accelerate set MASTER_PORT (it does so only for N > 1) but no torchrun
variables (RANK, WORLD_SIZE) and no MPI ones. `asked_processes` then reads N from the launcher's
own command line (its parent's, parsed by accelerate's parser; or accelerate's config file), and
`relaunch` runs the script again under `python -m torch.distributed.run --standalone --nproc_per_node
N`: N processes that accelerate's PartialState joins (gloo on a CPU), each making its share.
Processes on GPUs need one GPU each: fewer GPUs than processes is an error line, not a silent single
process (`accelerate launch --cpu` for CPU processes).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Mapping, Optional, Sequence

# set for the workers by torchrun / accelerate's multi-GPU launcher, or by MPI
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
MPI_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
LAUNCH_NAMES = ("launch", "accelerate.commands.launch")  # what precedes accelerate launch's options


def simple_launcher_asked(env: Mapping[str, str]) -> bool:
    """Whether this process was started alone by accelerate's simple launcher for several processes."""
    return ("ACCELERATE_MIXED_PRECISION" in env and "MASTER_PORT" in env
            and not any(name in env for name in RANK_VARIABLES + MPI_VARIABLES))


def parent_argv(pid: Optional[int] = None) -> List[str]:
    """The command line of process `pid` (default: this process's parent), [] where it cannot be read."""
    try:
        with open(f"/proc/{os.getppid() if pid is None else pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def asked_processes(launcher_argv: Sequence[str]) -> Optional[int]:
    """N of `accelerate launch ... --num_processes N ...` from the launcher's command line (else from the
    config file it read), None when it cannot be told."""
    names = [i for i, part in enumerate(launcher_argv) if part in LAUNCH_NAMES]
    if not names:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        args = launch_command_parser().parse_args(list(launcher_argv[names[0] + 1:]))
    except SystemExit:
        return None
    if args.num_processes is not None:
        return args.num_processes
    from accelerate.commands.config import default_config_file, load_config_from_file

    path = args.config_file or default_config_file
    return getattr(load_config_from_file(path), "num_processes", None) if os.path.isfile(path) else None


def relaunch_problem(processes: Optional[int], on_cpu: bool, gpus: int) -> str:
    """Why the script cannot be run again as `processes` processes, in one line ("" if it can)."""
    if processes is None:
        return ("accelerate launch asked for several processes but started one, and how many cannot be read here; "
                "run `accelerate launch --multi_gpu --num_processes N ...` or `torchrun --nproc_per_node N ...`")
    if not on_cpu and gpus < processes:
        return (f"accelerate launch --num_processes {processes} on {gpus} GPU(s): one process per GPU; "
                "add --cpu to run the processes on the CPU")
    return ""


def relaunch_command(processes: int, script: str, argv: Sequence[str]) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            script, *argv]


def relaunch(processes: int, script: str, argv: Sequence[str]) -> int:
    """Run `script argv` as `processes` torchrun workers (this process waits); their exit code."""
    return subprocess.run(relaunch_command(processes, script, argv)).returncode

"""Isolated bench points run in children of a multiprocessing forkserver (tomesd.tools.timing); the
server must not outlive its work: left alone it notices its parent's exit only then, tears torch
down for seconds, and holds the parent's stdout and stderr open meanwhile (`pytest | tee`, a CI log
or subprocess.run waited for it after the summary: issue 33)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _at_end(fd: int) -> bool:
    """Whether a pipe's read end is at its end now (every writer gone), reading what is left."""
    os.set_blocking(fd, False)
    while True:
        try:
            if not os.read(fd, 1 << 16):
                return True
        except BlockingIOError:  # nothing to read, and some process still holds the write end
            return False


@pytest.mark.slow  # the server imports torch and diffusers: tens of seconds on a loaded 2-core machine
def test_a_process_that_ran_children_leaves_no_server_holding_its_output():
    """At exit (atexit), the server is stopped; tests/test_bench.py checks that an isolated run stops it."""
    code = ("import os\nfrom tomesd.tools import timing\n"
            "if __name__ == '__main__':\n"
            "    print(timing.run_in_child(os.getpid)[0], timing.forkserver_pid() is not None, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    first = proc.stdout.readline()
    assert proc.wait(timeout=300) == 0 and first.split() == [b"ok", b"True"]  # the child ran, the server was up
    assert _at_end(proc.stdout.fileno()) and _at_end(proc.stderr.fileno())  # at its exit, no one holds them
    proc.stdout.close()
    proc.stderr.close()

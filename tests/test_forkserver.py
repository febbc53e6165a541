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


CHILDREN = "/proc/self/task/{}/children".format


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHILDREN(os.getpid())), reason="needs Linux's /proc children list")
def test_at_exit_no_helper_process_is_left():
    """Deterministic form of the test above: an exit handler registered before any child ran runs after
    tomesd's own, and lists this process's children still alive then. The forkserver and the resource
    tracker it started (both inherit stdout and stderr) must be gone; left alive, they read their
    end-of-file only after the parent exits, and a reader of its output races them (CI lost once)."""
    code = ("import atexit, os, threading\nfrom tomesd.tools import timing\n"
            "def left():\n"
            "    tid = threading.get_native_id()\n"
            "    print('left', open('/proc/self/task/%d/children' % tid).read().split(), flush=True)\n"
            "if __name__ == '__main__':\n"
            "    atexit.register(left)\n"
            "    print(timing.run_in_child(os.getpid)[0], flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = done.stdout.decode().splitlines()
    assert lines[0] == "ok" and lines[-1] == "left []", lines

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

# A private inductor cache per test session: a cache shared with other processes on the machine (or
# left half-written by a killed one) fails compiles with "file too short"; CI starts from nothing anyway.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tomesd-tests-inductor-"))


import pytest  # noqa: E402


@pytest.fixture
def recorded_plans(monkeypatch):
    """Every ops.build_plan call while the test runs: a list of (metric, dst, src, r, window, plan)."""
    from tomesd import ops

    seen = []
    build = ops.build_plan

    def recording(metric, dst, src, r, window=None):
        plan = build(metric, dst, src, r, window)
        seen.append((metric, dst, src, r, window, plan))
        return plan

    monkeypatch.setattr(ops, "build_plan", recording)
    return seen

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

# A private inductor cache per test session: a cache shared with other processes on the machine (or
# left half-written by a killed one) fails compiles with "file too short"; CI starts from nothing anyway.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="tomesd-tests-inductor-"))

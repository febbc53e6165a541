"""How the CUDA extension is compiled: one definition for setup.py (the prebuilt tomesd._C, built with
TOMESD_BUILD_CUDA=1) and for the JIT build on the first CUDA call (tomesd/ops/loader.py).

Plain data without imports: setup.py reads this file with runpy, without importing tomesd (which
needs torch).
"""

CXX_FLAGS = ["-O3"]  # host compiler, for csrc/*.cpp
NVCC_FLAGS = ["-O3", "-lineinfo"]  # nvcc, for csrc/*.cu (torch adds its arch and half-precision flags)
SOURCE_SUFFIXES = (".cu", ".cpp")  # compiled
PACKAGE_SUFFIXES = SOURCE_SUFFIXES + (".cuh", ".h")  # shipped inside the package as tomesd/csrc

"""tomesd: Token Merging for Stable Diffusion.

Build switches (environment variables read here):
  TOMESD_BUILD_CUDA=1   also compile the CUDA kernels in csrc/ into tomesd._C at install time
                        (needs nvcc and a CUDA build of torch). Without it, the kernels are built
                        with ninja on the first CUDA call (tomesd/ops/loader.py), or the PyTorch path runs.
  TORCH_CUDA_ARCH_LIST  with TOMESD_BUILD_CUDA=1: the GPU architectures to compile for (torch's own
                        switch), e.g. "8.0;8.6;9.0"; default: the GPUs visible at build time.

Every build (wheel, sdist, regular install) ships csrc/ inside the package as tomesd/csrc, so an
installed tomesd can JIT-build its kernels; `pip install -e .` uses the checkout's csrc/ directly.
"""
import os
import runpy
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
# Compiler flags and source suffixes, shared with the JIT build (read without importing tomesd).
FLAGS = runpy.run_path(os.path.join(HERE, "tomesd", "ops", "build_flags.py"))


class build_py_with_csrc(build_py):
    """Copies csrc/ into the built package as tomesd/csrc (no symlinks)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "tomesd", "csrc")
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(CSRC)):
            if name.endswith(FLAGS["PACKAGE_SUFFIXES"]):
                shutil.copy2(os.path.join(CSRC, name), os.path.join(target, name))


ext_modules, cmdclass = [], {"build_py": build_py_with_csrc}
if os.environ.get("TOMESD_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(os.path.join("csrc", f) for f in os.listdir(CSRC) if f.endswith(FLAGS["SOURCE_SUFFIXES"]))
    ext_modules = [CUDAExtension("tomesd._C", sources,
                                 extra_compile_args={"cxx": FLAGS["CXX_FLAGS"], "nvcc": FLAGS["NVCC_FLAGS"]})]
    cmdclass["build_ext"] = BuildExtension

setup(
    packages=find_packages(include=["tomesd", "tomesd.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""tomesd: Token Merging for Stable Diffusion.

Build switches (environment variables read here):
  TOMESD_BUILD_CUDA=1   also compile the CUDA kernels in csrc/ into tomesd._C at install time
                        (needs nvcc and a CUDA build of torch). Without it, the kernels are built
                        with ninja on the first CUDA call (tomesd/_build.py), or the PyTorch path runs.
"""
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("TOMESD_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith((".cpp", ".cu")))
    ext_modules = [CUDAExtension("tomesd._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})]
    cmdclass = {"build_ext": BuildExtension}

setup(
    packages=find_packages(include=["tomesd", "tomesd.*"]),
    package_data={"tomesd": ["csrc/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

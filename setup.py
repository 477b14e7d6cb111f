"""Build npid_kernels._C: the CPU kernels always, the CUDA kernels when a toolkit is found.

Environment knobs (the pytorch_scatter conventions):
  FORCE_CUDA=1       build the CUDA sources even if no toolkit is auto-detected (CUDA_HOME must be right)
  FORCE_ONLY_CPU=1   build the CPU kernels only, even with a toolkit
  CUDA_HOME          the toolkit folder (its bin/nvcc, include/, lib64/)
  TORCH_CUDA_ARCH_LIST  GPU archs; defaults to "8.0;9.0" when no GPU is visible
"""
import glob
import os
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from find_cuda_home import find_cuda_home  # noqa: E402


cuda_home = None if os.environ.get("FORCE_ONLY_CPU", "0") == "1" else find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = bool(cuda_home) or os.environ.get("FORCE_CUDA", "0") == "1"
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    # No GPU to ask: build Ampere and Hopper (A100, H100/H200).
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
# No -std flag: torch picks the standard its headers need (C++20 from torch 2.12 on).
# -fopenmp: at::parallel_for's OpenMP backend is inline in the headers, so we must compile it.
cxx_flags = ["-O3", "-fopenmp"]
define_macros = []
if WITH_CUDA:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    define_macros.append(("WITH_CUDA", None))
    # pip's CUDA wheels ship headers torch includes (cusparse.h, ...) that a bare toolkit may lack.
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        for sub in ("cu13", "cu12"):
            candidate = os.path.join(sp, "nvidia", sub, "include")
            if os.path.isdir(candidate):
                include_dirs.append(candidate)
    extension_cls = CUDAExtension
    extra_compile_args = {
        "cxx": cxx_flags,
        "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
    }
else:
    extension_cls = CppExtension
    extra_compile_args = {"cxx": cxx_flags}

print(
    f"npid_kernels: building the {'CPU + CUDA' if WITH_CUDA else 'CPU-only'} extension"
    + (f" (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})" if WITH_CUDA else ""),
    file=sys.stderr,
)

setup(
    packages=find_packages(include=["npid_kernels", "npid_kernels.*"]),
    ext_modules=[
        extension_cls(
            "npid_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

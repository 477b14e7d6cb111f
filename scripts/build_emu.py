"""Build the emulated-CUDA operator library `npid_emu` (tests only; never installed).

The CUDA launchers and kernels of csrc/cuda/ are compiled by the host compiler against the
emulator in csrc/emu/ (-DNPID_EMULATE_CUDA) into one shared library that registers
torch.ops.npid_emu.* for CPU tensors. Variants:

  plain  -O2, loaded by the test suite itself
  asan   AddressSanitizer + UndefinedBehaviorSanitizer (run with LD_PRELOAD of libasan)
  tsan   ThreadSanitizer (run with LD_PRELOAD of libtsan)

Usage: python scripts/build_emu.py [plain|asan|tsan|debug ...] [--target ops|defects]
(prints each library's path).
Rebuilds only when a source under csrc/, the flags, the compiler or torch changed. The sanitizer
builds are compiled here, outside any sanitized process, so that no compiler runs preloaded.
"""
from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# Targets: the operator library, and the deliberately broken kernels that show each detector
# fires (tests/emu_defects.cpp, with the same runtime). Paths relative to csrc/.
TARGETS = {
    "ops": [
        "emu/cuda_emu.cpp",
        "emu/emu_library.cpp",
        "emu/emu_nce.cpp",
        "emu/emu_bank.cpp",
        "bank_scan.cpp",  # full_softmax_loss / knn_topk's streaming, CPU GEMMs in place of cuBLAS
        "shared_negatives.cpp",  # the shared-negative losses' GEMM tiles, likewise
    ],
    "defects": ["emu/cuda_emu.cpp", "../tests/emu_defects.cpp"],
}

VARIANT_FLAGS = {
    "plain": ["-O2"],
    "debug": ["-O0"],  # quick to compile: the seeded-defect builds
    "asan": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=undefined"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
}

SANITIZER_RUNTIME = {"asan": "libasan.so", "tsan": "libtsan.so"}


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def shared_library(name: str) -> str:
    """The compiler's copy of a shared library (for LD_PRELOAD)."""
    path = subprocess.run([compiler(), f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(f"{compiler()} has no {name} (install the compiler's runtime package for it)")
    return os.path.realpath(path)


def sanitizer_runtime(variant: str) -> str | None:
    """Path of the sanitizer's shared runtime (for LD_PRELOAD), or None for the plain build."""
    name = SANITIZER_RUNTIME.get(variant)
    if name is None:
        return None
    return shared_library(name)


def _torch_flags(csrc: str):
    import torch
    from torch.utils import cpp_extension

    includes = [os.path.join(csrc, "include"), csrc] + cpp_extension.include_paths()
    cflags = ["-std=c++20", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-DNPID_EMULATE_CUDA",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas", "-Wno-sign-compare"]
    cflags += [f"-I{p}" for p in includes]
    lib_dirs = cpp_extension.library_paths()
    ldflags = [f"-L{d}" for d in lib_dirs] + [f"-Wl,-rpath,{d}" for d in lib_dirs]
    ldflags += ["-lc10", "-ltorch_cpu", "-ltorch", "-fopenmp"]
    return cflags, ldflags, torch.__version__


def _stamp(csrc: str, sources, flags) -> str:
    h = hashlib.sha256()
    paths = glob.glob(os.path.join(csrc, "**", "*"), recursive=True)
    paths += [os.path.join(csrc, s) for s in sources]
    for path in sorted(set(paths)):
        if os.path.isfile(path):
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    h.update(" ".join(flags).encode())
    h.update(subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()


def build(variant: str = "plain", target: str = "ops", csrc: str = CSRC, out_dir: str | None = None,
          jobs: int | None = None, quiet: bool = False, compile_only=None, objects_from: str | None = None) -> str:
    """Compile (if needed) and return the path of the target's shared library in that variant.
    csrc / out_dir: another source tree (a mutated copy, for the seeded-defect tests) and where
    its build goes; by default this checkout's csrc/ and build/emu-<variant>/. compile_only: the
    sources to compile, the others' objects taken from objects_from (a mutant recompiles only the
    translation unit its change reaches)."""
    if variant not in VARIANT_FLAGS:
        raise ValueError(f"variant must be one of {sorted(VARIANT_FLAGS)}, got {variant!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    if shutil.which(compiler()) is None:
        raise RuntimeError(f"no C++ compiler '{compiler()}' on PATH")
    sources = TARGETS[target]
    cflags, ldflags, torch_version = _torch_flags(csrc)
    vflags = VARIANT_FLAGS[variant]
    out_dir = out_dir or os.path.join(ROOT, "build", f"emu-{variant}")
    name = "npid_emu" if target == "ops" else "npid_emu_defects"
    lib = os.path.join(out_dir, f"{name}_{variant}.so")
    to_compile = list(sources) if compile_only is None else [s for s in sources if s in compile_only]
    reused = [os.path.join(objects_from, os.path.basename(s) + ".o") for s in sources if s not in to_compile]
    missing = [o for o in reused if not os.path.exists(o)]
    if missing:
        raise RuntimeError(f"objects to reuse are missing: {missing}")
    stamp = _stamp(csrc, sources, cflags + ldflags + vflags + [torch_version] + reused)
    stamp_file = os.path.join(out_dir, f"{name}.stamp")
    if os.path.exists(lib) and os.path.exists(stamp_file) and open(stamp_file).read() == stamp:
        return lib
    os.makedirs(out_dir, exist_ok=True)
    if not quiet:
        print(f"npid_emu: building {name} ({variant}) with {compiler()}",
              file=sys.stderr, flush=True)

    def compile_one(src):
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        cmd = [compiler(), *cflags, *vflags, "-c", os.path.normpath(os.path.join(csrc, src)), "-o", obj]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {src} failed:\n{' '.join(cmd)}\n{res.stderr[-8000:]}")
        return obj

    jobs = jobs or max(1, min(len(to_compile), os.cpu_count() or 1))
    # The largest translation units first, so that the pool finishes together.
    order = sorted(to_compile, key=lambda s: -os.path.getsize(os.path.join(csrc, s)))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        objs = list(pool.map(compile_one, order)) + reused
    tmp = lib + ".tmp"
    cmd = [compiler(), "-shared", *vflags, *objs, "-o", tmp, *ldflags]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"linking {lib} failed:\n{' '.join(cmd)}\n{res.stderr[-8000:]}")
    os.replace(tmp, lib)
    with open(stamp_file, "w") as f:
        f.write(stamp)
    return lib


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Checked here, not with choices=: argparse checks an empty or default list against choices as
    # one value and refuses it, so the bare command would fail.
    parser.add_argument("variants", nargs="*", help=f"{', '.join(sorted(VARIANT_FLAGS))} (default: plain)")
    parser.add_argument("--target", default="ops", choices=sorted(TARGETS))
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANT_FLAGS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(sorted(VARIANT_FLAGS))}")
    for v in args.variants or ["plain"]:
        print(build(v, args.target))

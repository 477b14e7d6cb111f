"""The emulated-CUDA device of the test matrix.

The CUDA launchers and kernels (csrc/cuda/) built with the host compiler against the CPU
emulator (csrc/emu/) register `torch.ops.npid_emu.*` for CPU tensors (scripts/build_emu.py).
The `device` fixture's "emu" parameter routes npid_kernels.ops (and everything built on it:
the nn modules, the kNN functions) to that library while the test runs, with tensors on the
CPU; so every device-parametrised test also runs the CUDA code.

NPID_EMU_LIBRARY=path loads a prebuilt variant instead (the sanitizer runs preload their
runtime and point here); NPID_TEST_DEVICES=emu restricts the matrix to the emulated device.
"""
from __future__ import annotations

import os

import torch

from npid_kernels import ops
from script_modules import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_loaded: str | None = None


def build_script():
    return load_script("scripts/build_emu.py")


def load() -> str:
    """Build (if needed) and load the emulated library once per process; returns its path."""
    global _loaded
    if _loaded is None:
        path = os.environ.get("NPID_EMU_LIBRARY") or build_script().build("plain")
        torch.ops.load_library(path)
        ops._register_python_side("npid_emu")
        _loaded = path
    return _loaded

"""The emulator's detectors, each shown to fire on a deliberately broken kernel
(tests/emu_defects.cpp), and the sanitizer runs of the emulated CUDA code:

* the emulator itself: divergent collectives, a collective after a lane returned, barriers in
  divergent code, launch limits, and shared memory poisoned so that a read before a write (or
  across a missing __syncthreads) gives NaN;
* AddressSanitizer + UBSan and ThreadSanitizer builds (scripts/build_emu.py asan / tsan): a read
  past a row and a missing __syncthreads are reported, the correct kernel is not, and the
  emulated op tests run clean under both;
* seeded defects in the real kernels (a deleted __syncthreads, a wrong shuffle width) make the
  emulated op tests fail: the tests can fail.
"""
import concurrent.futures
import os
import shutil
import subprocess
import sys

import pytest
import torch

import emulation

ROOT = emulation.ROOT
build_emu = emulation.build_script()


@pytest.fixture(scope="module")
def defects():
    torch.ops.load_library(build_emu.build("plain", target="defects"))
    return torch.ops.npid_emu_defects


def x64():
    return torch.arange(64, dtype=torch.float32)


def test_correct_kernel_runs_clean(defects):
    assert torch.equal(defects.run("with_syncthreads", x64()), torch.roll(x64(), -1))


@pytest.mark.parametrize("name,message", [
    ("divergent_shuffle", "divergent collective"),
    ("shuffle_after_return", "has returned from the kernel"),
    ("divergent_barrier", "a barrier in divergent code"),
    ("block_over_launch_bounds", "exceeds the kernel's __launch_bounds__ 64"),
    ("empty_grid", "empty grid"),
    ("too_much_dynamic_shared", "48 KiB"),
])
def test_emulator_stops_on_defect(defects, name, message):
    with pytest.raises(RuntimeError, match=message) as err:
        defects.run(name, x64())
    assert "emulated CUDA" in str(err.value)


@pytest.mark.parametrize("name", ["missing_syncthreads", "uninitialised_shared"])
def test_poisoned_shared_memory_shows_unordered_reads(defects, name):
    out = defects.run(name, x64())
    assert bool(out.isnan().any()), "a read of shared memory nobody wrote (yet) must give NaN"


# ------------------------------------------------------------------ sanitizers

def sanitized_env(variant):
    preload = [build_emu.sanitizer_runtime(variant)]
    if variant == "asan":
        # libstdc++ must be loaded when ASan starts, or its __cxa_throw interceptor has nothing to
        # call and the first C++ exception (any TORCH_CHECK) aborts the process.
        preload.append(build_emu.shared_library("libstdc++.so.6"))
    env = dict(os.environ, LD_PRELOAD=" ".join(preload), PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    # Leaks: CPython's own allocations at exit are not ours to judge.
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["TSAN_OPTIONS"] = "halt_on_error=1:report_signal_unsafe=0"
    if variant == "tsan":
        # torch's intra-op threads come from libgomp, which TSan cannot see synchronise: one
        # thread, so that only our code (the emulator's workers and fibers) runs concurrently.
        env["OMP_NUM_THREADS"] = "1"
    return env


def sanitizers_available(variant):
    try:
        build_emu.sanitizer_runtime(variant)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        return str(e)
    return None


DEFECT_SCRIPT = """
import sys, torch
torch.ops.load_library(sys.argv[1])
x = torch.arange(64, dtype=torch.float32) if sys.argv[2] != "read_past_row" else torch.rand(3, 5)
out = torch.ops.npid_emu_defects.run(sys.argv[2], x)
print("finished", out.sum().item())
"""

REPORT = {"asan": "ERROR: AddressSanitizer", "tsan": "WARNING: ThreadSanitizer"}


@pytest.mark.slow  # a sanitizer build of the defects library
@pytest.mark.parametrize("variant,defect,expected", [
    ("asan", "read_past_row", "heap-buffer-overflow"),
    ("tsan", "missing_syncthreads", "data race"),
])
def test_sanitizer_reports_planted_defect(variant, defect, expected):
    reason = sanitizers_available(variant)
    if reason:
        pytest.fail(f"{variant} runtime missing: {reason}")
    lib = build_emu.build(variant, target="defects")
    env = sanitized_env(variant)
    bad = subprocess.run([sys.executable, "-c", DEFECT_SCRIPT, lib, defect], env=env, capture_output=True,
                         text=True, timeout=600)
    assert REPORT[variant] in bad.stderr and expected in bad.stderr, bad.stderr[-4000:]
    good = subprocess.run([sys.executable, "-c", DEFECT_SCRIPT, lib, "with_syncthreads"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert good.returncode == 0 and "finished" in good.stdout, good.stderr[-4000:]
    assert REPORT[variant] not in good.stderr, good.stderr[-4000:]


# The emulated op tests under each sanitizer: every CUDA code path of test_emulated_cuda.py
# (its reduced shape set: NPID_SANITIZED_RUN) and the sampler's cases of the device matrix.
SANITIZED_SELECTION = ["tests/test_emulated_cuda.py",
                       "tests/test_ops.py::test_sample_negatives_matches_reference"]


@pytest.mark.slow  # a sanitizer build of the emulated library, then its tests under it
@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_emulated_ops_clean_under_sanitizer(variant):
    reason = sanitizers_available(variant)
    if reason:
        pytest.fail(f"{variant} runtime missing: {reason}")
    lib = build_emu.build(variant)
    env = sanitized_env(variant)
    env.update(NPID_EMU_LIBRARY=lib, NPID_TEST_DEVICES="emu", NPID_SANITIZED_RUN=variant)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SANITIZED_SELECTION],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = run.stdout[-3000:] + run.stderr[-6000:]
    assert run.returncode == 0, out
    assert REPORT[variant] not in run.stderr and "runtime error:" not in run.stderr, out
    assert " passed" in run.stdout, out


# ------------------------------------------------------------------ seeded defects in the real kernels

MUTANTS = {
    # The block's partial states are read right after being written by the other warps.
    "deleted_syncthreads": ("cuda/nce_kernels.cuh", "    __syncthreads();\n    const PartialList<acc_t> parts",
                            "    const PartialList<acc_t> parts"),
    # Dot products reduced over half of each row's lane group.
    "wrong_shuffle_width": ("cuda/nce_kernels.cuh", "sc = group_sum(dot, G) * inv_t;", "sc = group_sum(dot, G / 2) * inv_t;"),
    # The control: built the same way, unchanged, it must pass (so a mutant fails by its defect).
    "unchanged": ("cuda/nce_kernels.cuh", "sc = group_sum(dot, G) * inv_t;", "sc = group_sum(dot, G) * inv_t;"),
}


@pytest.fixture(scope="module")
def mutant_libraries(tmp_path_factory):
    """Each mutant's library: its mutated copy of csrc/, only emu_nce.cpp (the translation unit
    the kernels' header reaches) recompiled, the other objects the plain build's; the mutants
    compile side by side."""
    plain_dir = os.path.dirname(build_emu.build("plain"))

    def build_mutant(mutant):
        path, old, new = MUTANTS[mutant]
        root = tmp_path_factory.mktemp(mutant)
        csrc = root / "csrc"
        shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
        source = (csrc / path).read_text()
        assert source.count(old) == 1, f"the mutation site of {mutant} moved: update MUTANTS"
        (csrc / path).write_text(source.replace(old, new))
        return build_emu.build("debug", csrc=str(csrc), out_dir=str(root / "build"), quiet=True, jobs=1,
                               compile_only=["emu/emu_nce.cpp"], objects_from=plain_dir)

    with concurrent.futures.ThreadPoolExecutor(len(MUTANTS)) as pool:
        return dict(zip(sorted(MUTANTS), pool.map(build_mutant, sorted(MUTANTS))))


@pytest.mark.slow  # a debug build of each mutant
@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_seeded_kernel_defect_fails_the_emulated_tests(mutant_libraries, mutant):
    env = dict(os.environ, NPID_EMU_LIBRARY=mutant_libraries[mutant], NPID_TEST_DEVICES="emu")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "tests/test_emulated_cuda.py::test_launch_plans_match_reference"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if mutant == "unchanged":
        assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    else:
        assert run.returncode == 1 and " failed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]

"""pytest configuration for the npid_kernels benchmarks (pytest-benchmark).

Not collected by the normal test run (pyproject's testpaths = ["tests"]); run it explicitly:

    python -m pytest benchmarks/ --benchmark-json=benchmarks/results/<name>.json
    python benchmarks/report.py benchmarks/results/<name>.json

Options (each also has an environment variable):
  --bench-size {quick,full}   NPID_BENCH_SIZE    shape set. Default: full, except with
                                                 --benchmark-disable, where it is quick (a smoke
                                                 check that runs every case once on tiny shapes).
  --bench-device {cpu,cuda}   NPID_BENCH_DEVICE  default: cuda when npid_kernels has CUDA kernels
                                                 and a GPU is visible, else cpu.
  --bench-no-compile          NPID_BENCH_NO_COMPILE=1   skip the torch_compile providers.
  --bench-threads N           NPID_BENCH_THREADS        torch.set_num_threads(N) for the run.
  --bench-target-s SECONDS    NPID_BENCH_TARGET_S       timed seconds per case (default 1.0).
Markers: `large` (every shape outside the quick set), so `-m "not large"` times only the
quick shapes. See benchmarks/README.md.
"""
from __future__ import annotations

import os

import pytest
import torch

from .bench_common import compile_problem, environment_info, settings_from_config


def pytest_addoption(parser):
    group = parser.getgroup("npid-bench", "npid_kernels benchmarks")
    group.addoption("--bench-size", choices=("quick", "full"), default=None,
                    help="shape set: quick (tiny, smoke check) or full (the device's benchmark shapes). "
                         "Default full; quick under --benchmark-disable. Env: NPID_BENCH_SIZE.")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device to benchmark (default: cuda if npid_kernels has CUDA kernels, else cpu). "
                         "Env: NPID_BENCH_DEVICE.")
    group.addoption("--bench-no-compile", action="store_true", default=False,
                    help="skip the torch_compile providers. Env: NPID_BENCH_NO_COMPILE=1.")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch.set_num_threads for the whole run (default: torch's default, one per core). "
                         "1 makes CPU timings robust on a machine shared with other jobs. Env: NPID_BENCH_THREADS.")
    group.addoption("--bench-target-s", type=float, default=None,
                    help="aim for this many timed seconds per case (rounds are clamped to [3, 100] on CPU, "
                         "[5, 200] on CUDA). Env: NPID_BENCH_TARGET_S. Default 1.0.")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: a benchmark shape outside the quick set (deselect with -m 'not large')")
    threads = config.getoption("bench_threads", default=None) or os.environ.get("NPID_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def pytest_report_header(config):
    try:
        s = settings_from_config(config)
    except pytest.UsageError:
        return None
    env = environment_info(s.device)
    problem = compile_problem(s.device) if s.compile_enabled else "disabled"
    return [
        f"npid bench: device={s.device} ({env['device_name']}), size={s.size}, torch {env['torch_version']}, "
        f"CUDA {env['cuda_version']}, threads {env['num_threads']}, commit {env['commit']}"
        f"{' (dirty)' if env['commit_dirty'] else ''}",
        f"npid bench: torch_compile {'available' if problem is None else 'skipped: ' + problem}, "
        f"target {s.target_s:g} s per case",
    ]


@pytest.fixture(scope="session")
def settings(request):
    return settings_from_config(request.config)


@pytest.fixture(autouse=True)
def _fresh_grad_mode():
    """Each case starts with grad mode on and no leftover cached CUDA blocks from the last."""
    with torch.enable_grad():
        yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

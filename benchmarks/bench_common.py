"""Shared helpers for the npid_kernels benchmarks (imported by conftest.py and the test_bench_*
modules; not a test module itself).

What lives here: the run settings (device, shape set, rounds), the shape tables, the
environment record that goes into every benchmark's ``extra_info``, the peak-memory
measurement, the correctness check helpers and ``run_benchmark``, which times a provider's
closure with ``benchmark.pedantic`` after it has been checked against the reference.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

from npid_kernels import ops

REPO_ROOT = Path(__file__).resolve().parent.parent

TEMPERATURE = 0.07
MOMENTUM = 0.5

PASSES = ("forward", "forward_backward", "step")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    device: str            # "cuda" or "cpu"
    size: str              # "quick" or "full"
    compile_enabled: bool  # whether torch_compile providers run at all
    disabled: bool         # --benchmark-disable: every case runs once, no timing
    target_s: float        # timed seconds to aim for per case (rounds = target_s / one call)
    min_rounds: int
    max_rounds: int


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def default_device() -> str:
    """cuda when the extension has CUDA kernels and a GPU is visible, else cpu."""
    return "cuda" if ops.cuda_available() else "cpu"


def settings_from_config(config) -> Settings:
    cached = getattr(config, "_npid_bench_settings", None)
    if cached is not None:
        return cached
    disabled = bool(config.getoption("benchmark_disable", default=False))
    device = config.getoption("bench_device") or os.environ.get("NPID_BENCH_DEVICE") or default_device()
    if device == "cuda" and not ops.cuda_available():
        raise pytest.UsageError("--bench-device cuda: no GPU visible, or npid_kernels was built without CUDA kernels")
    size = config.getoption("bench_size") or os.environ.get("NPID_BENCH_SIZE") or ("quick" if disabled else "full")
    if size not in ("quick", "full"):
        raise pytest.UsageError(f"bench size must be 'quick' or 'full', got {size!r}")
    compile_enabled = not (config.getoption("bench_no_compile") or _env_flag("NPID_BENCH_NO_COMPILE"))
    target_s = config.getoption("bench_target_s")
    if target_s is None:
        target_s = float(os.environ.get("NPID_BENCH_TARGET_S", "1.0"))
    settings = Settings(
        device=device, size=size, compile_enabled=compile_enabled, disabled=disabled,
        target_s=target_s, min_rounds=3 if device == "cpu" else 5, max_rounds=100 if device == "cpu" else 200,
    )
    config._npid_bench_settings = settings
    return settings


# ---------------------------------------------------------------- shapes
# Each entry: (values..., marks). "large" marks every shape outside the quick set, so
# `-m "not large"` keeps only the quick shapes (with timing on).

def _case(values: tuple, large: bool, ident: str):
    return pytest.param(*values, marks=[pytest.mark.large] if large else [], id=ident)


def _fmt_n(n: int) -> str:
    return str(n)


def nce_shapes(settings: Settings) -> List:
    """(B, K, N, D, bank_dtype) for the sampled losses (NCE, softmax-CE)."""
    if settings.size == "quick":
        shapes = [(8, 256, 4096, 64, dt) for dt in ("float32", "bfloat16")]
        large = False
    elif settings.device == "cuda":
        # The GPU shapes: ImageNet bank, CIFAR bank, m = 16384; fp32 (faithful) and bf16.
        shapes = [(256, 4096, 1_281_167, 128, dt) for dt in ("float32", "bfloat16")]
        shapes += [(256, 4096, 50_000, 128, dt) for dt in ("float32", "bfloat16")]
        shapes += [(256, 16384, 1_281_167, 128, dt) for dt in ("float32", "bfloat16")]
        large = True
    else:
        # A small shape, and the CPU shape (B=64, K=4096, CIFAR-sized bank).
        shapes = [(16, 1024, 10_000, 128, dt) for dt in ("float32", "bfloat16")]
        shapes += [(64, 4096, 50_000, 128, dt) for dt in ("float32", "bfloat16")]
        large = True
    return [_case(s, large, f"B{s[0]}-K{s[1]}-N{_fmt_n(s[2])}-D{s[3]}-{s[4]}") for s in shapes]


def full_softmax_shapes(settings: Settings) -> List:
    """(B, N, D, bank_dtype) for the exact softmax over the whole bank."""
    if settings.size == "quick":
        shapes, large = [(8, 4096, 64, dt) for dt in ("float32", "bfloat16")], False
    elif settings.device == "cuda":
        shapes = [(256, n, 128, dt) for n in (1_281_167, 50_000) for dt in ("float32", "bfloat16")]
        large = True
    else:
        shapes = [(16, 10_000, 128, dt) for dt in ("float32", "bfloat16")]
        shapes += [(64, 50_000, 128, dt) for dt in ("float32", "bfloat16")]
        large = True
    return [_case(s, large, f"B{s[0]}-N{s[1]}-D{s[2]}-{s[3]}") for s in shapes]


def scan_precisions(settings: Settings) -> Tuple[str, ...]:
    """Product precisions of the bank scans (full softmax, kNN). TF32 exists on the GPU only
    (on the CPU torch's tf32 provider would be its fp32 one), so full CPU runs skip it."""
    if settings.device == "cpu" and settings.size == "full":
        return ("fp32", "bf16")
    return ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def torch_matmul_precision(precision: str):
    """What a PyTorch user sets for fp32 / tf32 matmuls (bf16 is a cast of the operands)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def torch_bank_products(x: torch.Tensor, bank: torch.Tensor, precision: str) -> torch.Tensor:
    """x @ bank.T the PyTorch way at `precision`: bf16 operands through torch's bf16 matmul (the
    products come out in bf16), else in x's dtype (TF32 is torch_matmul_precision's business)."""
    if precision == "bf16":
        return (x.bfloat16() @ bank.bfloat16().t()).to(x.dtype)
    return x @ bank.to(x.dtype).t()


# Issue #37's CPU comparison with faiss (IndexFlatIP): the CIFAR-10 evaluation (10,000 test
# features against the 50,000-row bank) and an ImageNet-sized bank with 1, 100 and 1,000
# queries; fp32 bank and products only (test_knn skips the other precisions there).
KNN_FAISS_SHAPES = ((10_000, 50_000), (1, 1_281_167), (100, 1_281_167), (1000, 1_281_167))


def knn_shapes(settings: Settings) -> List:
    """(Q, N, D, bank_dtype, topk) for the kNN top-k over the bank."""
    if settings.size == "quick":
        shapes, large = [(100, 4096, 64, dt, 20) for dt in ("float32", "bfloat16")], False
    elif settings.device == "cuda":
        shapes = [(10_000, 50_000, 128, dt, 200) for dt in ("float32", "bfloat16")]
        shapes += [(50_000, 1_281_167, 128, dt, 200) for dt in ("float32", "bfloat16")]
        large = True
    else:
        shapes = [(200, 10_000, 128, dt, 200) for dt in ("float32", "bfloat16")]
        shapes += [(1000, 50_000, 128, dt, 200) for dt in ("float32", "bfloat16")]
        shapes += [(Q, N, 128, "float32", 200) for Q, N in KNN_FAISS_SHAPES]
        large = True
    return [_case(s, large, f"Q{s[0]}-N{s[1]}-D{s[2]}-{s[3]}-k{s[4]}") for s in shapes]


# ---------------------------------------------------------------- environment record


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def environment_info(device: str) -> Dict[str, object]:
    """The per-benchmark record of where it ran (also in every benchmark's extra_info)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{_cpu_model()} ({os.cpu_count()} logical CPUs)"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device,
        "device_name": name,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if device == "cuda" else None,
        "torch_cuda_build": torch.version.cuda,
        "num_threads": torch.get_num_threads(),
        "commit": _git("rev-parse", "HEAD"),
        "commit_dirty": None if status is None else bool(status),
    }


# ---------------------------------------------------------------- torch.compile


@functools.lru_cache(maxsize=None)
def compile_problem(device: str) -> Optional[str]:
    """None when torch.compile (inductor) works here, else why not (checked once per session
    on a tiny function with a backward)."""
    try:
        def tiny(a, b):
            return (a @ b).exp().sum()

        a = torch.randn(4, 8, device=device, requires_grad=True)
        b = torch.randn(8, 4, device=device)
        torch._dynamo.reset()
        torch.compile(tiny, dynamic=False)(a, b).backward()
        torch._dynamo.reset()
    except Exception as exc:  # noqa: BLE001 - any failure means "unavailable", with the reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) with static shapes, from a clean dynamo cache (each benchmark case
    compiles its own graphs; no recompile-limit or dynamic-shape surprises across cases)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def require_compile(settings: Settings) -> None:
    if not settings.compile_enabled:
        pytest.skip("torch_compile providers disabled (--bench-no-compile / NPID_BENCH_NO_COMPILE=1)")
    problem = compile_problem(settings.device)
    if problem is not None:
        pytest.skip(f"torch.compile unavailable on {settings.device}: {problem}")


# ---------------------------------------------------------------- measurement


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


PEAK_METHOD_CUDA = "torch.cuda.max_memory_allocated() - memory_allocated() before one untimed call (after reset_peak_memory_stats)"
PEAK_METHOD_CPU = ("one untimed call under torch.profiler.profile(profile_memory=True): the running sum of the "
                   "CPU allocator's [memory] events (+alloc, -free) in time order, its maximum (every tensor "
                   "allocated during the call, outputs and saved-for-backward tensors included), plus the peak of "
                   "npid's CPU kernels' own scratch buffers in the same call (npid_kernels.ops.cpu_scratch_bytes; "
                   "added, so an upper bound when the two peaks fall at different moments); MKL/oneDNN internal "
                   "workspaces are not counted")


def measure_peak_extra_bytes(fn: Callable[[], object], device: str) -> Tuple[Optional[int], str, float]:
    """(peak bytes allocated above what was live before the call, how it was measured,
    the call's wall seconds)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak), PEAK_METHOD_CUDA, seconds
    try:
        from torch.profiler import ProfilerActivity, profile

        from npid_kernels.ops import cpu_scratch_bytes

        scratch_before, _ = cpu_scratch_bytes(reset_peak=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
        del out
        scratch_peak = cpu_scratch_bytes()[1] - scratch_before
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events = [e for e in events if "CUDA" not in str(e.device_type())]
        current = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            current += e.nbytes()
            peak = max(peak, current)
        return int(peak + scratch_peak), PEAK_METHOD_CPU, seconds
    except Exception as exc:  # noqa: BLE001 - memory is informative; never fail the timing for it
        t0 = time.perf_counter()
        fn()
        return None, f"unavailable ({type(exc).__name__}: {exc})", time.perf_counter() - t0


PEAK_METHOD_RSS = ("one untimed call: the process's peak resident memory (Linux VmHWM, reset through "
                   "/proc/self/clear_refs after malloc_trim) minus its resident memory before the call; it sees "
                   "every allocation touched, a library's own (faiss) included, but not memory the allocator "
                   "reused from earlier calls without returning it to the system")


def measure_peak_rss_bytes(fn: Callable[[], object]) -> Tuple[Optional[int], str, float]:
    """(peak resident bytes above those resident before the call, how, the call's wall seconds);
    (None, why, seconds) where /proc/self/clear_refs cannot be written (not Linux)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system first
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError as exc:
        t0 = time.perf_counter()
        fn()
        return None, f"unavailable ({type(exc).__name__}: {exc})", time.perf_counter() - t0

    def status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    del out
    return (peak - before) * 1024, PEAK_METHOD_RSS, seconds


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (on the device; inf for NaN/inf)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    if not torch.isfinite(a).all():
        return math.inf
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float, info: Dict) -> None:
    """Fail the benchmark (before any timing) when a provider's result is off."""
    err = rel_err(actual, expected)
    info[f"check_{name}_rel_err"] = err
    assert err <= tol, f"{name}: relative error {err:.3g} vs the float64 reference exceeds {tol:g}"


def bytes_str(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _proc_stat_busy_s() -> Optional[float]:
    """Seconds of CPU time the whole machine has spent busy (all CPUs), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


class ForeignCpuMonitor:
    """Share of the machine's CPU time used by *other* processes while timing ran.

    A 2-core CPU run is badly skewed by anything else running: every at::parallel_for or
    OpenMP region waits for the busy core (times jump to multiples of the scheduler tick).
    foreign_cpu_share = (machine busy time - this process's CPU time) / (wall * cpus), and
    foreign_cpus = that times the CPU count (cores busy with other work, on average). When
    foreign_cpus exceeds the cores this run leaves free (spare_cpus = cpus - torch threads)
    by more than 0.2, the CPU numbers are not trustworthy (report.py flags them with †).
    """

    def __init__(self):
        self.busy0 = _proc_stat_busy_s()
        t = os.times()
        self.own0 = t.user + t.system
        self.wall0 = time.perf_counter()

    def stop(self) -> Optional[float]:
        busy1 = _proc_stat_busy_s()
        if self.busy0 is None or busy1 is None:
            return None
        t = os.times()
        wall = time.perf_counter() - self.wall0
        foreign = (busy1 - self.busy0) - (t.user + t.system - self.own0)
        return max(0.0, foreign) / max(wall * (os.cpu_count() or 1), 1e-9)


def run_benchmark(benchmark, fn: Callable[[], object], settings: Settings, extra_info: Dict,
                  bytes_moved: int, bytes_formula: str,
                  measure_peak: Optional[Callable[[Callable[[], object]], Tuple[Optional[int], str, float]]] = None,
                  ) -> None:
    """Time `fn` (already checked by the caller) with benchmark.pedantic.

    One untimed call measures peak memory (measure_peak_extra_bytes, or `measure_peak` for a
    provider whose memory the torch allocator does not see) and estimates the call's duration,
    which picks rounds = target_s / duration clamped to [min_rounds, max_rounds]; pedantic then
    runs one warmup round and `rounds` timed rounds of one call each (fn synchronises the GPU
    itself).
    """
    if measure_peak is not None:
        peak, method, seconds = measure_peak(fn)
    else:
        peak, method, seconds = measure_peak_extra_bytes(fn, settings.device)
    rounds = int(min(settings.max_rounds, max(settings.min_rounds, settings.target_s / max(seconds, 1e-6))))
    extra_info.update(environment_info(settings.device))
    extra_info.update({
        "peak_extra_bytes": peak,
        "peak_memory_method": method,
        "bytes_moved": int(bytes_moved),
        "bytes_moved_formula": bytes_formula,
        "rounds": rounds,
    })
    benchmark.extra_info.update(extra_info)
    monitor = ForeignCpuMonitor()
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    foreign = monitor.stop()
    if foreign is not None:
        cpus = os.cpu_count() or 1
        benchmark.extra_info["foreign_cpu_share"] = round(foreign, 3)
        benchmark.extra_info["foreign_cpus"] = round(foreign * cpus, 2)
        benchmark.extra_info["spare_cpus"] = max(0, cpus - torch.get_num_threads()) if settings.device == "cpu" else cpus
    stats = getattr(benchmark, "stats", None)
    if stats:  # None with --benchmark-disable
        median = stats.stats.median
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["effective_GBps"] = bytes_moved / median / 1e9 if median > 0 else None


def make_generator(*key) -> torch.Generator:
    """A CPU generator seeded from the case, so every provider of a case sees the same data."""
    seed = 0
    for part in key:
        for ch in str(part):
            seed = (seed * 131 + ord(ch)) % (2**61 - 1)
    return torch.Generator().manual_seed(seed)


def unit_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- pure-PyTorch steps
# reference.nce_step is the NCE training step; the other losses' steps below mirror it line
# for line (mean loss, backward to x, lemniscate's in-place momentum update with index_copy_).


def torch_momentum_update_(bank: torch.Tensor, x: torch.Tensor, y: torch.Tensor, momentum: float) -> None:
    """The bank update of reference.nce_step: bank[y] <- normalise(m * bank[y] + (1 - m) * x)."""
    with torch.no_grad():
        mixed = bank.index_select(0, y).to(x.dtype) * momentum + x.detach() * (1 - momentum)
        bank.index_copy_(0, y, (mixed / mixed.norm(dim=1, keepdim=True)).to(bank.dtype))


def softmax_ce_step(x, bank, y, idx, temperature, momentum):
    from npid_kernels import reference

    loss = reference.softmax_ce_loss(x, bank, y, idx, temperature).mean()
    loss.backward()
    torch_momentum_update_(bank, x, y, momentum)
    return loss


def torch_full_softmax_loss(x, bank, y, temperature, precision: str = "fp32"):
    """reference.full_softmax_loss with the logits as PyTorch forms them at `precision`."""
    logits = torch_bank_products(x, bank, precision) / temperature
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def full_softmax_step(x, bank, y, temperature, momentum, precision: str = "fp32"):
    loss = torch_full_softmax_loss(x, bank, y, temperature, precision).mean()
    loss.backward()
    torch_momentum_update_(bank, x, y, momentum)
    return loss


def expected_rows(bank: torch.Tensor, x: torch.Tensor, y: torch.Tensor, momentum: float) -> torch.Tensor:
    """float64 bank[y] after the momentum update (y without duplicates)."""
    mixed = bank.index_select(0, y).double() * momentum + x.detach().double() * (1 - momentum)
    return mixed / mixed.norm(dim=1, keepdim=True)


def check_bank_update(before: torch.Tensor, after: torch.Tensor, y: torch.Tensor, rows_expected: torch.Tensor,
                      info: Dict) -> None:
    """Rows y hold the momentum update (to the bank dtype's precision), every other row is untouched."""
    tol = 1e-5 if before.dtype in (torch.float32, torch.float64) else 1e-2
    check_close("bank_rows", after.index_select(0, y), rows_expected, tol, info)
    untouched = torch.ones(before.shape[0], dtype=torch.bool, device=before.device)
    untouched[y] = False
    assert torch.equal(after[untouched], before[untouched]), "the step changed bank rows outside y"


def make_pass(pass_: str, loss_fn, step_fn, x: torch.Tensor, bank: torch.Tensor, device: str):
    """A closure running one pass; returns (mean loss, grad_x or None), the GPU synchronised."""
    if pass_ == "forward":
        def run():
            out = loss_fn(x, bank).mean()
            sync(device)
            return out, None
    elif pass_ == "forward_backward":
        def run():
            out = loss_fn(x, bank).mean()
            (grad,) = torch.autograd.grad(out, x)
            sync(device)
            return out, grad
    else:
        def run():
            x.grad = None
            out = step_fn(x, bank)
            sync(device)
            return out, x.grad
    return run

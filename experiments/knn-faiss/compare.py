"""Fair CPU comparison of exact inner-product kNN top-k (issue #37): npid_kernels' knn_topk
("ours"), faiss-cpu's IndexFlatIP.search ("faiss") and chunked torch matmul + topk ("torch").

Fairness: every provider runs at the same thread count (torch.set_num_threads and
faiss.omp_set_num_threads); the providers are called interleaved, round-robin with the order
rotated every round, so load changes hit all of them alike; each time is the best of
--repeats rounds after one warm-up call. The machine should be idle: the JSON records the load
average before each shape and the share of CPU time other processes took while it was timed
(foreign_cpus: cores busy with other work on average; above ~0.2 the times are not trustworthy).

Correctness: the providers' top-k similarities must agree with each other and with a float64
reference (first --check-queries queries) to 1e-4 (fp32 products of unit vectors), the k-th
score included; the script fails otherwise.

Memory: peak resident memory above what was resident before one untimed call (Linux VmHWM,
reset through /proc/self/clear_refs after malloc_trim; it sees faiss's own buffers, which the
torch profiler cannot), and for ours/torch also the torch allocator's peak as the benchmarks
measure it (profiler memory events plus npid's CPU scratch).

Shapes (Q x n, d = 128, k = 200, unit rows, fp32): 10,000 x 50,000 (the CIFAR-10 evaluation)
and 1 / 100 / 1,000 x 1,281,167 (an ImageNet-sized bank). The torch provider takes queries in
chunks of 1,000, or fewer so that one chunk's similarity matrix stays within 2^28 values (1 GiB).

Usage (from the repository root, npid_kernels built in place):
  PYTHONPATH=. python3 experiments/knn-faiss/compare.py --threads 2 --repeats 5 \
      --json experiments/knn-faiss/results/compare-$(date +%F).json
"""
from __future__ import annotations

import argparse
import datetime
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from npid_kernels import ops

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SHAPES = "10000x50000,1x1281167,100x1281167,1000x1281167"
TORCH_CHUNK = 1000
TORCH_CHUNK_VALUES = 1 << 28
CHECK_TOL = 1e-4


# ---------------------------------------------------------------- data and providers


def make_case(Q: int, n: int, d: int, seed: int = 0):
    """Unit bank rows; queries near random bank rows (as test features are), unit length."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + Q * 7919 + n)
    bank = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    near = torch.randint(0, n, (Q,), generator=g)
    query = torch.nn.functional.normalize(bank[near] + 0.7 * torch.randn(Q, d, generator=g), dim=1)
    return query.contiguous(), bank.contiguous()


def torch_chunk(n: int) -> int:
    return max(1, min(TORCH_CHUNK, TORCH_CHUNK_VALUES // n))


def torch_knn(query, bank, k):
    chunk = torch_chunk(bank.shape[0])
    sims, idx = [], []
    bank_t = bank.t()
    for q in query.split(chunk):
        s, i = (q @ bank_t).topk(k, dim=1, largest=True, sorted=True)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def faiss_problem() -> str | None:
    try:
        import faiss  # noqa: F401
    except ImportError as exc:
        return f"faiss is not installed ({exc}); pip install faiss-cpu"
    return None


def make_providers(query, bank, k, threads, names):
    providers = {}
    if "ours" in names:
        providers["ours"] = lambda: ops.knn_topk(query, bank, k)
    if "faiss" in names:
        import faiss
        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatIP(bank.shape[1])
        index.add(bank.numpy())
        qn = query.numpy()

        def run_faiss():
            sims, idx = index.search(qn, k)
            return torch.from_numpy(sims), torch.from_numpy(idx)

        providers["faiss"] = run_faiss
    if "torch" in names:
        providers["torch"] = lambda: torch_knn(query, bank, k)
    return providers


def reference_topk(query, bank, k, rows=1 << 16):
    """float64 top-k, the bank in chunks (never a Q x n float64 matrix)."""
    qd = query.double()
    best_s = best_i = None
    for start in range(0, bank.shape[0], rows):
        s = qd @ bank[start:start + rows].double().t()
        top = s.topk(min(k, s.shape[1]), dim=1)
        cand_s, cand_i = top.values, top.indices + start
        if best_s is not None:
            cand_s, cand_i = torch.cat([best_s, cand_s], 1), torch.cat([best_i, cand_i], 1)
        top = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
        best_s, best_i = top.values, cand_i.gather(1, top.indices)
    return best_s, best_i


# ---------------------------------------------------------------- measurement


def _busy_s():
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _status_kib(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_extra_bytes(fn):
    """Peak resident bytes above the resident bytes before one call of fn (None off Linux)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    if before is None or peak is None:
        return None
    return (peak - before) * 1024


def torch_peak_extra_bytes(fn):
    """The benchmarks' method (benchmarks/bench_common.py): the torch profiler's CPU allocator
    events, their running sum's maximum, plus npid's CPU scratch peak."""
    try:
        from torch.profiler import ProfilerActivity, profile
        scratch_before, _ = ops.cpu_scratch_bytes(reset_peak=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        del out
        scratch_peak = ops.cpu_scratch_bytes()[1] - scratch_before
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        current = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            current += e.nbytes()
            peak = max(peak, current)
        return int(peak + scratch_peak)
    except Exception as exc:  # noqa: BLE001 - informative only
        return f"unavailable ({type(exc).__name__}: {exc})"


def environment(threads):
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    faiss_version = None
    if faiss_problem() is None:
        import faiss
        faiss_version = faiss.__version__
    return {
        "cpu": f"{cpu} ({os.cpu_count()} logical CPUs)",
        "threads": threads,
        "torch": torch.__version__,
        "faiss": faiss_version,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "commit": git("rev-parse", "HEAD"),
        "commit_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "npid_kernels": str(Path(ops.__file__).resolve().parent),
    }


# ---------------------------------------------------------------- main


def run_shape(Q, n, d, k, threads, repeats, names, check_queries):
    query, bank = make_case(Q, n, d)
    providers = make_providers(query, bank, k, threads, names)
    row = {"Q": Q, "n": n, "d": d, "k": k, "torch_chunk": torch_chunk(n), "load_average_before": os.getloadavg(),
           "providers": {}}

    # correctness first: every provider against the float64 reference and each other
    m = min(Q, check_queries)
    ref_s, _ = reference_topk(query[:m], bank, k)
    results = {}
    for name, fn in providers.items():
        sims, idx = fn()
        assert sims.shape == (Q, k) and idx.shape == (Q, k), name
        err = (sims[:m].double() - ref_s).abs().max().item()
        kth_err = (sims[:m, k - 1].double() - ref_s[:, k - 1]).abs().max().item()
        recomputed = (query[:m].double().unsqueeze(1) * bank[idx[:m]].double()).sum(-1)
        idx_err = (recomputed - ref_s).abs().max().item()
        results[name] = sims
        row["providers"][name] = {"check_max_abs_err": err, "check_kth_abs_err": kth_err,
                                  "check_index_sims_max_abs_err": idx_err}
        assert max(err, idx_err) <= CHECK_TOL, f"{name}: top-k off by {max(err, idx_err):.3g} vs float64"
    names_run = list(providers)
    for a in names_run:
        for b in names_run:
            if a < b:
                diff = (results[a][:, k - 1] - results[b][:, k - 1]).abs().max().item()
                row[f"kth_score_max_abs_diff_{a}_vs_{b}"] = diff
                assert diff <= CHECK_TOL, f"{a} and {b}: k-th scores differ by {diff:.3g}"
    del results

    for name, fn in providers.items():
        row["providers"][name]["peak_rss_extra_bytes"] = peak_rss_extra_bytes(fn)
        if name != "faiss":
            row["providers"][name]["torch_alloc_peak_extra_bytes"] = torch_peak_extra_bytes(fn)

    times = {name: [] for name in providers}
    cpu_times = {name: [] for name in providers}
    for fn in providers.values():  # warm-up
        fn()
    busy0, own0, wall0 = _busy_s(), os.times(), time.perf_counter()
    for r in range(repeats):
        order = names_run[r % len(names_run):] + names_run[:r % len(names_run)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            out = providers[name]()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
            del out
    busy1, own1, wall = _busy_s(), os.times(), time.perf_counter() - wall0
    if busy0 is not None and busy1 is not None:
        own = (own1.user + own1.system) - (own0.user + own0.system)
        row["foreign_cpus"] = round(max(0.0, (busy1 - busy0) - own) / max(wall, 1e-9), 2)
    for name in providers:
        p = row["providers"][name]
        p["best_s"] = min(times[name])
        p["median_s"] = float(np.median(times[name]))
        p["all_s"] = times[name]
        p["cpu_s"] = cpu_times[name]
    if "ours" in providers:
        for name in providers:
            row["providers"][name]["vs_ours"] = row["providers"][name]["best_s"] / row["providers"]["ours"]["best_s"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated QxN")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--providers", default="ours,faiss,torch")
    ap.add_argument("--check-queries", type=int, default=64)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    names = [p.strip() for p in args.providers.split(",") if p.strip()]
    skipped = {}
    if "faiss" in names and faiss_problem() is not None:
        skipped["faiss"] = faiss_problem()
        names.remove("faiss")
        print(f"faiss skipped: {skipped['faiss']}", file=sys.stderr)
    out = {"environment": environment(args.threads), "repeats": args.repeats, "skipped": skipped,
           "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "shapes": []}
    for shape in args.shapes.split(","):
        Q, n = (int(v) for v in shape.lower().split("x"))
        row = run_shape(Q, n, args.d, args.k, args.threads, args.repeats, names, args.check_queries)
        out["shapes"].append(row)
        line = "  ".join(f"{name} {p['best_s'] * 1e3:9.1f} ms" for name, p in row["providers"].items())
        print(f"Q={Q:>6} n={n:>8}: {line}  (foreign_cpus {row.get('foreign_cpus')})", flush=True)
        if args.json:  # after every shape, so a long run leaves what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

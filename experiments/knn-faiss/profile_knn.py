"""Where the CPU kNN's time goes at the CIFAR-10 evaluation shape (issue #37).

Times, in one process and interleaved (round-robin, best of --repeats):
  ours        ops.knn_topk (whatever npid_kernels is on the path)
  gemm_tiles  the products alone, blocked as the GEMM-then-scan kernel blocked them (256
              queries x 16384 bank rows per at::mm), i.e. ours minus its selection
  gemm_big    the same products in at::mm calls of 4096 x 16384 (MKL at its best here)
  gemm_numpy  the same products through numpy's OpenBLAS sgemm (4096 x 1024 blocks, faiss's)
  faiss       faiss IndexFlatIP.search (sgemm blocks + heaps), if faiss is installed
  fma_peak    a register-only FMA loop's rate is not measured here: see NOTES.md

Wall times on a shared machine are dominated by the other jobs; the process CPU time of a
1-thread run (--threads 1) is what the work itself costs (OpenMP spin-waits inflate it with
more threads), so the per-core rates come from that.

Usage: python3 experiments/knn-faiss/profile_knn.py [--threads 2] [--repeats 3] [--json out.json]
"""
import argparse
import json
import time

import numpy as np
import torch

from npid_kernels import ops


def unit_rows(n, d, g):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--Q", type=int, default=10_000)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    Q, n, d, k = args.Q, args.n, args.d, args.k
    bank = unit_rows(n, d, g)
    query = unit_rows(Q, d, g)

    def gemm_tiles(qb=256, bb=16384):
        for q0 in range(0, Q, qb):
            q = query[q0:q0 + qb]
            for s in range(0, n, bb):
                torch.mm(q, bank[s:s + bb].t())

    qn, bn = query.numpy(), bank.numpy()

    def gemm_numpy():
        for q0 in range(0, Q, 4096):
            for s in range(0, n, 1024):
                qn[q0:q0 + 4096] @ bn[s:s + 1024].T

    cases = {
        "ours": lambda: ops.knn_topk(query, bank, k),
        "gemm_tiles": gemm_tiles,
        "gemm_big": lambda: gemm_tiles(4096, 16384),
        "gemm_numpy": gemm_numpy,
    }
    try:
        import faiss
        faiss.omp_set_num_threads(args.threads)
        index = faiss.IndexFlatIP(d)
        index.add(bn)
        cases["faiss"] = lambda: index.search(qn, k)
    except ImportError as exc:
        print(f"faiss skipped: {exc}")
    times = {name: [] for name in cases}
    cpu_times = {name: [] for name in cases}
    for name, fn in cases.items():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    gflop = 2 * Q * n * d / 1e9
    result = {"Q": Q, "n": n, "d": d, "k": k, "threads": args.threads, "gflop": gflop, "best_s": {}, "all_s": times,
              "best_cpu_s": {name: min(ts) for name, ts in cpu_times.items()}, "all_cpu_s": cpu_times}
    for name, ts in times.items():
        best = min(ts)
        result["best_s"][name] = best
        cpu = min(cpu_times[name])
        print(f"{name:12s} best {best:.3f} s  ({gflop / best:.0f} GFLOP/s of products)  all {[round(t, 3) for t in ts]}"
              f"  | process CPU time best {cpu:.3f} s ({gflop / cpu:.0f} GFLOP/s per busy core)")
    b = result["best_s"]
    print(f"selection (ours - gemm_tiles) ~ {b['ours'] - b['gemm_tiles']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Markdown summary of a pytest-benchmark JSON written by the npid benchmarks.

    python benchmarks/report.py benchmarks/results/<name>.json [more.json ...]

With several files, a later file's result replaces an earlier one's for the same case and
provider (e.g. a rerun of the cases a busy machine spoiled, selected with -k).

One row per (op, pass, shape, bank dtype): the median milliseconds of each provider
(torch, torch_compile, npid, npid_insample, on the CPU npid_sample_order, and npid_proximal: npid with
the proximal term), the speedups torch/npid and torch_compile/npid
(> 1 means npid is faster; for the sampled losses also torch/npid_insample), each provider's
peak extra memory (see extra_info["peak_memory_method"]) and npid's effective bandwidth
(extra_info["bytes_moved"] / median). Ends with the geometric-mean speedups per op and pass,
and, where the file has faiss kNN results, a kNN table of torch, faiss and npid side by side
with their peak resident memory (extra_info["peak_rss_extra_bytes"], the one measure that sees
faiss's buffers).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict, defaultdict

PROVIDERS = ("torch", "torch_compile", "npid", "npid_insample", "npid_sample_order", "npid_proximal")
OP_ORDER = {"nce": 0, "softmax-ce": 1, "full_softmax": 2, "knn": 3}
PASS_ORDER = {"forward": 0, "forward_backward": 1, "step": 2}
FOREIGN_MARGIN = 0.2  # cores
SHAPE_KEYS = ("B", "Q", "K", "N", "D", "topk")


def _shape(params: dict) -> str:
    parts = []
    for key in SHAPE_KEYS:
        if key in params:
            name = "k" if key == "topk" else key
            parts.append(f"{name}={params[key]:,}" if isinstance(params[key], int) else f"{name}={params[key]}")
    return " ".join(parts)


def _ms(v):
    return "–" if v is None else (f"{v:.3g}" if v < 10 else f"{v:.1f}")


def _ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


def _fmt_ratio(r):
    return "–" if r is None else f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


def _mib(b):
    return "–" if b is None else f"{b / 2**20:.3g}" if b < 10 * 2**20 else f"{b / 2**20:.0f}"


def _sort_key(op, pass_, params):
    return (OP_ORDER.get(op, 9), params.get("N", 0), params.get("K", 0), params.get("B", params.get("Q", 0)),
            params.get("bank_dtype", ""), params.get("precision", ""), PASS_ORDER.get(pass_, 9))


def _contended(info: dict) -> bool:
    """Other processes used more cores than the run left free (see bench_common.ForeignCpuMonitor)."""
    if info.get("device") != "cpu" or info.get("foreign_cpus") is None:
        return False
    return info["foreign_cpus"] > (info.get("spare_cpus") or 0) + FOREIGN_MARGIN


def load(paths):
    rows = OrderedDict()
    header = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if header is None:
            header = data
        for bench in data.get("benchmarks", []):
            info, params = bench.get("extra_info", {}), dict(bench.get("params") or {})
            provider = info.get("provider", params.get("provider"))
            op = info.get("op", bench.get("name", "?").split("[")[0])
            pass_ = info.get("pass", params.get("pass_", "forward"))
            params.pop("provider", None)
            params.pop("pass_", None)
            params.pop("loss", None)
            bank = params.get("bank_dtype", "?") + (f" {params['precision']}" if "precision" in params else "")
            key = (op, pass_, _shape(params), bank)
            row = rows.setdefault(key, {"params": params, "op": op, "pass": pass_, "providers": {}})
            row["providers"][provider] = {
                "median_ms": bench["stats"]["median"] * 1e3,
                "peak": info.get("peak_extra_bytes"),
                "peak_rss": info.get("peak_rss_extra_bytes"),
                "gbps": info.get("effective_GBps"),
                "rounds": bench["stats"].get("rounds"),
                "contended": _contended(info),
            }
    return header, rows


def render(header, rows) -> str:
    out = []
    if header:
        bench0 = (header.get("benchmarks") or [{}])[0]
        info0 = bench0.get("extra_info", {})
        commit = header.get("commit_info", {})
        out.append(f"Device: {info0.get('device', '?')} — {info0.get('device_name', '?')}; "
                   f"torch {info0.get('torch_version', '?')}, CUDA {info0.get('cuda_version')}, "
                   f"{info0.get('num_threads', '?')} threads; commit {str(info0.get('commit') or commit.get('id'))[:12]}"
                   f"{' (dirty)' if info0.get('commit_dirty', commit.get('dirty')) else ''}; {header.get('datetime', '')}")
        out.append("")
    out.append("Median ms per call (lower is better); ratios = provider time / npid time (> 1: npid faster); "
               "peak = extra memory allocated during one call, MiB; GB/s = bytes_moved / npid median.")
    out.append("")
    out.append("| op | pass | shape | bank (precision) | torch | compile | npid | npid_insample | npid sample order "
               "| npid proximal | torch/npid | compile/npid | torch/insample | peak torch | peak compile | peak npid | peak insample "
               "| npid GB/s |")
    out.append("|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    speedups = defaultdict(lambda: defaultdict(list))
    flagged = 0
    for key in sorted(rows, key=lambda k: _sort_key(rows[k]["op"], rows[k]["pass"], rows[k]["params"])):
        op, pass_, shape, dtype = key
        p = rows[key]["providers"]
        med = {name: p[name]["median_ms"] if name in p else None for name in PROVIDERS}
        busy = {name: name in p and p[name]["contended"] for name in PROVIDERS}
        flagged += sum(busy.values())
        peak = {name: p[name]["peak"] if name in p else None for name in PROVIDERS}
        r_torch = _ratio(med["torch"], med["npid"])
        r_comp = _ratio(med["torch_compile"], med["npid"])
        r_ins = _ratio(med["torch"], med["npid_insample"])
        for name, r in (("torch/npid", r_torch), ("compile/npid", r_comp), ("torch/insample", r_ins)):
            if r is not None:
                precision = rows[key]["params"].get("precision")
                speedups[(op, f"{pass_} {precision}" if precision else pass_)][name].append(r)
        gbps = p.get("npid", {}).get("gbps")
        t = {name: _ms(med[name]) + ("†" if busy[name] else "") for name in PROVIDERS}
        out.append(f"| {op} | {pass_} | {shape} | {dtype} | {t['torch']} | {t['torch_compile']} | "
                   f"{t['npid']} | {t['npid_insample']} | {t['npid_sample_order']} | {t['npid_proximal']} | {_fmt_ratio(r_torch)} | {_fmt_ratio(r_comp)} | "
                   f"{_fmt_ratio(r_ins)} | {_mib(peak['torch'])} | {_mib(peak['torch_compile'])} | {_mib(peak['npid'])} | "
                   f"{_mib(peak['npid_insample'])} | {'–' if gbps is None else f'{gbps:.1f}'} |")
    if flagged:
        out.append("")
        out.append(f"† {flagged} timing(s) ran while other processes kept busy more CPU cores than the run left free "
                   f"(extra_info foreign_cpus > spare_cpus + {FOREIGN_MARGIN}): not trustworthy; rerun those cases on a "
                   "quiet machine (later JSON files given to report.py replace earlier results of the same case).")
    if speedups:
        out.append("")
        out.append("Geometric-mean speedup of npid over all shapes and bank dtypes:")
        out.append("")
        out.append("| op | pass | torch/npid | compile/npid | torch/npid_insample |")
        out.append("|---|---|--:|--:|--:|")
        for (op, pass_) in sorted(speedups, key=lambda k: (OP_ORDER.get(k[0], 9), PASS_ORDER.get(k[1], 9))):
            s = speedups[(op, pass_)]
            gm = {name: (math.exp(sum(map(math.log, v)) / len(v)) if v else None) for name, v in s.items()}
            out.append(f"| {op} | {pass_} | {_fmt_ratio(gm.get('torch/npid'))} | {_fmt_ratio(gm.get('compile/npid'))} | "
                       f"{_fmt_ratio(gm.get('torch/insample'))} |")
    knn = render_knn_faiss(rows)
    if knn:
        out.append("")
        out.append(knn)
    return "\n".join(out)


def render_knn_faiss(rows) -> str:
    """kNN cases with a faiss result: torch, faiss and npid medians, faiss/npid and torch/npid, and
    each provider's peak resident memory above the call's start (MiB)."""
    keys = [key for key in rows if rows[key]["op"] == "knn" and "faiss" in rows[key]["providers"]]
    if not keys:
        return ""
    names = ("torch", "faiss", "npid")
    out = ["kNN top-k against faiss-cpu IndexFlatIP (same thread count), median ms; peak = resident memory "
           "above the call's start, MiB (extra_info peak_rss_extra_bytes):", "",
           "| shape | bank (precision) | torch | faiss | npid | faiss/npid | torch/npid | peak torch | peak faiss | peak npid |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for key in sorted(keys, key=lambda k: (rows[k]["params"].get("N", 0), rows[k]["params"].get("Q", 0))):
        _, _, shape, dtype = key
        p = rows[key]["providers"]
        med = {name: p[name]["median_ms"] if name in p else None for name in names}
        t = {name: _ms(med[name]) + ("†" if name in p and p[name]["contended"] else "") for name in names}
        peak = {name: p[name].get("peak_rss") if name in p else None for name in names}
        out.append(f"| {shape} | {dtype} | {t['torch']} | {t['faiss']} | {t['npid']} | "
                   f"{_fmt_ratio(_ratio(med['faiss'], med['npid']))} | {_fmt_ratio(_ratio(med['torch'], med['npid']))} | "
                   f"{_mib(peak['torch'])} | {_mib(peak['faiss'])} | {_mib(peak['npid'])} |")
    return "\n".join(out)


def _is_shared_run(paths) -> bool:
    with open(paths[0]) as f:
        benches = json.load(f).get("benchmarks", [])
    return bool(benches) and "m" in (benches[0].get("params") or {})


SHARED_PROVIDERS = ("torch_shared", "torch_shared_compile", "torch_per_sample", "npid_per_sample", "npid_shared")


def render_shared(paths) -> str:
    """test_bench_shared.py's table: per (loss, shape, m), every provider's step time and peak memory,
    and the ratios of each to npid_shared (> 1: npid_shared faster)."""
    cases = OrderedDict()
    header = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        header = header or data
        for bench in data.get("benchmarks", []):
            info, params = bench.get("extra_info", {}), bench.get("params") or {}
            key = (params["loss"], params["B"], params["N"], params["D"], params["bank_dtype"], params["m"])
            cases.setdefault(key, {})[info["provider"]] = (bench["stats"]["median"] * 1e3, info.get("peak_extra_bytes"),
                                                           _contended(info))
    info0 = (header.get("benchmarks") or [{}])[0].get("extra_info", {})
    out = [f"Device: {info0.get('device', '?')} — {info0.get('device_name', '?')}; torch {info0.get('torch_version', '?')}, "
           f"{info0.get('num_threads', '?')} threads; commit {str(info0.get('commit'))[:12]}"
           f"{' (dirty)' if info0.get('commit_dirty') else ''}; {header.get('datetime', '')}", "",
           "Training step (loss + backward + bank update), median ms; ratios = provider / npid_shared (> 1: npid_shared "
           "faster); peak MiB in brackets; † = timed while other processes were busy.", "",
           "| loss | shape | m | " + " | ".join(SHARED_PROVIDERS) + " | torch_shared/ours | compile/ours "
           "| npid_per_sample/ours |", "|---|---|--:|" + "--:|" * (len(SHARED_PROVIDERS) + 3)]
    for (loss, B, N, D, dtype, m), prov in cases.items():
        cells = []
        for name in SHARED_PROVIDERS:
            if name not in prov:
                cells.append("–")
                continue
            ms, peak, busy = prov[name]
            cells.append(f"{_ms(ms)}{'†' if busy else ''} ({_mib(peak)})")
        ours = prov.get("npid_shared", (None,))[0]
        ratios = [_fmt_ratio(_ratio(prov[name][0], ours) if name in prov else None)
                  for name in ("torch_shared", "torch_shared_compile", "npid_per_sample")]
        out.append(f"| {loss} | B={B} N={N:,} D={D} {dtype} | {m:,} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json output)")
    args = parser.parse_args(argv)
    if _is_shared_run(args.json):
        print(render_shared(args.json))
        return 0
    header, rows = load(args.json)
    if not rows:
        print("no timed benchmarks in the file (was it written with --benchmark-disable?)", file=sys.stderr)
        return 1
    print(render(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Writes the tables of README.md and docs/performance-history.md from the committed files they
report, so that no number there is typed by hand.

    python scripts/readme_tables.py           # rewrite the generated blocks in place
    python scripts/readme_tables.py --check   # exit 1 (and show the difference) when a block is stale

A generated block sits between `<!-- BEGIN generated: NAME -->` and `<!-- END generated: NAME -->`;
everything outside the markers is hand-written prose, which names the files without quoting
numbers. tests/test_readme.py runs --check, so a README that disagrees with its files fails CI.
To refresh the performance table, run scripts/benchmark_readme.sh (it times the step and then
calls this script, which reports the runs of the newest commit, benchmarks/results/*-readme-*.json).
"""
from __future__ import annotations

import argparse
import csv
import difflib
import functools
import glob
import json
import os
import re
import sys
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def performance_runs() -> List[str]:
    """The runs the README's performance table reports: those scripts/benchmark_readme.sh wrote for
    the newest commit it measured (file names start with the date, then the commit)."""
    runs = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "cpu-*-readme-*.json")))
    if not runs:
        raise SystemExit("no benchmarks/results/cpu-*-readme-*.json: run scripts/benchmark_readme.sh")
    newest = os.path.basename(runs[-1]).rsplit("-", 1)[0]
    return [os.path.relpath(r, ROOT) for r in runs if os.path.basename(r).rsplit("-", 1)[0] == newest]


# The main job (README's first command) and its random-init baseline, run with the commands in
# each folder's command.txt.
DIGITS_RUNS = {"NPID, exact non-parametric softmax, 60 epochs": "results/digits/softmax-60ep",
               "same encoder at random initialisation (`--epochs 0`)": "results/digits/random-init"}
TABLE1_FASHION_MNIST = "results/table1-cpu/table.json"


def _read_json(path: str):
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}"


def _ms(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _mib(value: Optional[float]) -> str:
    return "—" if value is None else f"{value / 2**20:.2g}" if value < 10 * 2**20 else f"{value / 2**20:.0f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "—" if a is None or b is None or b <= 0 else f"{a / b:.1f}×"


def _span(values: List[Optional[float]], fmt: Callable[[Optional[float]], str]) -> str:
    """One value, or the range of several (one per run)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    low, high = fmt(min(values)), fmt(max(values))
    return low if low == high else f"{low}–{high}"


def _bench_cases(data: Dict) -> Dict:
    """{(op, bank dtype, pass): {provider: (median ms, peak extra bytes, contended)}} of a pytest-benchmark
    JSON written by benchmarks/ (the contended test is report.py's)."""
    sys.path.insert(0, ROOT)
    from benchmarks.report import _contended  # noqa: E402  (the same rule as the benchmark report)

    cases: Dict = {}
    for bench in data.get("benchmarks", []):
        info, params = bench.get("extra_info", {}), bench.get("params") or {}
        key = (info.get("op"), params.get("bank_dtype"), info.get("pass"), params.get("B"), params.get("K"),
               params.get("N"), params.get("D"))
        cases.setdefault(key, {})[info.get("provider")] = (bench["stats"]["median"] * 1e3,
                                                           info.get("peak_extra_bytes"), _contended(info))
    return cases


def _run_line(paths: List[str], runs: List[Dict]) -> str:
    info = runs[0]["benchmarks"][0]["extra_info"]
    commit = str(info.get("commit") or "?")[:7] + (" with uncommitted changes" if info.get("commit_dirty") else "")
    when = ", ".join(d.get("datetime", "?")[:16].replace("T", " ") for d in runs)
    files = ", ".join(f"`{p}`" for p in paths)
    return (f"{len(runs)} run(s) measured {when} UTC on {info.get('device_name', '?')}, torch "
            f"{info.get('torch_version', '?')}, {info.get('num_threads', '?')} threads, commit {commit}; "
            f"files {files}. Each cell gives the range over the runs.")


def performance_block() -> str:
    paths = performance_runs()
    runs = [_read_json(p) for p in paths]
    lines = [_run_line(paths, runs), "",
             "| training step (loss, backward, bank update) | PyTorch | torch.compile | npid, idx given "
             "| npid, in-kernel sampling | PyTorch / npid | torch.compile / npid | peak extra MiB: PyTorch / npid |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    cases: Dict = {}
    for data in runs:
        for key, prov in _bench_cases(data).items():
            cases.setdefault(key, []).append(prov)
    contended = False
    order = lambda case: (str(case[0][0]), case[0][1] != "float32", str(case[0][1:]))  # noqa: E731
    for (op, dtype, pass_, B, K, N, D), provs in sorted(cases.items(), key=order):
        if pass_ != "step":
            continue
        contended |= any(v[2] for prov in provs for v in prov.values())

        def ms(name):
            return _span([p[name][0] if name in p else None for p in provs], _ms) + " ms"

        def ratio(name):
            return _span([p[name][0] / p["npid"][0] if name in p and "npid" in p else None for p in provs],
                         lambda r: f"{r:.1f}×")

        def peak(name):
            return _span([p[name][1] if name in p else None for p in provs], _mib)

        label = {"nce": "NCE", "softmax-ce": "softmax-CE"}.get(op, op)
        lines.append(f"| {label}, {dtype} bank, B={B} K={K:,} n={N:,} d={D} | {ms('torch')} | {ms('torch_compile')} "
                     f"| {ms('npid')} | {ms('npid_insample')} | {ratio('torch')} | {ratio('torch_compile')} "
                     f"| {peak('torch')} / {peak('npid')} |")
    if contended:
        lines += ["", "Some timings ran while other processes were busy (benchmarks/report.py marks them †)."]
    return "\n".join(lines)


def digits_block() -> str:
    lines = ["| run | weighted kNN (k=200), bank | weighted kNN, recomputed features | training time | file |",
             "|---|--:|--:|--:|---|"]
    for label, folder in DIGITS_RUNS.items():
        res = _read_json(os.path.join(folder, "results.json"))
        log = os.path.join(ROOT, folder, "log.csv")
        seconds = 0.0
        if os.path.exists(log):  # (an --epochs 0 run trains nothing and writes no log)
            with open(log) as f:
                seconds = sum(float(row["seconds"]) for row in csv.DictReader(f))
        bank = "—" if res.get("epochs") == 0 else f"{_pct(res.get('knn_top1_bank'))}%"  # a random bank
        lines.append(f"| {label} | {bank} | {_pct(res.get('knn_top1_features'))}% "
                     f"| {seconds:.0f} s | `{folder}/results.json` |")
    return "\n".join(lines)


def fashion_mnist_block() -> str:
    rows = _read_json(TABLE1_FASHION_MNIST)
    lines = ["| training | kNN, recomputed features | kNN, bank | linear probe, 128-d | linear probe, pooled "
             "| the paper's CIFAR-10 kNN, for reference |", "|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        # The bank of the random-init row is random, and the parametric softmax's is a momentum
        # record of its features that its loss never reads: only recomputed features compare.
        bank = None if r["row"] in ("random-init", "param-softmax") else r.get("knn_bank")
        lines.append(f"| {r['label']} | {_pct(r['knn_features'])} | {_pct(bank)} "
                     f"| {_pct(r['linear_lowdim'])} | {_pct(r['linear_pooled'])} "
                     f"| {'—' if r.get('paper_cifar10_knn') is None else r['paper_cifar10_knn']} |")
    epochs = {r["epochs"] for r in rows if r.get("epochs")}
    images = {(r["train_images"], r["test_images"]) for r in rows}
    if len(epochs) == 1 and len(images) == 1:
        (train, test), = images
        lines += ["", f"Fashion-MNIST, {train:,} training and {test:,} test images, {epochs.pop()} epochs "
                      f"per row; file `{TABLE1_FASHION_MNIST}`."]
    return "\n".join(lines)


CIFAR10_DIR = "results/cifar10-cpu"
CIFAR10_TABLE = f"{CIFAR10_DIR}/table.json"


@functools.lru_cache(maxsize=None)
def _cifar10_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cifar10_report", os.path.join(ROOT, "scripts", "cifar10_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cifar10_block() -> str:
    """The table stage's report (scripts/cifar10_report.py) of the committed rows, and what is still to run."""
    report, data = _cifar10_report(), _read_json(CIFAR10_TABLE)
    rows = data["rows"]
    text = report.render_table(rows, []).rstrip("\n")
    epochs = sorted({r["epochs"] for r in rows if r.get("epochs")})
    setup = sorted({f"{r['arch']} width {r['width']}, {r['augment']} augmentation" for r in rows})
    text += (f"\n\nCIFAR-10 (the JPEG copy described in results/cifar10-cpu/README.md), all "
             f"{max(r['train_images'] for r in rows):,} training and {max(r['eval_images'] for r in rows):,} test "
             f"images, {', '.join(setup)}, {'/'.join(map(str, epochs))} epochs, cosine schedule; file `{CIFAR10_TABLE}`.")
    missing = report.missing_table_rows(rows)
    if missing:
        text += " Rows not run yet: " + ", ".join(missing) + "."
    return text


def _not_run_yet(report, rels) -> str:
    missing = report.rows_to_run(os.path.join(ROOT, CIFAR10_DIR), rels)
    return " Rows not run yet: " + ", ".join(missing) + "." if missing else ""


def cifar10_figure3_block() -> str:
    """The figure3 stage's report of the committed rows: each lambda's loss oscillation and kNN."""
    report = _cifar10_report()
    rows = report.figure3_rows(os.path.join(ROOT, CIFAR10_DIR))
    text = report.render_figure3(rows, []).rstrip("\n")
    text += (f"\n\nFiles: each row's `steps.csv` and `results.json` under `{CIFAR10_DIR}/`; the curves: "
             f"`{CIFAR10_DIR}/figure3.png`." if rows else "")
    return text + _not_run_yet(report, report.FIGURE3_ROWS.values())


def cifar10_scale_block() -> str:
    """The scale stage's report of the committed rows: embedding size and training-set fraction."""
    report = _cifar10_report()
    rows = report.scale_rows(os.path.join(ROOT, CIFAR10_DIR))
    text = report.render_scale(rows, []).rstrip("\n")
    text += f"\n\nFiles: each row's `results.json` under `{CIFAR10_DIR}/`." if rows else ""
    return text + _not_run_yet(report, report.SCALE_STAGE_ROWS)


def cifar10_figure4_block() -> str:
    """The figure4 stage's report of the committed run: training loss and weighted kNN after each epoch."""
    report = _cifar10_report()
    rows = report.figure4_rows(os.path.join(ROOT, CIFAR10_DIR))
    if not rows:
        return f"Not run yet: `{report.FIGURE4_ROW}`."
    return report.render_figure4(rows, []).rstrip("\n") + f"\n\nThe curve: `{CIFAR10_DIR}/figure4.png`."


def history_block() -> str:
    """One row per committed pytest-benchmark run that timed the B=64, K=4096 NCE fp32 step."""
    lines = ["| file | measured (UTC) | commit | threads | PyTorch | torch.compile | npid, idx | npid, in-kernel "
             "| PyTorch / npid | timed while busy |", "|---|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))
                       + glob.glob(os.path.join(ROOT, "experiments", "**", "*.json"), recursive=True)):
        rel = os.path.relpath(path, ROOT)
        data = _read_json(rel)
        if not isinstance(data, dict) or not data.get("benchmarks"):
            continue
        step = {k: v for k, v in _bench_cases(data).items()
                if k[0] == "nce" and k[1] == "float32" and k[2] == "step" and k[3] == 64 and k[4] == 4096}
        if not step:
            continue
        prov = next(iter(step.values()))
        info = data["benchmarks"][0]["extra_info"]
        med = {p: v[0] for p, v in prov.items()}
        lines.append(f"| `{rel}` | {data.get('datetime', '?')[:16].replace('T', ' ')} "
                     f"| {str(info.get('commit'))[:7]}{' (dirty)' if info.get('commit_dirty') else ''} "
                     f"| {info.get('num_threads')} | {_ms(med.get('torch'))} | {_ms(med.get('torch_compile'))} "
                     f"| {_ms(med.get('npid'))} | {_ms(med.get('npid_insample'))} "
                     f"| {_ratio(med.get('torch'), med.get('npid'))} "
                     f"| {'yes' if any(v[2] for v in prov.values()) else 'no'} |")
    lines.sort(key=lambda line: line.split("|")[2] if line.startswith("| `") else "")
    return "\n".join(lines)


# The proximal term's cost: the B=64 step with lambda = 0 and lambda > 0 in one pytest-benchmark run.
PROXIMAL_COST_RUN = "benchmarks/results/cpu-2026-12-07-proximal.json"


def proximal_cost_block() -> str:
    data = _read_json(PROXIMAL_COST_RUN)
    info = data["benchmarks"][0]["extra_info"]
    lam = next(b["extra_info"]["proximal"] for b in data["benchmarks"] if b["extra_info"]["provider"] == "npid_proximal")
    lines = [f"File `{PROXIMAL_COST_RUN}`: one pytest-benchmark run, {data.get('datetime', '?')[:16].replace('T', ' ')} "
             f"UTC on {info.get('device_name', '?')}, {info.get('num_threads', '?')} threads, commit "
             f"{str(info.get('commit'))[:7]}; median of each row's rounds.", "",
             f"| training step (loss, backward, bank update) | λ = 0 | λ = {lam:g} | λ > 0 / λ = 0 "
             "| peak extra MiB, λ = 0 / λ > 0 |", "|---|--:|--:|--:|--:|"]
    for (op, dtype, pass_, B, K, N, D), prov in sorted(_bench_cases(data).items(), key=lambda c: (str(c[0][0]), str(c[0][1]))):
        if pass_ != "step" or "npid" not in prov or "npid_proximal" not in prov:
            continue
        off, on = prov["npid"], prov["npid_proximal"]
        label = {"nce": "NCE", "softmax-ce": "softmax-CE"}.get(op, op)
        lines.append(f"| {label}, {dtype} bank, B={B} K={K:,} n={N:,} d={D} | {_ms(off[0])} ms | {_ms(on[0])} ms "
                     f"| {on[0] / off[0]:.2f} | {_mib(off[1])} / {_mib(on[1])} |")
    return "\n".join(lines)


def knn_runs() -> List[str]:
    """The newest idle-machine comparison of experiments/knn-faiss/compare.py."""
    runs = sorted(glob.glob(os.path.join(ROOT, "experiments", "knn-faiss", "results", "compare-idle-*.json")),
                  key=lambda p: (_read_json(os.path.relpath(p, ROOT)).get("measured") or "", p))
    if not runs:
        raise SystemExit("no experiments/knn-faiss/results/compare-idle-*.json: run experiments/knn-faiss/compare.py")
    return [os.path.relpath(runs[-1], ROOT)]


def knn_block() -> str:
    path = knn_runs()[0]
    data = _read_json(path)
    env = data["environment"]
    lines = [f"File `{path}`: {env.get('cpu', '?')}, {env.get('threads', '?')} threads each, torch "
             f"{env.get('torch', '?')}, faiss-cpu {env.get('faiss', '?')}, commit {str(env.get('commit'))[:7]}"
             f"{' with uncommitted changes' if env.get('commit_dirty') else ''}; the providers interleaved, best of "
             f"{data.get('repeats', '?')} (median in brackets); d = 128, fp32, unit rows; other processes' load "
             f"during the timings at most {max(s.get('foreign_cpus') or 0 for s in data['shapes']):.2f} CPUs.", "",
             "| queries × bank rows, k | npid `knn_topk` | faiss IndexFlatIP | torch matmul + topk, chunked "
             "| faiss / npid | peak extra MiB: npid / faiss / torch |", "|---|--:|--:|--:|--:|--:|"]
    for shape in data["shapes"]:
        prov = shape["providers"]

        def cell(name):
            p = prov.get(name)
            return "—" if p is None else f"{_ms(p['best_s'] * 1e3)} ms ({_ms(p['median_s'] * 1e3)})"

        def peak(name):
            return _mib(prov[name].get("peak_rss_extra_bytes")) if name in prov else "—"

        ratio = (f"{prov['faiss']['best_s'] / prov['ours']['best_s']:.2f}×" if "faiss" in prov and "ours" in prov
                 else "—")
        lines.append(f"| {shape['Q']:,} × {shape['n']:,}, k={shape['k']} | {cell('ours')} | {cell('faiss')} "
                     f"| {cell('torch')} | {ratio} | {peak('ours')} / {peak('faiss')} / {peak('torch')} |")
    return "\n".join(lines)


BLOCKS: Dict[str, Dict[str, Callable[[], str]]] = {
    "README.md": {"digits": digits_block, "performance-cpu": performance_block,
                  "accuracy-fashion-mnist": fashion_mnist_block, "knn-cpu": knn_block,
                  "accuracy-cifar10": cifar10_block, "cifar10-figure3": cifar10_figure3_block,
                  "cifar10-scale": cifar10_scale_block, "cifar10-figure4": cifar10_figure4_block},
    "docs/performance-history.md": {"history": history_block},
    "docs/training.md": {"proximal-cost": proximal_cost_block},
}


def render(text: str, blocks: Dict[str, Callable[[], str]], path: str) -> str:
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- BEGIN generated: {re.escape(name)} -->\n).*?(<!-- END generated: {re.escape(name)} -->)",
                             re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path}: the markers of the generated block {name!r} are missing")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a block is stale")
    args = parser.parse_args(argv)
    stale = 0
    for path, blocks in BLOCKS.items():
        with open(os.path.join(ROOT, path)) as f:
            old = f.read()
        new = render(old, blocks, path)
        if new == old:
            continue
        if args.check:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), path, path + " (generated)"))
        else:
            with open(os.path.join(ROOT, path), "w") as f:
                f.write(new)
            print(f"rewrote the generated blocks of {path}")
    if stale:
        print(f"\n{stale} file(s) disagree with the committed results: run python scripts/readme_tables.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

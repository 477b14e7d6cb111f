"""Does exclude_positive change what NPID learns at small n? (issue 17, item 2)

Trains the digits preset (scikit-learn's bundled 8x8 digits: 1,438 training images, small CNN,
60 epochs; no download) with and without --exclude-positive, for NCE and softmax-CE with K = 1,024
per-sample negatives (~0.7 collisions per sample and step when kept) and NCE with shared
negatives m = 4,096 (~2.8 per sample), over several seeds, and tabulates the final weighted kNN
accuracy (bank and recomputed features). Resumable: a run whose results.json exists is skipped.

    python experiments/exclude-positive/exclude_positive_training.py [OUT_DIR [SEEDS]]     # SEEDS e.g. 0,1,2

Writes OUT_DIR/<row>-<exclude|keep>-seed<S>/ (the driver's outputs) and OUT_DIR/training.md,
OUT_DIR/training.json (every run's command and numbers, and per row the mean and the paired
differences excluded - kept over seeds).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

ROWS = {
    "nce-k1024": ["--loss", "nce", "--nce-k", "1024"],
    "softmax-ce-k1024": ["--loss", "softmax-ce", "--nce-k", "1024"],
    "nce-shared-4096": ["--loss", "nce", "--negatives", "shared", "--nce-k", "4096"],
}
COMMON = ["--dataset", "digits", "--epochs", "60", "--knn-source", "both"]


def run(out_dir: str, row: str, exclude: bool, seed: int) -> dict:
    name = f"{row}-{'exclude' if exclude else 'keep'}-seed{seed}"
    run_dir = os.path.join(out_dir, name)
    result_path = os.path.join(run_dir, "results.json")
    cmd = ["npid-train", "train", *COMMON, *ROWS[row], "--seed", str(seed), "--out-dir", run_dir]
    if exclude:
        cmd.append("--exclude-positive")
    if not os.path.exists(result_path):
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd + ["--resume"], check=True, stdout=subprocess.DEVNULL)
    with open(result_path) as f:
        result = json.load(f)
    return dict(row=row, exclude_positive=exclude, seed=seed, command=" ".join(cmd),
                knn_bank=result["knn_top1_bank"], knn_features=result["knn_top1_features"],
                wall_s=result.get("wall_seconds_this_command"))


def summarise(runs: list, seeds: list) -> tuple:
    lines = ["| row | kNN bank, kept | kNN bank, excluded | Δ bank (paired) | kNN features, kept "
             "| kNN features, excluded | Δ features (paired) |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for row in ROWS:
        by = {(r["exclude_positive"], r["seed"]): r for r in runs if r["row"] == row}
        cells, entry = [], {}
        for source in ("knn_bank", "knn_features"):
            kept = [by[(False, s)][source] for s in seeds]
            excl = [by[(True, s)][source] for s in seeds]
            diff = [e - k for e, k in zip(excl, kept)]
            spread = statistics.stdev(diff) if len(diff) > 1 else float("nan")
            entry[source] = dict(kept=kept, excluded=excl, paired_diff=diff,
                                 mean_diff=statistics.mean(diff), sd_diff=spread)
            cells += [f"{statistics.mean(kept):.2f} ({', '.join(f'{v:.2f}' for v in kept)})",
                      f"{statistics.mean(excl):.2f} ({', '.join(f'{v:.2f}' for v in excl)})",
                      f"{statistics.mean(diff):+.2f} ± {spread:.2f}"]
        summary[row] = entry
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "results/exclude-positive/training"
    seeds = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2").split(",")]
    os.makedirs(out_dir, exist_ok=True)
    runs = [run(out_dir, row, exclude, seed) for row in ROWS for seed in seeds for exclude in (False, True)]
    table, summary = summarise(runs, seeds)
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(dict(seeds=seeds, runs=runs, summary=summary, command=" ".join(sys.argv)), f, indent=1)
    with open(os.path.join(out_dir, "training.md"), "w") as f:
        f.write(f"Weighted kNN top-1 (%), digits, seeds {seeds}; Δ = excluded − kept per seed, "
                f"mean ± sd over seeds.\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()

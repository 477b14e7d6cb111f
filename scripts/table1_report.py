#!/usr/bin/env python3
"""Collects the rows of scripts/table1_cpu.sh into the paper's Table 1 layout.

    python3 scripts/table1_report.py results/table1-cpu

reads OUT/<row>/results.json and log.csv for every row of ROWS that has finished and writes
OUT/table.md (markdown, the paper's CIFAR-10 kNN numbers beside ours), OUT/table.csv,
OUT/table.json and OUT/curves.png (per-epoch loss and 1-NN monitor of every trained row).
Rows that have not finished are listed as missing; the report can be rerun at any time.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

# (directory, label, the paper's CIFAR-10 weighted-kNN top-1 with ResNet18; None: not in Table 1).
# Source: Wu et al. 2018, Table 1 (as quoted in the design notes).
ROWS = [
    ("param-softmax", "Parametric softmax", 63.0),
    ("softmax", "Non-parametric softmax (exact)", 80.8),
    ("nce-1", "NCE m=1", 42.5),
    ("nce-10", "NCE m=10", 63.4),
    ("nce-512", "NCE m=512", 78.4),
    ("nce-4096", "NCE m=4096", 80.4),
    ("softmax-ce-4096", "Softmax-CE m=4096 (InfoNCE over the same rows)", None),
    ("nce-shared-4096", "NCE, shared negatives m=4096", None),
    ("nce-shared-65536", "NCE, shared negatives m=65536", None),
    ("softmax-ce-shared-4096", "Softmax-CE, shared negatives m=4096", None),
    ("softmax-ce-shared-65536", "Softmax-CE, shared negatives m=65536", None),
    ("random-init", "Random-init encoder (no training)", None),
]

COLUMNS = ["row", "label", "paper_cifar10_knn", "knn_features", "knn_bank", "linear_lowdim", "linear_pooled",
           "svm_lowdim", "svm_pooled", "final_loss", "epochs", "train_minutes", "images_per_s", "z_mode", "nce_k", "negatives"]


def _read_log(path: str) -> List[Dict[str, float]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def collect(out: str) -> Tuple[List[Dict], Dict[str, List[Dict[str, float]]]]:
    """The table's rows, and each finished trained row's per-epoch log (for the curves)."""
    table, logs = [], {}
    for name, label, paper in ROWS:
        path = os.path.join(out, name, "results.json")
        row: Dict[str, Optional[object]] = {"row": name, "label": label, "paper_cifar10_knn": paper}
        if not os.path.exists(path):
            row["missing"] = True
            table.append(row)
            continue
        with open(path) as f:
            res = json.load(f)
        log = _read_log(os.path.join(out, name, "log.csv"))
        if log:
            logs[name] = log
        row.update({
            "knn_features": res.get("knn_top1_features"), "knn_bank": res.get("knn_top1_bank"),
            "linear_lowdim": res.get("linear_top1_lowdim"), "linear_pooled": res.get("linear_top1_pooled"),
            "svm_lowdim": res.get("svm_top1_lowdim"), "svm_pooled": res.get("svm_top1_pooled"),
            "final_loss": log[-1]["loss"] if log else None, "epochs": res.get("epochs"),
            "train_minutes": sum(r.get("seconds", 0) + r.get("eval_seconds", 0) for r in log) / 60,
            "images_per_s": (sum(r["images_per_s"] for r in log) / len(log)) if log else None,
            "z_mode": res.get("z_mode"), "nce_k": res.get("nce_k"), "negatives": res.get("negatives"),
            "train_images": res.get("train_images"), "test_images": res.get("test_images"),
        })
        table.append(row)
    return table, logs


def _fmt(value, digits=1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(table: List[Dict]) -> str:
    lines = ["| training | paper: CIFAR-10 kNN | kNN, features | kNN, bank | linear, 128-d | linear, pooled "
             "| SVM, pooled | final loss | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        if r.get("missing"):
            lines.append(f"| {r['label']} | {_fmt(r['paper_cifar10_knn'])} | not run yet | | | | | | |")
            continue
        bank = "—" if r["row"] in ("param-softmax", "random-init") else _fmt(r["knn_bank"], 2)
        lines.append(f"| {r['label']} | {_fmt(r['paper_cifar10_knn'])} | **{_fmt(r['knn_features'], 2)}** | {bank} "
                     f"| {_fmt(r['linear_lowdim'], 2)} | {_fmt(r['linear_pooled'], 2)} | {_fmt(r['svm_pooled'], 2)} "
                     f"| {_fmt(r['final_loss'], 3)} | {_fmt(r['train_minutes'])} |")
    return "\n".join(lines) + "\n"


def plot(table: List[Dict], logs: Dict[str, List[Dict[str, float]]], out: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not logs:  # e.g. only the random-init row so far
        return None
    fig, (ax_loss, ax_nn) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in table:
        log = logs.get(r["row"])
        if log is None:
            continue
        epochs = [e["epoch"] for e in log]
        ax_loss.plot(epochs, [e["loss"] for e in log], label=r["label"])
        ax_nn.plot(epochs, [e["knn1_top1"] for e in log], label=r["label"])
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss (each row in its own units)")
    ax_nn.set(xlabel="epoch", ylabel="1-NN top-1 on the bank (%)", title="per-epoch 1-NN monitor")
    ax_nn.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: List[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[0]
    table, logs = collect(out)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown(table))
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(table, f, indent=2)
    plot(table, logs, out)
    print(markdown(table), end="")
    missing = [r["row"] for r in table if r.get("missing")]
    if missing:
        print(f"not finished: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Collects the rows of one stage of scripts/cifar10_cpu.sh into a table.

    python3 scripts/cifar10_report.py results/cifar10-cpu setup|table|figure3|scale|figure4

reads OUT/<stage>/<row>/results.json and log.csv of every finished row and writes OUT/<stage>.md
and OUT/<stage>.json. For the set-up stage the evaluation set is 5,000 images held out of the
training set; each trained row is compared with the random-init row of the same encoder, and with
the kNN points it gains per minute of training. For the table stage, the rows of one setting run
with several seeds ("<setting>-seed<N>") are reported as mean and half-range, beside the paper's
CIFAR-10 number. For the figure3 stage (the paper's Figure 3: NCE m = 4096 with the proximal term's
lambda = 0, 10, 30, 50; lambda = 0 is the table stage's nce-4096-seed0) it reads each row's steps.csv
and draws the per-step NCE part and total loss in OUT/figure3.png, with the standard deviation of the
per-step NCE loss over the last epoch as the number for the oscillation. The scale stage (embedding
size d and training-set fraction; the table's nce-4096-seed0 is d = 128 at 100%) gives two small
tables; figure4 reads one run's per-epoch loss and weighted kNN and draws one against the other in
OUT/figure4.png. Rows still running are listed as not finished.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional

# The paper's Table 1 (Wu et al. 2018, CIFAR-10, ResNet18, weighted kNN top-1), by setting.
PAPER_KNN = {"param-softmax": 63.0, "softmax": 80.8, "nce-1": 42.5, "nce-10": 63.4, "nce-512": 78.4, "nce-4096": 80.4}
SETTING_ORDER = ["random-init", "param-softmax", "softmax", "nce-1", "nce-10", "nce-512", "nce-4096",
                 "nce-512-first-batch-z", "nce-4096-first-batch-z", "softmax-ce-4096", "supervised"]
# Seeds the table stage runs per setting (scripts/cifar10_cpu.sh); the others run seed 0 only.
TABLE_SEEDS = {"random-init": 2, "softmax": 2, "nce-4096": 2, "nce-1": 2}


def _row(folder: str, name: str) -> Optional[Dict]:
    path = os.path.join(folder, name, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        res = json.load(f)
    minutes, cpu_minutes, images_per_s = 0.0, None, None
    log = os.path.join(folder, name, "log.csv")
    if os.path.exists(log):
        with open(log) as f:
            rows = list(csv.DictReader(f))
        minutes = sum(float(r["seconds"]) for r in rows) / 60
        if rows and all(r.get("cpu_seconds") for r in rows):
            cpu_minutes = sum(float(r["cpu_seconds"]) for r in rows) / 60
        images_per_s = sum(float(r["images_per_s"]) for r in rows) / len(rows) if rows else None
    return {"row": name, "arch": res.get("arch"), "width": res.get("width"), "augment": res.get("augment"),
            "epochs": res.get("epochs"), "loss": res.get("loss"), "nce_k": res.get("nce_k"),
            "knn_features": res.get("knn_top1_features"), "knn_bank": res.get("knn_top1_bank"),
            "train_minutes": minutes, "train_cpu_minutes": cpu_minutes, "images_per_s": images_per_s, "eval_images": res.get("test_images"),
            "train_images": res.get("train_images"), "seed": res.get("seed"),
            "linear_lowdim": res.get("linear_top1_lowdim"), "linear_pooled": res.get("linear_top1_pooled")}


def collect(out_dir: str, stage: str) -> List[Dict]:
    folder = os.path.join(out_dir, stage)
    names = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))) if os.path.isdir(folder) else []
    rows = [r for r in (_row(folder, n) for n in names) if r is not None]
    baseline = {r["arch"]: r["knn_features"] for r in rows if r["epochs"] == 0}
    for r in rows:
        base = baseline.get(r["arch"])
        r["gain_over_random_init"] = None if base is None or r["epochs"] == 0 else r["knn_features"] - base
        # per CPU minute: less stretched than wall time when other work shares the machine
        r["gain_per_cpu_minute"] = (r["gain_over_random_init"] / r["train_cpu_minutes"]
                                    if r["gain_over_random_init"] is not None and r["train_cpu_minutes"] else None)
    rows.sort(key=lambda r: (r["epochs"] != 0, -(r["gain_per_cpu_minute"] or 0)))
    return rows


def _f(value, digits=2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(rows: List[Dict], stage: str, unfinished: List[str]) -> str:
    held_out = stage == "setup"
    what = "5,000 held-out training images" if held_out else "the 10,000 test images"
    lines = [f"Weighted kNN (k = 200) top-1 on {what}, with the bank of the other training images "
             "(recomputed features / the memory bank); training minutes from log.csv: wall clock, and the "
             "process's CPU time (both threads). Other jobs on the machine stretch both (the CPU time less: "
             "waiting threads still spin), so compare rows trained under the same load.", "",
             "| row | encoder | augmentation | epochs | kNN, features | kNN, bank | gain over random init | "
             "training minutes, wall / CPU | gain per CPU minute |", "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['arch']} width {r['width']} | {r['augment']} | {r['epochs']} "
                     f"| {_f(r['knn_features'])} | {_f(r['knn_bank'])} | {_f(r['gain_over_random_init'])} "
                     f"| {_f(r['train_minutes'], 1)} / {_f(r['train_cpu_minutes'], 1)} | {_f(r['gain_per_cpu_minute'], 2)} |")
    return _finish(lines, unfinished)


def _finish(lines: List[str], unfinished: List[str]) -> str:
    if unfinished:
        lines += ["", "not finished: " + ", ".join(unfinished)]
    return "\n".join(lines) + "\n"


def _spread(values: List[float]) -> str:
    if not values or any(v is None for v in values):
        return "—"
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"


def settings(rows: List[Dict]) -> "OrderedDict[str, List[Dict]]":
    grouped: Dict[str, List[Dict]] = {}
    for r in rows:
        grouped.setdefault(r["row"].rsplit("-seed", 1)[0], []).append(r)
    order = {name: i for i, name in enumerate(SETTING_ORDER)}
    return OrderedDict(sorted(grouped.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def missing_table_rows(rows: List[Dict]) -> List[str]:
    """The table stage's rows without a result yet: seed 0's, then seed 1's."""
    done = {r["row"] for r in rows}
    return [f"{name}-seed{seed}" for seed in range(max(TABLE_SEEDS.values())) for name in SETTING_ORDER
            if seed < TABLE_SEEDS.get(name, 1) and f"{name}-seed{seed}" not in done]


def render_table(rows: List[Dict], unfinished: List[str]) -> str:
    lines = ["Weighted kNN (k = 200) top-1 on the 10,000 test images (recomputed features / the memory bank) and "
             "a linear probe, %; mean ± half the range over the seeds run (n = number of seeds).", "",
             "| setting | n | kNN, features | kNN, bank | linear probe, 128-d | linear probe, pooled "
             "| paper (CIFAR-10, ResNet18, 200 epochs) |", "|---|--:|--:|--:|--:|--:|--:|"]
    for name, group in settings(rows).items():
        bank = "—" if name in ("random-init", "param-softmax", "supervised") else _spread([r["knn_bank"] for r in group])
        lines.append(f"| {name} | {len(group)} | {_spread([r['knn_features'] for r in group])} | {bank} "
                     f"| {_spread([r['linear_lowdim'] for r in group])} | {_spread([r['linear_pooled'] for r in group])} "
                     f"| {PAPER_KNN.get(name, '—')} |")
    return _finish(lines, unfinished)


FIGURE3_ROWS = OrderedDict([(0.0, "table/nce-4096-seed0"), (10.0, "figure3/nce-4096-lambda10-seed0"),
                            (30.0, "figure3/nce-4096-lambda30-seed0"), (50.0, "figure3/nce-4096-lambda50-seed0")])


def _std(values: List[float]) -> Optional[float]:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def figure3_rows(out_dir: str) -> List[Dict]:
    """One entry per finished lambda row: its per-step losses and the last epoch's statistics.
    instance_loss is the NCE part; a row logged before the parts existed (lambda = 0) has loss only,
    which then is the NCE part."""
    rows = []
    for lam, rel in FIGURE3_ROWS.items():
        folder = os.path.join(out_dir, rel)
        res_path, steps_path = os.path.join(folder, "results.json"), os.path.join(folder, "steps.csv")
        if not (os.path.exists(res_path) and os.path.exists(steps_path)):
            continue
        with open(res_path) as f:
            res = json.load(f)
        with open(steps_path) as f:
            steps = list(csv.DictReader(f))
        total = [float(r["loss"]) for r in steps]
        nce = [float(r["instance_loss"]) if r.get("instance_loss") else float(r["loss"]) for r in steps]
        last_epoch = max(int(r["epoch"]) for r in steps)
        last = [v for v, r in zip(nce, steps) if int(r["epoch"]) == last_epoch]
        last_total = [v for v, r in zip(total, steps) if int(r["epoch"]) == last_epoch]
        rows.append({"lambda": lam, "row": rel, "proximal_recorded": res.get("proximal", 0.0),
                     "steps": [int(r["step"]) for r in steps], "nce_loss": nce, "total_loss": total,
                     "last_epoch": last_epoch, "nce_std_last_epoch": _std(last),
                     "nce_mean_last_epoch": sum(last) / len(last), "total_std_last_epoch": _std(last_total),
                     "total_mean_last_epoch": sum(last_total) / len(last_total),
                     "knn_features": res.get("knn_top1_features"), "knn_bank": res.get("knn_top1_bank")})
    return rows


def render_figure3(rows: List[Dict], unfinished: List[str]) -> str:
    lines = ["NCE m = 4096, Z per step, 15 epochs, with the proximal term's lambda: the oscillation of the training "
             "loss is the standard deviation of the per-step loss over the last epoch (`steps.csv`); weighted kNN "
             "(k = 200) on the 10,000 test images, %. The curves are in figure3.png.", "",
             "| lambda | NCE part, last epoch: mean / std | total, last epoch: mean / std | kNN, features | kNN, bank | row |",
             "|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        lines.append(f"| {r['lambda']:g} | {_f(r['nce_mean_last_epoch'], 3)} / {_f(r['nce_std_last_epoch'], 3)} "
                     f"| {_f(r['total_mean_last_epoch'], 3)} / {_f(r['total_std_last_epoch'], 3)} "
                     f"| {_f(r['knn_features'])} | {_f(r['knn_bank'])} | `{r['row']}` |")
    return _finish(lines, unfinished)


def _pyplot():
    """matplotlib.pyplot on the file-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_figure3(rows: List[Dict], path: str) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    for r in rows:
        for ax, key in zip(axes, ("nce_loss", "total_loss")):
            ax.plot(r["steps"], r[key], linewidth=0.4, label=f"lambda = {r['lambda']:g}")
    for ax, title in zip(axes, ("NCE part of the training loss", "total training loss (NCE + proximal)")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend()
    axes[0].set_ylabel("loss per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ImageNet/ResNet18 numbers beside the scale stage's settings, by (d, fraction): only those a source
# here can be cited for (IMAGENET_SOURCE), never numbers from memory.
IMAGENET_RESNET18 = {(128, 1.0): 41.0}
IMAGENET_SOURCE = ("ImageNet/ResNet18: lemniscate.pytorch's README, its released ResNet18 (NCE m = 4096, d = 128, "
                   "all of ImageNet), top-1 nearest neighbour; the paper's other Table 4/5 entries are not in any "
                   "source available to this repository and are left out.")

# The scale stage's rows, by (embedding size d, training fraction); (128, 1.0) is the table's row.
SCALE_ROWS = OrderedDict([((32, 1.0), "scale/nce-4096-d32-seed0"), ((64, 1.0), "scale/nce-4096-d64-seed0"),
                          ((128, 1.0), "table/nce-4096-seed0"), ((256, 1.0), "scale/nce-4096-d256-seed0"),
                          ((128, 0.1), "scale/nce-4096-fraction0.1-seed0"),
                          ((128, 0.3), "scale/nce-4096-fraction0.3-seed0")])
# The untrained encoder with the bank of each fraction: a smaller bank alone lowers the kNN, so each
# fraction is set beside its own floor (same seed, so the same images) rather than the 50,000's.
SCALE_RANDOM_INIT = OrderedDict([(0.1, "scale/random-init-fraction0.1-seed0"),
                                 (0.3, "scale/random-init-fraction0.3-seed0"), (1.0, "table/random-init-seed0")])
SCALE_STAGE_ROWS = list(SCALE_ROWS.values()) + [rel for rel in SCALE_RANDOM_INIT.values() if rel.startswith("scale/")]


def scale_rows(out_dir: str) -> List[Dict]:
    rows = []
    for (d, fraction), rel in SCALE_ROWS.items():
        stage, name = rel.split("/")
        r = _row(os.path.join(out_dir, stage), name)
        if r is None:
            continue
        with open(os.path.join(out_dir, rel, "results.json")) as f:
            res = json.load(f)
        r.update({"row": rel, "low_dim": res.get("low_dim"), "train_fraction": fraction})
        if r["low_dim"] != d:
            raise SystemExit(f"{rel}: results.json says low_dim {r['low_dim']}, the stage expects {d}")
        if d == 128:
            floor = _row(out_dir, SCALE_RANDOM_INIT[fraction])
            r["random_init_knn_features"] = None if floor is None else floor["knn_features"]
        rows.append(r)
    return rows


def render_scale(rows: List[Dict], unfinished: List[str]) -> str:
    lines = ["NCE m = 4096, Z per step, the table's encoder and 15 epochs; weighted kNN (k = 200) top-1 on the 10,000 "
             "test images against the bank of the images trained on, and a linear probe, %. The paper's Tables 4 "
             "and 5 ask the same questions on ImageNet with a ResNet18. " + IMAGENET_SOURCE, ""]
    for title, varies, key in (("Embedding size (the paper's Table 4)", "d", "low_dim"),
                               ("Training-set fraction (the paper's Table 5)", "fraction of the 50,000", "train_fraction")):
        chosen = [r for r in rows if (r["train_fraction"] == 1.0 if key == "low_dim" else r["low_dim"] == 128)]
        floor = key == "train_fraction"
        columns = ([varies, "training images", "kNN, features"]
                   + (["kNN, features, untrained encoder on the same images"] if floor else [])
                   + ["kNN, bank", "linear probe, 128-d or d", "linear probe, pooled", "training minutes",
                      "ImageNet/ResNet18", "row"])
        lines += [f"{title}:", "", "| " + " | ".join(columns) + " |", "|" + "--:|" * (len(columns) - 1) + "---|"]
        for r in sorted(chosen, key=lambda r: r[key]):
            value = f"{r[key]:g}" if key == "low_dim" else f"{100 * r[key]:g}%"
            untrained = f" {_f(r.get('random_init_knn_features'))} |" if floor else ""
            lines.append(f"| {value} | {r['train_images']:,} | {_f(r['knn_features'])} |{untrained} {_f(r['knn_bank'])} "
                         f"| {_f(r['linear_lowdim'])} | {_f(r['linear_pooled'])} | {_f(r['train_minutes'], 1)} "
                         f"| {IMAGENET_RESNET18.get((r['low_dim'], r['train_fraction']), '—')} | `{r['row']}` |")
        lines.append("")
    return _finish(lines[:-1], unfinished)


FIGURE4_ROW = "figure4/nce-4096-eval-every-epoch-seed0"


def figure4_rows(out_dir: str) -> List[Dict]:
    """The run's epochs: training loss and the weighted kNN after each (log.csv)."""
    log = os.path.join(out_dir, FIGURE4_ROW, "log.csv")
    if not os.path.exists(os.path.join(out_dir, FIGURE4_ROW, "results.json")) or not os.path.exists(log):
        return []
    with open(log) as f:
        return [{"epoch": int(r["epoch"]), "loss": float(r["loss"]),
                 "knn": float(r["knn_top1"]) if r.get("knn_top1") else None,
                 "nn1": float(r["knn1_top1"]) if r.get("knn1_top1") else None} for r in csv.DictReader(f)]


def render_figure4(rows: List[Dict], unfinished: List[str]) -> str:
    lines = ["NCE m = 4096, Z per step, 15 epochs: the training loss (mean over the epoch's steps) and the weighted "
             "kNN (k = 200) top-1 of the 10,000 test images against the memory bank after each epoch, %, from "
             f"`{FIGURE4_ROW}/log.csv`; drawn in figure4.png.", "",
             "| epoch | training loss | weighted kNN | 1-NN |", "|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {_f(r['loss'], 4)} | {_f(r['knn'])} | {_f(r['nn1'])} |")
    return _finish(lines, unfinished)


def plot_figure4(rows: List[Dict], path: str) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    points = [r for r in rows if r["knn"] is not None]
    ax.plot([r["loss"] for r in points], [r["knn"] for r in points], "o-")
    for r in points:
        ax.annotate(str(r["epoch"]), (r["loss"], r["knn"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.invert_xaxis()  # training runs left to right as the loss falls
    ax.set_xlabel("training loss (epoch mean)")
    ax.set_ylabel("weighted kNN top-1 on the test images, %")
    ax.set_title("kNN accuracy against training loss (numbers: epochs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _write_stage(out_dir: str, stage: str, text: str, payload: Dict) -> None:
    with open(os.path.join(out_dir, f"{stage}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, f"{stage}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    print(text)


def rows_to_run(out_dir: str, rels) -> List[str]:
    """Those of the rows `rels` (paths under out_dir) without a results.json yet, started or not."""
    return [rel for rel in rels if not os.path.exists(os.path.join(out_dir, rel, "results.json"))]


def main_scale(out_dir: str) -> int:
    rows = scale_rows(out_dir)
    unfinished = [rel for rel in rows_to_run(out_dir, SCALE_STAGE_ROWS) if os.path.isdir(os.path.join(out_dir, rel))]
    _write_stage(out_dir, "scale", render_scale(rows, unfinished), {"stage": "scale", "rows": rows, "unfinished": unfinished})
    return 0


def main_figure4(out_dir: str) -> int:
    rows = figure4_rows(out_dir)
    unfinished = [FIGURE4_ROW] if not rows and os.path.isdir(os.path.join(out_dir, FIGURE4_ROW)) else []
    text = render_figure4(rows, unfinished)
    if rows and not plot_figure4(rows, os.path.join(out_dir, "figure4.png")):
        text += "\n(matplotlib is not installed: figure4.png was not drawn)\n"
    _write_stage(out_dir, "figure4", text, {"stage": "figure4", "row": FIGURE4_ROW, "epochs": rows, "unfinished": unfinished})
    return 0


def main(argv: List[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir, stage = argv[1], argv[2]
    if stage == "figure3":
        return main_figure3(out_dir)
    if stage == "scale":
        return main_scale(out_dir)
    if stage == "figure4":
        return main_figure4(out_dir)
    rows = collect(out_dir, stage)
    folder = os.path.join(out_dir, stage)
    started = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))) if os.path.isdir(folder) else []
    unfinished = [n for n in started if n not in {r["row"] for r in rows}]
    text = render_table(rows, unfinished) if stage == "table" else render(rows, stage, unfinished)
    _write_stage(out_dir, stage, text, {"stage": stage, "rows": rows, "unfinished": unfinished})
    return 0


def main_figure3(out_dir: str) -> int:
    rows = figure3_rows(out_dir)
    done = {r["row"] for r in rows}
    unfinished = [rel for rel in FIGURE3_ROWS.values() if rel not in done and os.path.isdir(os.path.join(out_dir, rel))]
    text = render_figure3(rows, unfinished)
    if rows and not plot_figure3(rows, os.path.join(out_dir, "figure3.png")):
        text += "\n(matplotlib is not installed: figure3.png was not drawn)\n"
    # The per-step series stay in each row's steps.csv; the JSON keeps what the table reports.
    summary = [{k: v for k, v in r.items() if k not in ("steps", "nce_loss", "total_loss")} for r in rows]
    _write_stage(out_dir, "figure3", text, {"stage": "figure3", "rows": summary, "unfinished": unfinished})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""scripts/cifar10_cpu.sh at toy size: the set-up stage evaluates on images held out of the
training set (never the test set), the table stage runs every row of the paper's Table 1 plus the
supervised reference with two seeds where asked, both reports list every row, a rerun skips
finished rows, the figure3 stage trains the proximal term's lambdas and measures the per-step
loss's oscillation from steps.csv, the scale stage varies d and the training fraction, and the
figure4 stage logs the weighted kNN after every epoch."""
import csv
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from script_modules import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("STAGES", "EXTRA", "HOLDOUT", "ARCH", "WIDTH", "AUGMENT", "EPOCHS")


def cifar10_cpu(data, out, **env):
    environ = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    environ.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "cifar10_cpu.sh"), str(data), str(out)],
                          env=environ, capture_output=True, text=True, timeout=1500)


def random_cifar_npz(path, train_images, seed):
    rng = np.random.default_rng(seed)
    np.savez(path, train_x=rng.integers(0, 255, (train_images, 32, 32, 3), dtype=np.uint8),
             train_y=np.arange(train_images) % 10,
             test_x=rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), test_y=np.arange(10) % 10)
    return path


@pytest.fixture
def tiny_cifar(tmp_path):
    return random_cifar_npz(tmp_path / "c.npz", 40, seed=8)


@pytest.mark.slow
def test_setup_stage_judges_on_held_out_training_images(tmp_path, tiny_cifar):
    out = tmp_path / "out"
    first = cifar10_cpu(tiny_cifar, out, STAGES="setup", HOLDOUT="8",
                        EXTRA="--epochs 1 --width 4 --batch-size 8 --nce-k 8 --knn-k 4")
    assert first.returncode == 0, first.stderr + first.stdout
    report = json.loads((out / "setup.json").read_text())
    assert len(report["rows"]) == 5 and not report["unfinished"]
    for row in report["rows"]:
        assert row["eval_images"] == 8 and row["train_images"] == 32, row  # 8 of the 40 training images
        assert row["train_cpu_minutes"] > 0, row  # the cost measure that other jobs on the machine do not stretch
    again = cifar10_cpu(tiny_cifar, out, STAGES="setup", HOLDOUT="8", EXTRA="--epochs 1 --width 4 --batch-size 8")
    assert again.returncode == 0 and again.stdout.count(": done") == 5


@pytest.mark.slow
def test_table_stage_runs_every_row_with_seeds(tmp_path, tiny_cifar):
    out = tmp_path / "out"
    result = cifar10_cpu(tiny_cifar, out, STAGES="table", ARCH="cnn4", WIDTH="4", EPOCHS="1",
                         EXTRA="--batch-size 8 --nce-k 8 --knn-k 4 --svm-max-train 40")
    assert result.returncode == 0, result.stderr + result.stdout
    table = (out / "table.md").read_text()
    for setting, seeds in [("random-init", 2), ("softmax", 2), ("nce-4096", 2), ("nce-1", 2), ("param-softmax", 1),
                           ("nce-10", 1), ("nce-512", 1), ("nce-512-first-batch-z", 1), ("nce-4096-first-batch-z", 1),
                           ("softmax-ce-4096", 1), ("supervised", 1)]:
        assert f"| {setting} | {seeds} |" in table, setting
    assert "| nce-4096 | 2 |" in table and "| 80.4 |" in table and " ± " in table
    res = json.loads((out / "table" / "supervised-seed0" / "results.json").read_text())
    assert res["test_images"] == 10 and res["loss"] == "supervised" and "linear_top1_pooled" in res


@pytest.mark.slow
def test_figure3_stage_runs_the_lambdas_and_measures_the_oscillation(tmp_path, tiny_cifar):
    out = tmp_path / "out"
    result = cifar10_cpu(tiny_cifar, out, STAGES="figure3", ARCH="cnn4", WIDTH="4", EPOCHS="2",
                         EXTRA="--batch-size 8 --nce-k 8 --knn-k 4 --svm-max-train 40")
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads((out / "figure3.json").read_text())
    assert [r["lambda"] for r in report["rows"]] == [10.0, 30.0, 50.0]  # lambda = 0 comes from the table stage
    for r in report["rows"]:
        assert r["proximal_recorded"] == r["lambda"]
        with open(out / r["row"] / "steps.csv") as f:
            steps = list(csv.DictReader(f))
        last = [float(s["instance_loss"]) for s in steps if s["epoch"] == "2"]
        assert len(last) >= 2 and r["nce_std_last_epoch"] == pytest.approx(statistics.stdev(last))
        assert all(float(s["proximal_loss"]) > 0 for s in steps)
    assert (out / "figure3.png").stat().st_size > 0
    assert "| 30 |" in (out / "figure3.md").read_text()


@pytest.fixture
def small_cifar(tmp_path):
    """100 training images: 10% of them still fill a batch and a few negatives."""
    return random_cifar_npz(tmp_path / "s.npz", 100, seed=9)


@pytest.mark.slow
def test_scale_stage_varies_the_embedding_size_and_the_training_fraction(tmp_path, small_cifar):
    out = tmp_path / "out"
    result = cifar10_cpu(small_cifar, out, STAGES="scale", ARCH="cnn4", WIDTH="4", EPOCHS="1",
                         EXTRA="--batch-size 4 --nce-k 4 --knn-k 4 --svm-max-train 40")
    assert result.returncode == 0, result.stderr + result.stdout
    rows = {r["row"]: r for r in json.loads((out / "scale.json").read_text())["rows"]}
    for d in (32, 64, 256):
        r = rows[f"scale/nce-4096-d{d}-seed0"]
        assert r["low_dim"] == d and r["train_images"] == 100 and r["train_fraction"] == 1.0
        res = json.loads((out / "scale" / f"nce-4096-d{d}-seed0" / "results.json").read_text())
        assert res["low_dim"] == d and res["test_images"] == 10
    for fraction, images in ((0.1, 10), (0.3, 30)):
        r = rows[f"scale/nce-4096-fraction{fraction}-seed0"]
        assert r["train_images"] == images and r["low_dim"] == 128 and r["eval_images"] == 10
        # Each fraction's floor: the untrained encoder with the same images in its bank.
        floor = json.loads((out / "scale" / f"random-init-fraction{fraction}-seed0" / "results.json").read_text())
        assert floor["epochs"] == 0 and floor["train_images"] == images
        assert r["random_init_knn_features"] == floor["knn_top1_features"]
    text = (out / "scale.md").read_text()
    assert "| 256 | 100 |" in text and "| 10% | 10 |" in text and "| 30% | 30 |" in text
    assert "untrained encoder on the same images" in text


def test_scale_report_sets_imagenet_numbers_only_beside_their_own_setting():
    """The ImageNet/ResNet18 column holds a number only where a cited source gives one (d = 128 on all
    the images); every other row says it has none."""
    report = load_script("scripts/cifar10_report.py")
    rows = [dict(row=f"r{d}-{fraction}", low_dim=d, train_fraction=fraction, train_images=int(50000 * fraction),
                 knn_features=40.0, knn_bank=38.0, linear_lowdim=45.0, linear_pooled=47.0, train_minutes=15.0)
            for d, fraction in ((32, 1.0), (128, 1.0), (128, 0.1))]
    for r in rows[1:]:
        r["random_init_knn_features"] = 30.0
    lines = {line.split("`")[1]: line for line in report.render_scale(rows, []).splitlines() if "`r" in line}
    assert "| 41.0 |" in lines["r128-1.0"]
    assert "41.0" not in lines["r32-1.0"] and "| — |" in lines["r32-1.0"]
    assert "41.0" not in lines["r128-0.1"] and "| — |" in lines["r128-0.1"]


@pytest.mark.slow
def test_figure4_stage_evaluates_the_knn_after_every_epoch(tmp_path, tiny_cifar):
    out = tmp_path / "out"
    result = cifar10_cpu(tiny_cifar, out, STAGES="figure4", ARCH="cnn4", WIDTH="4", EPOCHS="3",
                         EXTRA="--batch-size 8 --nce-k 8 --knn-k 4")
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads((out / "figure4.json").read_text())
    with open(out / report["row"] / "log.csv") as f:
        log = list(csv.DictReader(f))
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3]
    assert [e["knn"] for e in report["epochs"]] == [float(r["knn_top1"]) for r in log]
    assert [e["loss"] for e in report["epochs"]] == [float(r["loss"]) for r in log]
    assert (out / "figure4.png").stat().st_size > 0

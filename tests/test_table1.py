"""scripts/table1_cpu.sh (the paper's Table 1 in miniature) end to end at toy size: every row
trains and is evaluated, the report holds them all, and an interrupted table resumes: rows that
finished are skipped and an unfinished row continues from its checkpoint."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from test_datasets import make_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["param-softmax", "softmax", "nce-1", "nce-10", "nce-512", "nce-4096", "softmax-ce-4096", "nce-shared-4096",
        "nce-shared-65536", "softmax-ce-shared-4096", "softmax-ce-shared-65536", "random-init"]


SETTINGS = ("EPOCHS", "TRAIN_FRACTION", "IMAGE_SIZE", "ARCH", "WIDTH", "AUGMENT", "Z_MODE", "EXTRA")


def table1(data, out, **env):
    environ = {k: v for k, v in os.environ.items() if k not in SETTINGS}  # the caller's table settings
    environ.update(PYTHON=sys.executable, TRAIN_FRACTION="1", WIDTH="8", **env)
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "table1_cpu.sh"), str(data), str(out)],
                          env=environ, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_table1_script_runs_every_row_and_resumes(tmp_path):
    data, out = tmp_path / "fashion", tmp_path / "table"
    data.mkdir()
    make_fashion_mnist(data, n_train=300, n_test=60)
    # First start: each row stops after its first epoch of two (as a job time limit would).
    first = table1(data, out, EPOCHS="2", EXTRA="--max-epochs-this-run 1")
    assert first.returncode == 0, first.stderr + first.stdout
    assert "not finished: param-softmax, softmax, nce-1" in first.stdout  # random-init has no epoch to stop in
    for row in ROWS[:-1]:
        assert torch.load(out / row / "checkpoint.pt", weights_only=True)["epoch"] == 1, row
        assert not (out / row / "results.json").exists()
    done_before = (out / "random-init" / "results.json").stat().st_mtime_ns
    # Second start: the finished row is skipped, the others continue from epoch 1.
    second = table1(data, out, EPOCHS="2")
    assert second.returncode == 0, second.stderr + second.stdout
    assert "== random-init: done" in second.stdout and "not finished" not in second.stdout
    assert (out / "random-init" / "results.json").stat().st_mtime_ns == done_before
    rows = {r["row"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert list(rows) == ROWS
    for name, r in rows.items():
        res = json.loads((out / name / "results.json").read_text())
        assert res["epochs"] == (0 if name == "random-init" else 2), name
        assert float(r["knn_features"]) == res["knn_top1_features"] and r["linear_pooled"] != "", name
        if name != "random-init":
            log = list(csv.DictReader((out / name / "log.csv").open()))
            assert [int(e["epoch"]) for e in log] == [1, 2], name  # resumed, not restarted
    assert json.loads((out / "nce-512" / "results.json").read_text())["nce_k"] == 299  # K capped at n - 1
    assert json.loads((out / "nce-10" / "results.json").read_text())["z_mode"] == "batch"
    shared = json.loads((out / "nce-shared-65536" / "results.json").read_text())
    assert shared["negatives"] == "shared" and shared["nce_k"] == 65536  # m is not capped at n - 1
    table = (out / "table.md").read_text()
    nce = json.loads((out / "nce-4096" / "results.json").read_text())
    assert table.count("\n") == 2 + len(ROWS)
    # The row holds this run's numbers beside the paper's.
    assert f"| NCE m=4096 | 80.4 | **{nce['knn_top1_features']:.2f}** | {nce['knn_top1_bank']:.2f} |" in table
    assert (out / "curves.png").stat().st_size > 0
    assert "table1_cpu.sh started" in (out / "command.txt").read_text()


def test_table1_script_refuses_a_missing_dataset(tmp_path):
    result = table1(tmp_path / "nowhere", tmp_path / "table", EPOCHS="1")
    assert result.returncode == 2 and "no Fashion-MNIST folder" in result.stderr

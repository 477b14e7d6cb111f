"""The npid-train driver end to end on the CPU: it learns, it resumes bit for bit, it exports,
and it fails clearly on bad input."""
import argparse
import json
import os

import pytest
import torch

from npid_kernels import train as T
from npid_kernels.knn import knn_evaluate
from npid_kernels.models import build_encoder

DIGITS_JOB = ["train", "--dataset", "digits", "--loss", "softmax", "--knn-source", "bank", "--eval-every", "100"]


def run(argv):
    assert T.main(argv) == 0


def random_init_knn(seed=0):
    args = argparse.Namespace(dataset="digits", data_dir=None, train_fraction=1.0, seed=seed, augment=None, image_size=None)
    data = T.Data(args, torch.device("cpu"))
    torch.manual_seed(seed)
    model = build_encoder("small-cnn", 128, data.in_channels)
    train_features, test_features = data.features(model, "train"), data.features(model, "test")
    return knn_evaluate(test_features, data.test_labels, train_features, data.train_labels, data.num_classes, k=200)["knn_top1"]


def test_npid_learns_features_better_than_random_init(tmp_path):
    run(DIGITS_JOB + ["--epochs", "60", "--out-dir", str(tmp_path)])
    learned = json.loads((tmp_path / "results.json").read_text())["knn_top1_bank"]
    baseline = random_init_knn()
    assert learned >= baseline + 10, f"learned kNN {learned:.1f}% vs random init {baseline:.1f}%"
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "log.csv").read_text().count("\n") == 61


def test_learning_check_fails_when_the_bank_is_never_updated(tmp_path):
    """momentum 1 keeps the bank at its random initialisation: the same check must then fail."""
    run(DIGITS_JOB + ["--epochs", "5", "--nce-m", "1.0", "--out-dir", str(tmp_path)])
    frozen = json.loads((tmp_path / "results.json").read_text())["knn_top1_bank"]
    assert frozen < random_init_knn() + 10


def test_resume_lands_where_one_run_does(tmp_path):
    common = ["train", "--dataset", "digits", "--loss", "nce", "--nce-k", "64", "--epochs", "2", "--eval-every", "100",
              "--knn-source", "bank", "--batch-size", "256"]
    run(common + ["--out-dir", str(tmp_path / "straight")])
    run(common + ["--out-dir", str(tmp_path / "split"), "--max-epochs-this-run", "1"])
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    run(common + ["--out-dir", str(tmp_path / "split"), "--resume"])
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["criterion"]:
        assert torch.equal(a["criterion"][key], b["criterion"][key]), key
    assert [row["loss"] for row in a["history"]] == [row["loss"] for row in b["history"]]


def test_resume_refuses_another_configuration(tmp_path, capsys):
    common = ["train", "--dataset", "digits", "--epochs", "2", "--max-epochs-this-run", "1", "--nce-k", "32",
              "--out-dir", str(tmp_path), "--eval-every", "100", "--knn-source", "bank"]
    run(common)
    assert T.main(common + ["--resume", "--low-dim", "64"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_eval_and_export(tmp_path):
    run(DIGITS_JOB + ["--epochs", "2", "--out-dir", str(tmp_path)])
    ckpt = str(tmp_path / "checkpoint.pt")
    png = tmp_path / "nn.png"
    run(["eval", "--checkpoint", ckpt, "--knn-k", "20", "--linear-probe", "--retrieval-png", str(png)])
    assert png.stat().st_size > 0
    run(["export", "--checkpoint", ckpt, "--output", str(tmp_path / "backbone.pth")])
    state = torch.load(tmp_path / "backbone.pth")
    assert "head.weight" in state and state["head.weight"].shape == (128, 128)


def test_export_loads_into_torchvision_resnet(tmp_path):
    import numpy as np
    import torchvision

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", train_x=rng.integers(0, 255, (12, 16, 16, 3), dtype=np.uint8), train_y=np.arange(12) % 3,
             test_x=rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8), test_y=np.arange(6) % 3)
    run(["train", "--dataset", "npz", "--data-dir", str(tmp_path / "tiny.npz"), "--arch", "resnet18", "--cifar-stem",
         "--low-dim", "32", "--epochs", "1", "--batch-size", "4", "--nce-k", "5", "--out-dir", str(tmp_path / "run"),
         "--knn-k", "5"])
    run(["export", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--output", str(tmp_path / "r18.pth")])
    model = torchvision.models.resnet18(num_classes=32)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    model.load_state_dict(torch.load(tmp_path / "r18.pth"))  # strict: every key matches


def test_help_reads(capsys):
    with pytest.raises(SystemExit):
        T.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--nce-k", "--low-dim", "--cifar-stem", "--resume", "--train-fraction", "--schedule", "--linear-probe"):
        assert flag in text


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10", "imagefolder"])
def test_missing_dataset_path_is_a_clear_error(tmp_path, capsys, dataset):
    assert T.main(["train", "--dataset", dataset, "--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path)]) == 2
    assert "npid-train: error:" in capsys.readouterr().err


def test_eval_rejects_bank_dataset_size_mismatch(tmp_path, capsys):
    run(DIGITS_JOB + ["--epochs", "1", "--out-dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    ckpt["args"]["train_fraction"] = 0.5
    torch.save(ckpt, tmp_path / "other.pt")
    assert T.main(["eval", "--checkpoint", str(tmp_path / "other.pt")]) == 2
    assert "bank has 1438 rows but the dataset has 719 images" in capsys.readouterr().err


@pytest.mark.parametrize("bank_mode", ["replicated", "sharded"])
def test_torchrun_two_processes_then_resume_in_one(tmp_path, bank_mode):
    """npid-train under torchrun (gloo, 2 CPU processes): one checkpoint, written once, that a
    single process resumes (the bank is saved whole, whatever the world size)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["train", "--dataset", "digits", "--loss", "nce", "--nce-k", "64", "--epochs", "2", "--batch-size", "64",
              "--eval-every", "100", "--knn-source", "bank", "--out-dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         "-m", "npid_kernels.train"] + common + ["--bank-mode", bank_mode, "--max-epochs-this-run", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1:") == 1  # only rank 0 logs
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    bank = ckpt["criterion"]["bank.memory"]
    assert ckpt["epoch"] == 1 and bank.shape == (1438, 128)
    # every instance of the epoch's 11 global batches of 128 was momentum-updated (rows exactly unit)
    assert int(((bank.float().norm(dim=1) - 1).abs() < 1e-5).sum()) >= 11 * 128
    assert ckpt["criterion"]["rng_state"][1].item() == 2 * (1438 // 128)  # 2 streams per global step
    run(common + ["--resume"])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 2

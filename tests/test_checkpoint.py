"""Checkpoints are data, not code: train --resume, eval and export open a file without running
anything stored in it, refuse what is not a genuine checkpoint with one clear line, and a
format-1 checkpoint is rewritten only by the explicit convert-checkpoint command. The CIFAR-10
python batches are read through an unpickler that builds only what such a batch holds."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from npid_kernels import checkpoint as C
from npid_kernels import data as D
from npid_kernels import train as T

from test_datasets import make_cifar10

TINY_JOB = ["train", "--dataset", "digits", "--loss", "nce", "--nce-k", "32", "--epochs", "2", "--eval-every", "100",
            "--knn-source", "bank", "--batch-size", "256"]


class CreatesAFile:
    """Unpickling this calls open(marker, "w"): the file appearing means the loader ran the pickle's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """One epoch of a tiny run (its checkpoint.pt), and the same run's second epoch resumed from it."""
    root = tmp_path_factory.mktemp("genuine")
    assert T.main(TINY_JOB + ["--out-dir", str(root / "run"), "--max-epochs-this-run", "1"]) == 0
    return root / "run" / "checkpoint.pt"


def crafted_checkpoint(path, marker):
    torch.save({"format": C.FORMAT, "model": CreatesAFile(marker), "criterion": {}, "config": {}, "args": {},
                "epoch": 1}, path)
    return path


def entry_points(checkpoint, tmp_path):
    """The three commands that open a checkpoint, and what each would write."""
    out_dir = checkpoint.parent
    return {
        "resume": (TINY_JOB + ["--out-dir", str(out_dir), "--resume"], out_dir),
        "eval": (["eval", "--checkpoint", str(checkpoint), "--output-json", str(tmp_path / "eval.json")],
                 tmp_path / "eval.json"),
        "export": (["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "b.pth")],
                   tmp_path / "b.pth"),
    }


def test_the_crafted_file_runs_code_when_unpickled_in_full(tmp_path):
    """The attack the other tests refuse is real: an unrestricted load creates the marker."""
    marker = tmp_path / "marker"
    torch.load(crafted_checkpoint(tmp_path / "checkpoint.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["resume", "eval", "export"])
def test_loading_a_crafted_checkpoint_runs_nothing(tmp_path, capsys, command):
    marker, run_dir = tmp_path / "marker", tmp_path / "run"
    run_dir.mkdir()
    checkpoint = crafted_checkpoint(run_dir / "checkpoint.pt", marker)
    argv, written = entry_points(checkpoint, tmp_path)[command]
    before = sorted(os.listdir(run_dir))
    assert T.main(argv) == 2
    assert not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("npid-train: error:"), err
    assert str(checkpoint) in err[0] and "nothing in it ran" in err[0] and "names io.open" in err[0]
    assert "Traceback" not in err[0]
    if command == "resume":
        assert sorted(os.listdir(run_dir)) == before  # no log.csv, results.json, curves or new checkpoint
    else:
        assert not written.exists()


def foreign_files(tmp_path, genuine):
    """Files that are not npid-train checkpoints, each with the words its error must contain."""
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(genuine.read_bytes()[: genuine.stat().st_size // 2])
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, other)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    return {truncated: "torch.load cannot read it", other: "no 'format' entry", listed: "holds a list",
            text: "torch.load cannot read it", folder: "is a directory", tmp_path / "missing.pt": "does not exist"}


@pytest.mark.parametrize("command", ["resume", "eval", "export"])
def test_a_file_that_is_not_a_checkpoint_is_one_clear_line(tmp_path, capsys, genuine, command):
    for path, words in foreign_files(tmp_path, genuine).items():
        run_dir = tmp_path / f"run-{path.name}"
        if command == "resume":  # the driver reads OUT_DIR/checkpoint.pt
            run_dir.mkdir()
            if path.exists():
                os.symlink(path, run_dir / "checkpoint.pt")
            checkpoint = run_dir / "checkpoint.pt"
        else:
            checkpoint = path
        argv, written = entry_points(checkpoint, tmp_path)[command]
        if command == "resume" and not path.exists():
            continue  # no checkpoint in OUT_DIR: --resume starts afresh, by design
        before = sorted(os.listdir(run_dir)) if command == "resume" else None
        assert T.main(argv) == 2, path
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("npid-train: error:") and words in err[0], (path, err)
        if command == "resume":
            assert sorted(os.listdir(run_dir)) == before
        else:
            assert not written.exists()


def test_a_checkpoint_holds_plain_data_only(genuine):
    ckpt = torch.load(genuine, weights_only=True)  # raises on anything but tensors and plain values
    assert ckpt["format"] == C.FORMAT
    C.check_plain(ckpt)
    with pytest.raises(TypeError, match=r"\['history'\]\[0\]\['loss'\] is a numpy.float64"):
        C.check_plain({"history": [{"loss": np.float64(1.0)}]})
    with pytest.raises(TypeError, match=r"\['args'\] is a argparse.Namespace"):
        C.check_plain({"args": __import__("argparse").Namespace(lr=0.1)})
    with pytest.raises(TypeError, match="parameter.Parameter"):
        C.check_plain({"w": torch.nn.Parameter(torch.zeros(1))})


def test_rng_states_round_trip_as_plain_values():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.randn()  # a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    state = C.rng_state()
    C.check_plain(state)
    first = (torch.rand(3), np.random.rand(3), np.random.randn(), [random.random() for _ in range(3)], random.gauss(0, 1))
    C.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), np.random.randn(), [random.random() for _ in range(3)], random.gauss(0, 1))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def as_format_1(ckpt):
    """A checkpoint as the driver wrote it before format 2: numpy's and Python's RNG states as the
    objects their getters return, no 'format' entry, a numpy float in the history."""
    old = dict(ckpt)
    del old["format"]
    n, p = old["rng"]["numpy"], old["rng"]["python"]
    old["rng"] = {"torch": old["rng"]["torch"], "cuda": None,
                  "numpy": (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]),
                  "python": (p["version"], tuple(p["internal"].tolist()), p["gauss_next"])}
    old["history"] = [{**row, "loss": np.float64(row["loss"])} for row in old["history"]]
    return old


def test_format_1_is_refused_then_converted_explicitly_and_resumes_bit_for_bit(tmp_path, capsys, genuine):
    straight, old_run = tmp_path / "straight", tmp_path / "old"
    for folder in (straight, old_run):
        folder.mkdir()
    (straight / "checkpoint.pt").write_bytes(genuine.read_bytes())
    torch.save(as_format_1(torch.load(genuine, weights_only=True)), old_run / "checkpoint.pt")

    assert T.main(TINY_JOB + ["--out-dir", str(old_run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"npid-train convert-checkpoint {old_run / 'checkpoint.pt'}" in err and "nothing in it ran" in err
    assert sorted(os.listdir(old_run)) == ["checkpoint.pt"]

    assert T.main(["convert-checkpoint", str(old_run / "checkpoint.pt")]) == 0
    assert "format " + C.FORMAT in capsys.readouterr().out
    assert T.main(["convert-checkpoint", str(old_run / "checkpoint.pt")]) == 2  # already converted
    assert "nothing to convert" in capsys.readouterr().err

    for folder in (straight, old_run):
        assert T.main(TINY_JOB + ["--out-dir", str(folder), "--resume"]) == 0
    a, b = C.load(str(straight / "checkpoint.pt")), C.load(str(old_run / "checkpoint.pt"))
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "criterion"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert [row["loss"] for row in a["history"]] == [row["loss"] for row in b["history"]]


def test_convert_checkpoint_refuses_what_is_not_a_format_1_checkpoint(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    assert T.main(["convert-checkpoint", str(tmp_path / "other.pt"), "--output", str(tmp_path / "out.pt")]) == 2
    assert "not an npid-train checkpoint" in capsys.readouterr().err and not (tmp_path / "out.pt").exists()


# ---------------------------------------------------------------- CIFAR-10 python batches

@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batches_of_either_pickle_protocol_load(tmp_path, protocol):
    """The official batches are Python 2 pickles (protocol 2); a re-pickled copy may use any."""
    folder = make_cifar10(tmp_path, protocol=protocol)
    train, test = D.load_cifar10(str(tmp_path))
    with open(folder / "test_batch", "rb") as f:
        expected = pickle.load(f)
    assert torch.equal(test.images.reshape(2, -1), torch.from_numpy(expected["data"]))
    assert train.images.shape == (15, 3, 32, 32)


def test_a_crafted_cifar10_batch_runs_nothing(tmp_path, capsys):
    folder = make_cifar10(tmp_path)
    marker = tmp_path / "marker"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": CreatesAFile(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3 names io.open, which a CIFAR-10 batch never holds"):
        D.load_cifar10(str(tmp_path))
    assert not marker.exists()
    # through the driver: one line, nothing run
    assert T.main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "0",
                   "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names io.open" in err[0] and not marker.exists()


def test_a_truncated_cifar10_batch_is_a_clear_error(tmp_path):
    folder = make_cifar10(tmp_path)
    data = (folder / "data_batch_1").read_bytes()
    (folder / "data_batch_1").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cifar10: cannot read .*data_batch_1"):
        D.load_cifar10(str(tmp_path))

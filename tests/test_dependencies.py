"""npid-train without each optional dependency (pyproject's [train] extra; `pip install .`
installs npid-train without it): a run that needs the module stops before any work with one
line naming the pip command; a feature that can be skipped (progress bar, curves.png) is
skipped with a one-line warning and the checkpoint, log.csv and results.json are still written.
Each case runs the driver in a fresh Python whose import system cannot find the module."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every case starts a Python with torch (3-4 s each on the 2-core machine), and some train.
pytestmark = pytest.mark.slow

# Every finder on the meta path is wrapped so that it does not find the module (or its submodules):
# importing it raises ModuleNotFoundError and importlib.util.find_spec returns None, as when it is
# not installed.
PRELUDE = """
import sys
class _Without:
    def __init__(self, finder):
        self._finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return self._finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self._finder, attr)
sys.meta_path[:] = [_Without(finder) for finder in sys.meta_path]
from npid_kernels.train import main
sys.exit(main(sys.argv[1:]))
"""

# A small npz dataset (no scikit-learn or torchvision needed to read it).
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, train_x=rng.integers(0, 255, (96, 8, 8), dtype=np.uint8), train_y=rng.integers(0, 3, 96),
             test_x=rng.integers(0, 255, (24, 8, 8), dtype=np.uint8), test_y=rng.integers(0, 3, 24))
    return path


def run_hidden(hidden, argv, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = f"HIDDEN = {set(hidden)!r}\n" + PRELUDE
    return subprocess.run([sys.executable, "-c", code] + argv, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(ROOT))


SHORT = ["train", "--epochs", "1", "--eval-every", "100", "--knn-source", "bank"]


def error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, result.stderr[-2000:]  # one line, no traceback
    return lines[0]


@pytest.mark.parametrize("hidden,extra,needs,pip", [
    ("sklearn", ["--dataset", "digits"], "--dataset digits", "pip install scikit-learn"),
    ("sklearn", ["--linear-probe"], "--linear-probe", "pip install scikit-learn"),
    ("torchvision", ["--arch", "resnet18"], "--arch resnet18", "pip install torchvision"),
    ("torchvision", ["--cpu-augment"], "--cpu-augment", "pip install torchvision"),
    ("matplotlib", ["--retrieval-png", "nn.png"], "--retrieval-png", "pip install matplotlib"),
    ("tensorboard", ["--tensorboard"], "--tensorboard", "pip install tensorboard"),
], ids=["sklearn-digits", "sklearn-linear-probe", "torchvision-arch", "torchvision-cpu-augment",
        "matplotlib-retrieval", "tensorboard"])
def test_a_needed_dependency_missing_stops_before_any_work(tmp_path, hidden, extra, needs, pip):
    data = [] if "--dataset" in extra else ["--dataset", "npz", "--data-dir", str(tiny_npz(tmp_path)),
                                            "--arch", "small-cnn"]
    out = tmp_path / "run"
    result = run_hidden([hidden], SHORT + data + extra + ["--out-dir", str(out)])
    line = error_line(result)
    assert line.startswith("npid-train: error: ") and needs in line and pip in line, line
    assert not out.exists()  # stopped before the run wrote anything
    assert "epoch 1/1" not in result.stdout


@pytest.mark.parametrize("hidden,warning,skipped", [
    ("matplotlib", "matplotlib is not installed: curves.png will not be drawn (pip install matplotlib)", "curves.png"),
    ("tqdm", "tqdm is not installed: no progress bar (pip install tqdm)", None),
    ("torchvision", None, None),  # digits with the small CNN and batched augmentation needs no torchvision
])
def test_a_skippable_dependency_missing_still_writes_everything(tmp_path, hidden, warning, skipped):
    result = run_hidden([hidden], SHORT + ["--dataset", "digits", "--out-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "warning" in line]
    if warning is None:
        assert not warnings, warnings
    else:
        assert warnings == [f"npid-train: warning: {warning}"], warnings
        assert result.stdout.index(warning) < result.stdout.index("epoch 1/1")  # said before training
    for name in ("checkpoint.pt", "log.csv", "results.json"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 1
    assert (tmp_path / "curves.png").exists() == (skipped != "curves.png")


def test_eval_and_export_check_dependencies_before_loading_data(tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    result = run_hidden([], SHORT + ["--dataset", "digits", "--out-dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    line = error_line(run_hidden(["sklearn"], ["eval", "--checkpoint", str(ckpt)]))
    assert "the checkpoint's --dataset digits needs scikit-learn" in line and "pip install scikit-learn" in line, line
    line = error_line(run_hidden(["matplotlib"], ["eval", "--checkpoint", str(ckpt), "--retrieval-png",
                                                  str(tmp_path / "nn.png")]))
    assert "--retrieval-png needs matplotlib" in line, line
    assert not (tmp_path / "nn.png").exists()
    result = run_hidden(["torchvision", "matplotlib", "tqdm"], ["export", "--checkpoint", str(ckpt), "--output",
                                                                str(tmp_path / "b.pth")])
    assert result.returncode == 0, result.stderr[-3000:]  # the small CNN exports without torchvision

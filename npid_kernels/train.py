"""npid-train: learn image features with NPID (non-parametric instance discrimination, Wu et al.,
CVPR 2018) on a torchvision backbone, and evaluate them with the paper's protocols.

  npid-train train                                   # digits (bundled, no download), ~1 min on a CPU
  npid-train train --dataset cifar10 --data-dir data --download --arch resnet18 --cifar-stem
  npid-train eval --checkpoint runs/npid/checkpoint.pt --linear-probe --retrieval-png nn.png
  npid-train export --checkpoint runs/npid/checkpoint.pt --output backbone.pth

`npid-train train --help` lists every training flag. A run can be split into pieces of a few
minutes (--max-epochs-this-run N, then the same command with --resume): checkpoints are written
atomically after every epoch and hold the model, optimizer, bank, Z, sampler and RNG states, so
the pieces land exactly where one long run would. Under torchrun, one process per GPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import checkpoint as C
from .baselines import SupervisedLoss
from .data import DATASETS, DataModule
from .evaluate import knn_results, linear_probe, plot_history, retrieval_png
from .knn import knn_evaluate
from .models import SMALL_NETS, build_encoder, export_state_dict
from .nn import NEGATIVES, Z_MODES, NPIDLoss, ParametricInstanceLoss
from .ops import sample_negatives

# Defaults that depend on the dataset (flags left unset take these; the rest are the paper's).
PAPER_DEFAULTS = {"arch": "resnet18", "loss": "nce", "epochs": 200, "augment": "paper", "z_mode": "first-batch"}
PRESETS = {
    # 1,438 training images of 8x8: a small CNN, the exact softmax (cheap at this n), 60 epochs:
    # about 1 minute on a CPU. For --loss nce, Z re-estimated on every step ("batch"): with
    # lemniscate's first-batch Z NCE collapses here (docs/training.md, "NCE and Z").
    "digits": {"arch": "small-cnn", "loss": "softmax", "epochs": 60, "augment": "light", "z_mode": "batch"},
    "fashion-mnist": {"arch": "small-cnn"},
}


# Losses over all n rows each step (no K).
FULL_SCAN_LOSSES = ("softmax", "param-softmax", "supervised")
# Baselines that are not NPID: one process, their parameters learn with the encoder.
BASELINE_LOSSES = ("param-softmax", "supervised")


# ---------------------------------------------------------------- command line

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks; appends "(default: X)" where there is a default worth
    showing (not for switches, unset values or helps that state their own default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or isinstance(action, argparse.BooleanOptionalAction)):
            return text
        return (text + " " if text else "") + "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npid-train", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,export}")
    sub.required = True

    train = sub.add_parser(
        "train", help="train an encoder with NPID (resumable), then evaluate it", formatter_class=_HelpFormatter,
        description="Train an encoder with NPID; evaluate it every epoch (1-NN on the bank) and at the end\n"
                    "(weighted kNN; on request linear probe, SVM, retrieval picture). Writes OUT_DIR/checkpoint.pt\n"
                    "(after every epoch), log.csv, curves.png and results.json.")
    _add_data_args(train)
    g = train.add_argument_group("model")
    g.add_argument("--arch", default=None, help="small-cnn (3 conv layers, one pool: 8x8 digits), cnn4 (4 conv layers, "
                   "two pools: 28x28 images), cifar-resnet18 (ResNet18 with the CIFAR stem at a base width, for "
                   "32x32 images on a CPU), or any torchvision classifier by name (resnet18, resnet50, ...); its "
                   "classifier becomes the low-dim linear head, L2-normalised "
                   "(default: resnet18; small-cnn for digits and fashion-mnist)")
    g.add_argument("--width", type=int, default=None,
                   help="small-cnn, cnn4 and cifar-resnet18: channels of the first conv layers (small-cnn: 64, then "
                        "128; cnn4: 32, then 64 and 128; cifar-resnet18: 16, then 32, 64, 128, where 64 is ResNet18); "
                        "the cost of a step grows as its square (default: 64 for small-cnn, 32 for cnn4, 16 for "
                        "cifar-resnet18)")
    g.add_argument("--low-dim", type=int, default=128, help="feature dimension d (the paper's ablation: 32/64/128/256)")
    g.add_argument("--cifar-stem", action="store_true",
                   help="3x3 stride-1 first conv and no max-pool, as lemniscate's ResNet for 32x32 CIFAR")
    g = train.add_argument_group("NPID loss")
    g.add_argument("--loss", choices=("nce", "softmax-ce", "softmax", "param-softmax", "supervised"), default=None,
                   help="nce: NCE with K uniform noise rows and Z estimated on the first batch (the paper); "
                        "softmax-ce: cross-entropy over the positive and K sampled rows (InfoNCE, lemniscate's "
                        "updated model); softmax: the exact non-parametric softmax over all n rows; "
                        "param-softmax: the paper's parametric baseline, an n-way linear classifier over "
                        "instance ids trained with the encoder (no memory bank in the loss); supervised: the "
                        "labelled reference, the same encoder and head trained by cross-entropy over learned class "
                        "prototypes (cosine, temperature --nce-t) (default: nce; softmax for digits)")
    g.add_argument("--nce-k", type=int, default=4096,
                   help="K, negatives per sample for nce/softmax-ce (capped at n-1); with --negatives shared, m, "
                        "the noise rows shared by the batch (not capped)")
    g.add_argument("--negatives", choices=NEGATIVES, default="per-sample",
                   help="per-sample: K rows drawn for each sample (lemniscate); shared: one set of m rows per step "
                        "scored against the whole batch by a GEMM (m = 65536 costs about what per-sample K = 4096 "
                        "costs on a GPU)")
    g.add_argument("--exclude-positive", action="store_true",
                   help="no negative equals its sample's own row (per-sample: drawn from the other n-1 rows; "
                        "shared: such a column is replaced for that sample)")
    g.add_argument("--nce-t", type=float, default=0.07, help="temperature T (also the kNN weights' T)")
    g.add_argument("--nce-m", type=float, default=0.5,
                   help="the bank's momentum update: bank[i] <- normalise(m*bank[i] + (1-m)*x) after each step")
    g.add_argument("--proximal", type=float, default=0.0, metavar="LAMBDA",
                   help="the paper's proximal regularisation (eq. 10): each sample's loss gains "
                        "LAMBDA*||x - v||^2, v its bank row before the step's update (the paper: 10, 30, 50; "
                        "0: off, as lemniscate). Bank losses nce, softmax-ce, softmax only")
    g.add_argument("--z-mode", choices=Z_MODES, default=None,
                   help="NCE's normalisation constant Z: first-batch (lemniscate: estimated once, on the first "
                        "batch), ema (after every step Z <- a*Z + (1-a)*n*mean exp(s/T) over the step's noise "
                        "scores, a = --z-momentum) or batch (Z = n*mean exp(s/T) over the step's own noise scores, "
                        "an extra pass before the loss) (default: first-batch; batch for digits)")
    g.add_argument("--z-momentum", type=float, default=0.99, help="the ema Z mode's a, in [0, 1)")
    g.add_argument("--z-stats", action="store_true",
                   help="diagnostics (costs a B x n product per step): per step, Z against the true "
                        "n*mean exp(s/T) over the whole bank and P/c of the positives and negatives, written to "
                        "OUT_DIR/z_stats.csv; their epoch means go to log.csv")
    g.add_argument("--bank-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bank storage; bfloat16 halves the bank traffic")
    g.add_argument("--scan-precision", choices=("fp32", "tf32", "bf16"), default="fp32",
                   help="products of the scans over the whole bank: the exact softmax loss and the per-epoch kNN "
                        "monitor (tf32/bf16: tensor cores on CUDA, sums stay fp32); the final evaluation is fp32")
    g = train.add_argument_group("optimisation (SGD)")
    g.add_argument("--epochs", type=int, default=None, help="epochs in the whole run; 0 evaluates the encoder at "
                   "random initialisation (default: 200; 60 for digits)")
    g.add_argument("--batch-size", type=int, default=128, help="per process (lemniscate: 128 CIFAR, 256 ImageNet)")
    g.add_argument("--lr", type=float, default=0.03, help="initial learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4,
                   help="(lemniscate: 5e-4 in cifar.py, 1e-4 in its ImageNet main.py)")
    g.add_argument("--schedule", choices=("step", "cosine"), default="step",
                   help="step: x0.1 at 60%% and 80%% of --epochs (lemniscate: epochs 120 and 160 of 200); "
                        "cosine: cosine decay to 0, per epoch")
    g.add_argument("--lr-milestones", default=None, metavar="E1,E2,...",
                   help="explicit epochs for the step schedule's x0.1 decays (default: scaled with --epochs)")
    g.add_argument("--seed", type=int, default=0, help="weights, data order, augmentation, negatives, subset")
    g = train.add_argument_group("speed")
    g.add_argument("--device", default=None, help="cuda if available, else cpu")
    g.add_argument("--amp", action="store_true", help="bf16 autocast for the backbone (CUDA)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU convs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    g.add_argument("--cpu-augment", action="store_true",
                   help="in-memory datasets: per-sample torchvision augmentation in DataLoader workers instead "
                        "of the default batched augmentation of uint8 batches on the training device")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers (image folders, --cpu-augment)")
    g = train.add_argument_group("run control and logging")
    g.add_argument("--out-dir", default="runs/npid", help="checkpoint.pt, log.csv, curves.png, results.json go here")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/checkpoint.pt when it exists (else start afresh)")
    g.add_argument("--max-epochs-this-run", type=int, default=None, metavar="N",
                   help="stop after N more epochs (split a long run into resumable pieces)")
    g.add_argument("--max-minutes-this-run", type=float, default=None, metavar="M",
                   help="stop after the last epoch that ends within M minutes of the start (the previous epoch's "
                        "time predicts the next; the final evaluation comes on top), e.g. to fit a job time limit")
    g.add_argument("--eval-every", type=int, default=10,
                   help="weighted kNN on the bank every N epochs (the 1-NN monitor runs every epoch)")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT_DIR/tb (needs tensorboard)")
    g = train.add_argument_group("multi-process (launch with torchrun; --batch-size is per process)")
    g.add_argument("--bank-mode", choices=("replicated", "sharded"), default="replicated",
                   help="replicated: every rank holds the whole bank; sharded: each holds n/world rows")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm in the backbone")
    _add_eval_args(train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint (kNN, linear probe, SVM, retrieval picture)",
                        formatter_class=_HelpFormatter,
                        description="Evaluate the encoder and bank of a checkpoint on the dataset it was trained on\n"
                                    "(weighted kNN with the checkpoint's T; on request linear probe, SVM, retrieval picture).")
    ev.add_argument("--checkpoint", required=True, help="an npid-train checkpoint.pt")
    ev.add_argument("--device", default=None, help="cuda if available, else cpu")
    ev.add_argument("--data-dir", default=None, help="where the dataset is now (default: as stored in the checkpoint)")
    ev.add_argument("--workers", type=int, default=2, help="DataLoader workers (image folders)")
    ev.add_argument("--amp", action="store_true", help="bf16 autocast for feature extraction (CUDA)")
    ev.add_argument("--output-json", default=None, help="also write the results here")
    _add_eval_args(ev)

    ex = sub.add_parser("export", help="write the backbone (+ head) as a plain torchvision state_dict",
                        formatter_class=_HelpFormatter,
                        description="Write the encoder as the state_dict of torchvision.models.get_model(ARCH,\n"
                                    "num_classes=LOW_DIM) (after the same stem changes): the backbone's weights and\n"
                                    "the low-dim head as its classifier, for downstream fine-tuning.")
    ex.add_argument("--checkpoint", required=True, help="an npid-train checkpoint.pt")
    ex.add_argument("--output", required=True, help="where to write the state_dict (.pth)")
    ex.add_argument("--no-head", action="store_true", help="leave the low-dim head out (backbone weights only)")

    cv = sub.add_parser("convert-checkpoint", help="rewrite a format-1 checkpoint (a file you trust) as plain data",
                        formatter_class=_HelpFormatter,
                        description=f"Rewrite a checkpoint written before format {C.FORMAT} (its RNG states were\n"
                                    "pickled objects) as tensors and plain values, which train --resume, eval and\n"
                                    "export load without running anything in the file. The conversion itself\n"
                                    "unpickles the file in full, which runs whatever code it names: use it only\n"
                                    "on a checkpoint from a source you trust.")
    cv.add_argument("checkpoint", help="the format-1 checkpoint.pt")
    cv.add_argument("--output", default=None, help="where to write the converted checkpoint (default: in place)")
    return parser


def _add_data_args(p):
    g = p.add_argument_group("data (each item is (image, target, instance index); targets only for evaluation)")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits, fixed 80/20 split (no download); "
                        "fashion-mnist: DATA_DIR with the four idx(.gz) files; cifar10: DATA_DIR holding "
                        "cifar-10-batches-py; npz: DATA_DIR is a .npz with train_x, train_y, test_x, test_y; "
                        "imagefolder: DATA_DIR/train/<class>/* and DATA_DIR/val/<class>/* (ImageNet layout)")
    g.add_argument("--data-dir", default=None, help="dataset directory, or the .npz file (cifar10: default ./data)")
    g.add_argument("--download", action="store_true", help="cifar10: download into DATA_DIR through torchvision")
    g.add_argument("--train-fraction", type=float, default=1.0,
                   help="train on a fixed random fraction of the training set (picked by --seed), as the "
                        "paper's training-set-size ablation")
    g.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="evaluate on N images held out of the training set (picked by --seed; the bank holds the "
                        "rest) instead of the test set: for choosing settings without looking at the test set")
    g.add_argument("--image-size", type=int, default=None,
                   help="crop size fed to the network (default: the images' own size; 224 for image folders)")
    g.add_argument("--augment", choices=("paper", "light", "none"), default=None,
                   help="paper: RandomResizedCrop(scale 0.2-1), ColorJitter(0.4,0.4,0.4,0.4), RandomGrayscale(0.2), "
                        "horizontal flip; light: crop 0.5-1 and brightness/contrast 0.2 (for 8x8 digits); "
                        "none (default: paper; light for digits)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="horizontal flip in the paper augmentation (lemniscate's cifar.py leaves it out)")


def _add_eval_args(p):
    g = p.add_argument_group("evaluation")
    g.add_argument("--knn-k", type=int, default=200, help="neighbours of the weighted kNN (weights exp(s/T))")
    g.add_argument("--knn-source", choices=("bank", "features", "both"), default="both",
                   help="training features of the final kNN: the memory bank, features recomputed on "
                        "un-augmented training images, or both")
    g.add_argument("--linear-probe", action="store_true",
                   help="linear classifier and LinearSVC (the paper's SVM column) on frozen low-dim and pooled "
                        "backbone features")
    g.add_argument("--svm-max-train", type=int, default=None, metavar="N",
                   help="fit the SVM on at most N training images (liblinear on all of ImageNet takes hours)")
    g.add_argument("--retrieval-png", default=None, metavar="PATH",
                   help="write the top-10 neighbours in the bank of a few test images as a PNG grid")


def apply_presets(args) -> List[str]:
    """Fill the dataset-dependent defaults; returns the ones taken from the dataset's preset."""
    preset = PRESETS.get(args.dataset, {})
    used = []
    for key, paper in PAPER_DEFAULTS.items():
        if getattr(args, key) is None:
            value = preset.get(key, paper)
            setattr(args, key, value)
            if key in preset:
                used.append(f"--{key.replace('_', '-')} {value}")
    # The width is part of the checkpoint's configuration: store the default explicitly, so that a
    # resume spelling it out (--width 64) matches a run that left it unset.
    if getattr(args, "width", None) is None and args.arch in SMALL_NETS:
        args.width = SMALL_NETS[args.arch][1]
    elif getattr(args, "width", None) is not None and args.arch not in SMALL_NETS:
        raise ValueError(f"--width applies to {', '.join(SMALL_NETS)}, not --arch {args.arch}")
    return used


def _milestones(args) -> List[int]:
    if args.lr_milestones:
        try:
            return sorted(int(e) for e in str(args.lr_milestones).split(",") if e.strip())
        except ValueError:
            raise ValueError(f"--lr-milestones must be comma-separated epochs, got {args.lr_milestones!r}") from None
    return [int(round(0.6 * args.epochs)), int(round(0.8 * args.epochs))]


def learning_rate(args, epoch: int) -> float:
    """The learning rate of epoch `epoch` (0-based), a pure function of the epoch (nothing to
    checkpoint). step: lemniscate's lr * 0.1 ** ((epoch - 80) // 40) from epoch 80 of 200, i.e. x0.1
    at epochs 120 and 160, scaled to --epochs (or at --lr-milestones); cosine: 0.5 lr (1 + cos(pi e/E))."""
    if args.schedule == "cosine":
        return 0.5 * args.lr * (1 + math.cos(math.pi * epoch / max(args.epochs, 1)))
    return args.lr * 0.1 ** sum(epoch >= m for m in _milestones(args))


def _check_args(args) -> None:
    for flag in ("epochs", "batch_size", "low_dim", "width", "nce_k", "knn_k", "eval_every", "workers"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag in ("epochs", "workers") else 1):
            raise ValueError(f"--{flag.replace('_', '-')} must be {'>= 0' if flag in ('epochs', 'workers') else 'positive'}, got {value}")
    if args.max_epochs_this_run is not None and args.max_epochs_this_run < 1:
        raise ValueError(f"--max-epochs-this-run must be positive, got {args.max_epochs_this_run}")
    if getattr(args, "max_minutes_this_run", None) is not None and not args.max_minutes_this_run > 0:
        raise ValueError(f"--max-minutes-this-run must be positive, got {args.max_minutes_this_run}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.z_momentum < 1:
        raise ValueError(f"--z-momentum must be in [0, 1), got {args.z_momentum}")
    lam = getattr(args, "proximal", 0.0)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"--proximal (lambda of the proximal term) must be a finite number >= 0, got {lam}")
    if lam and getattr(args, "loss", None) in BASELINE_LOSSES:
        raise ValueError(f"--proximal applies to the memory-bank losses (nce, softmax-ce, softmax), not --loss {args.loss}")
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if getattr(args, "loss", None) in BASELINE_LOSSES and several_processes:
        raise ValueError(f"--loss {args.loss} is a single-process baseline")
    if getattr(args, "loss", None) in FULL_SCAN_LOSSES and (getattr(args, "negatives", "per-sample") != "per-sample"
                                                            or getattr(args, "exclude_positive", False)):
        raise ValueError(f"--negatives shared and --exclude-positive apply to --loss nce/softmax-ce, not {args.loss}")
    if (getattr(args, "negatives", "per-sample") == "shared" and getattr(args, "exclude_positive", False)
            and several_processes and getattr(args, "bank_mode", "replicated") == "sharded"):
        raise ValueError("--negatives shared --exclude-positive needs --bank-mode replicated under torchrun "
                         "(the replacement rows are drawn from the whole bank)")
    if getattr(args, "z_stats", False) and getattr(args, "negatives", "per-sample") == "shared":
        raise ValueError("--z-stats samples per-sample rows; it does not describe --negatives shared")
    if getattr(args, "z_stats", False) and several_processes:
        raise ValueError("--z-stats is a single-process diagnostic (it scans this process's whole bank)")


# ---------------------------------------------------------------- optional dependencies

# pip names of the driver's optional dependencies (pyproject's [train] extra); `pip install .`
# installs npid-train without them.
PIP_NAMES = {"sklearn": "scikit-learn", "torchvision": "torchvision", "matplotlib": "matplotlib",
             "tqdm": "tqdm", "tensorboard": "tensorboard"}


def _import_error(module: str) -> Optional[str]:
    """None when `module` imports, else why not (one line)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def check_dependencies(args, command: str = "train") -> List[str]:
    """Find missing optional dependencies before any work starts. Raises ValueError (one line: what
    needs what, and the pip command) for a dependency the requested run cannot do without; returns
    one-line warnings for features that are skipped instead (no progress bar without tqdm, no
    curves.png without matplotlib; the checkpoint, log.csv and results.json are written anyway)."""
    needs = {}  # module -> the first feature that needs it

    def need(module, why, when=True):
        if when:
            needs.setdefault(module, why)

    dataset, arch = getattr(args, "dataset", None), getattr(args, "arch", None)
    saved = "" if command == "train" else "the checkpoint's "  # eval/export: settings from the checkpoint
    need("sklearn.datasets", f"{saved}--dataset digits", dataset == "digits")
    need("sklearn.svm", "--linear-probe", getattr(args, "linear_probe", False))
    need("torchvision", f"{saved}--arch {arch}", arch is not None and arch not in SMALL_NETS)
    need("torchvision", f"{saved}--dataset imagefolder", dataset == "imagefolder")
    need("torchvision", "--download", dataset == "cifar10" and getattr(args, "download", False))
    need("torchvision", "--cpu-augment", getattr(args, "cpu_augment", False))
    need("matplotlib", "--retrieval-png", bool(getattr(args, "retrieval_png", None)))
    need("torch.utils.tensorboard", "--tensorboard", getattr(args, "tensorboard", False))
    missing = []
    for module, why in needs.items():
        error = _import_error(module)
        if error is not None:
            pip_name = PIP_NAMES.get(module.split(".")[0], module.split(".")[0])
            if module == "torch.utils.tensorboard":
                pip_name = "tensorboard"
            missing.append(f"{why} needs {pip_name} ({error}): pip install {pip_name}")
    if missing:
        raise ValueError("; ".join(missing))
    warnings = []
    if command == "train":
        if _import_error("tqdm") is not None:
            warnings.append("warning: tqdm is not installed: no progress bar (pip install tqdm)")
        if _import_error("matplotlib") is not None:
            warnings.append("warning: matplotlib is not installed: curves.png will not be drawn "
                            "(pip install matplotlib)")
    return warnings


def _progress(iterable, **kwargs):
    """tqdm's progress bar, or the iterable itself (with tqdm's close/disable) when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(iterable)
    return tqdm(iterable, **kwargs)


class _NoBar:
    disable = True

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def close(self):
        pass


def _resolve_device(name: Optional[str]) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but no CUDA GPU is visible")
    return device


def _config(args, data: DataModule) -> Dict:
    config = {k: getattr(args, k) for k in C.CONFIG_KEYS + C.SCHEDULE_KEYS if hasattr(args, k)}
    config["image_size"], config["augment"] = data.image_size, data.augment
    return config


# ---------------------------------------------------------------- training

def train(args) -> Dict:
    from .distributed import (DistributedNPIDLoss, cleanup_distributed, distributed_knn_evaluate, init_distributed,
                              wrap_ddp)

    _check_args(args)
    presets = apply_presets(args)
    dependency_warnings = check_dependencies(args, "train")  # before any work
    dist_info = init_distributed()  # a single process unless launched by torchrun
    world, rank, main_rank = dist_info.world_size, dist_info.rank, dist_info.is_main
    device = dist_info.device if world > 1 else _resolve_device(args.device)
    log = print if main_rank else (lambda *a, **k: None)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    data = DataModule.from_args(args, device)
    n = data.num_train
    if args.loss != "softmax" and n < 2:
        raise ValueError(f"--loss {args.loss} needs at least 2 training images, the dataset has {n}")
    if args.negatives == "per-sample":
        args.nce_k = min(args.nce_k, n - 1) if n > 1 else args.nce_k
    batch_size = min(args.batch_size, n // world)
    if batch_size < 1:
        raise ValueError(f"{n} training images cannot fill one batch on each of {world} processes")
    model = build_encoder(args.arch, args.low_dim, data.in_channels, args.cifar_stem, args.width).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bank_dtype = torch.bfloat16 if args.bank_dtype == "bfloat16" else torch.float32
    # Per-sample losses gather rows in fp32; the whole-bank scan and the shared negatives' GEMMs take --scan-precision.
    loss_precision = args.scan_precision if args.loss == "softmax" or args.negatives == "shared" else "fp32"
    if args.loss == "param-softmax":  # single process (_check_args)
        criterion = ParametricInstanceLoss(n, args.low_dim, args.nce_t, args.nce_m, device=device)
    elif args.loss == "supervised":  # single process (_check_args)
        criterion = SupervisedLoss(data.train_labels, data.num_classes, args.low_dim, args.nce_t, args.nce_m, device=device)
    elif world > 1:
        criterion = DistributedNPIDLoss(n, args.low_dim, args.nce_k, args.nce_t, args.nce_m, loss=args.loss,
                                        bank_dtype=bank_dtype, seed=args.seed, mode=args.bank_mode,
                                        device=device, equal_batches=True, precision=loss_precision,
                                        z_mode=args.z_mode, z_momentum=args.z_momentum, negatives=args.negatives,
                                        exclude_positive=args.exclude_positive, proximal=args.proximal)
    else:
        criterion = NPIDLoss(n, args.low_dim, args.nce_k, args.nce_t, args.nce_m, loss=args.loss,
                             bank_dtype=bank_dtype, seed=args.seed, device=device, precision=loss_precision,
                             z_mode=args.z_mode, z_momentum=args.z_momentum, negatives=args.negatives,
                             exclude_positive=args.exclude_positive, proximal=args.proximal)
    # The baselines' classifiers learn with the encoder (same lr, momentum, weight decay).
    optimizer = torch.optim.SGD(list(model.parameters()) + list(criterion.parameters()), lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)

    def criterion_state():  # the whole bank, world-size independent (a collective when distributed)
        return criterion.full_state_dict() if world > 1 else criterion.state_dict()

    def final_bank() -> Optional[torch.Tensor]:
        """The whole bank on the main rank (gathered from the shards: a collective), None elsewhere."""
        if world > 1 and args.bank_mode == "sharded":
            state = criterion.full_state_dict()
            return state["bank.memory"].to(device).float() if main_rank else None
        return criterion.memory.float()

    def epoch_knn(k: int) -> Dict[str, float]:
        """The per-epoch kNN monitor on the bank: one top-k search gives the weighted-kNN top-1
        (k neighbours) and the 1-NN top-1. Distributed: each process embeds its share of the test
        images and searches its bank (its shard in the sharded mode: the bank is never gathered),
        the hits are summed."""
        common = dict(k=k, temperature=args.nce_t, recall_ks=(), precision=args.scan_precision)
        if world == 1:
            test_features = data.features(model, "test", amp=args.amp, channels_last=args.channels_last)
            return knn_evaluate(test_features, test_labels, criterion.memory, train_labels, data.num_classes,
                                **common)
        test_features = data.features(model, "test", amp=args.amp, channels_last=args.channels_last,
                                      shard=(rank, world))
        offset = criterion.row_start if args.bank_mode == "sharded" else None
        return distributed_knn_evaluate(test_features, test_labels[rank::world], criterion.memory, train_labels,
                                        data.num_classes, bank_offset=offset, **common)

    for warning in dependency_warnings:
        log(f"npid-train: {warning}")
    log(f"npid-train: {data.describe()}")
    log(f"npid-train: {args.arch} -> {args.low_dim}-d ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters), loss {args.loss}" + ("" if args.loss in FULL_SCAN_LOSSES else
                                            f" K={args.nce_k}" + (" shared" if args.negatives == "shared" else "")
                                            + (" excluding positives" if args.exclude_positive else ""))
        + (f" Z {args.z_mode}" + (f" (a={args.z_momentum})" if args.z_mode == "ema" else "") if args.loss == "nce" else "")
        + f" T={args.nce_t} m={args.nce_m}" + (f" proximal lambda={args.proximal}" if args.proximal else "")
        + f", {args.epochs} epochs of {data.steps_per_epoch(batch_size, world)} steps "
        f"(batch {batch_size}" + (f" x {world} processes" if world > 1 else "") + f"), {args.schedule} lr {args.lr}, "
        f"device {device}" + (f"; {args.dataset} defaults: {' '.join(presets)}" if presets else ""), flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    config = _config(args, data)
    start_epoch, history = 0, []
    if args.resume and os.path.exists(ckpt_path):
        ckpt = C.load(ckpt_path)
        C.check_compatible(ckpt, config, n, ckpt_path)
        changed = C.changed_schedule(ckpt, config)
        if changed:
            log("npid-train: warning: resuming with changed settings (" + ", ".join(
                f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()) + "); the pieces no longer add up to one run")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if world > 1:
            criterion.load_full_state_dict(ckpt["criterion"])
        else:
            criterion.load_state_dict(ckpt["criterion"])
        C.set_rng_state(ckpt["rng"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        log(f"npid-train: resumed from {ckpt_path} after epoch {start_epoch}", flush=True)
    elif os.path.exists(ckpt_path):
        log(f"npid-train: {ckpt_path} exists; starting afresh and overwriting it (--resume continues it)")
    train_model = wrap_ddp(model, device, sync_bn=args.sync_bn) if world > 1 else model
    forward_model = torch.compile(train_model) if args.compile else train_model
    writer = None
    if args.tensorboard and main_rank:
        from torch.utils.tensorboard import SummaryWriter  # present: check_dependencies looked

        writer = SummaryWriter(os.path.join(args.out_dir, "tb"))

    steps_path = os.path.join(args.out_dir, "steps.csv")
    if main_rank:  # a fresh run starts the file; a resumed one drops steps past its checkpoint's epoch
        _truncate_steps(steps_path, start_epoch)
    end_epoch = args.epochs if args.max_epochs_this_run is None else min(args.epochs, start_epoch + args.max_epochs_this_run)
    steps_per_epoch = data.steps_per_epoch(batch_size, world)
    test_labels, train_labels = data.test_labels.to(device), data.train_labels.to(device)
    for epoch in range(start_epoch, end_epoch):
        lr = learning_rate(args, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        criterion.train()
        t0, cpu0, steps, seen = time.perf_counter(), time.process_time(), 0, 0
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        step_log = StepLog(criterion)
        stats_rows = []
        bar = _progress(data.train_batches(batch_size, epoch, args.seed, args.cpu_augment, rank, world),
                   total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", leave=False,
                   mininterval=1.0, dynamic_ncols=True, disable=None if main_rank else True)
        for inputs, index in bar:
            if args.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                features = forward_model(inputs)
            if args.z_stats and args.loss == "nce":
                stats_rows.append(z_stats(features.detach().float(), index, criterion, args.nce_k, n, epoch, steps))
            loss = criterion(features.float(), index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach()
            step_log.record(loss)
            steps += 1
            seen += inputs.shape[0]
            if not bar.disable and (steps % 10 == 0 or steps == steps_per_epoch):  # .item() syncs: not every step
                bar.set_postfix(loss=f"{total_loss.item() / steps:.4f}",
                                img_s=f"{seen * world / (time.perf_counter() - t0):.0f}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - t0
        # The process's CPU time (all its threads): less stretched than wall time by other jobs on the cores.
        cpu_seconds = time.process_time() - cpu0
        mean_loss = total_loss.item() / max(steps, 1)
        if not math.isfinite(mean_loss):
            raise ValueError(f"the loss is {mean_loss} in epoch {epoch + 1}: training diverged "
                             "(lower --lr, or try --loss softmax / softmax-ce)")
        row = {"epoch": epoch + 1, "loss": mean_loss, "lr": lr, "images_per_s": seen * world / seconds,
               "seconds": seconds, "cpu_seconds": cpu_seconds}
        full_eval = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
        scores = epoch_knn(min(args.knn_k, n) if full_eval else 1)
        row["knn1_top1"] = scores["nn1_top1"]
        if full_eval:
            row["knn_top1"] = scores["knn_top1"]
        if args.loss == "nce":
            row["z"] = float(criterion.z.item())  # Z after the epoch's last step
        if stats_rows:
            for key in Z_STAT_KEYS:
                row[f"{key}_mean"] = float(np.mean([r[key] for r in stats_rows]))
            if main_rank:
                _append_csv(stats_rows, os.path.join(args.out_dir, "z_stats.csv"), fresh=(epoch == 0))
        step_rows = step_log.rows(epoch, steps_per_epoch, lr, world)  # one host read per epoch
        for key in step_log.columns[1:]:
            row[key] = float(np.mean([r[key] for r in step_rows])) if step_rows else float("nan")
        if args.loss not in BASELINE_LOSSES:
            row["proximal"] = args.proximal
        row["eval_seconds"] = time.perf_counter() - t0 - seconds
        history.append(row)
        log(f"epoch {epoch + 1}/{args.epochs}: loss {row['loss']:.4f}  lr {lr:.4g}  {row['images_per_s']:.0f} img/s  "
            f"{seconds:.1f}s  1-NN {row['knn1_top1']:.2f}%"
            + (f"  kNN(k={min(args.knn_k, n)}) {row['knn_top1']:.2f}%" if "knn_top1" in row else ""), flush=True)
        if writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch + 1)
        crit_state = criterion_state()
        if main_rank:  # saved once; loadable at any world size (the bank is whole)
            C.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "criterion": crit_state, "rng": C.rng_state(), "epoch": epoch + 1, "history": history,
                    "config": config, "args": vars(args), "num_classes": data.num_classes,
                    "in_channels": data.in_channels}, ckpt_path)
            _write_csv(history, os.path.join(args.out_dir, "log.csv"))
            _append_csv(step_rows, steps_path, fresh=False)
        if epoch + 1 < end_epoch and _out_of_time(args, started, row, world, device):
            end_epoch = epoch + 1
            break
    if writer is not None:
        writer.close()
    if end_epoch < args.epochs:
        log(f"npid-train: stopped after epoch {end_epoch} of {args.epochs} ({time.perf_counter() - started:.0f}s); "
            "run the same command with --resume to continue", flush=True)
        cleanup_distributed()
        return {"epochs_done": end_epoch}
    bank = final_bank()
    cleanup_distributed()
    if not main_rank:
        return {}
    results = evaluate(model, bank, data, args)
    results.update({"epochs": args.epochs, "dataset": args.dataset, "arch": args.arch, "width": args.width,
                    "loss": args.loss,
                    "nce_k": None if args.loss in FULL_SCAN_LOSSES else args.nce_k, "low_dim": args.low_dim,
                    "negatives": None if args.loss in FULL_SCAN_LOSSES else args.negatives,
                    "exclude_positive": args.exclude_positive,
                    "proximal": None if args.loss in BASELINE_LOSSES else args.proximal,
                    "nce_t": args.nce_t, "z_mode": args.z_mode if args.loss == "nce" else None,
                    "z_momentum": args.z_momentum if args.loss == "nce" and args.z_mode == "ema" else None,
                    "z_final": float(criterion.z.item()) if args.loss == "nce" else None,
                    "train_images": n, "test_images": len(data.test_labels), "holdout": data.holdout,
                    "augment": data.augment, "schedule": args.schedule, "seed": args.seed,
                    "train_seconds_total": sum(row["seconds"] + row.get("eval_seconds", 0) for row in history),
                    "wall_seconds_this_command": time.perf_counter() - started})
    if history and _import_error("matplotlib") is None:  # else warned at the start
        plot_history(history, os.path.join(args.out_dir, "curves.png"))
    C.save_atomic(results, os.path.join(args.out_dir, "results.json"), lambda obj, f: json.dump(obj, f, indent=2))
    _print_summary(results, args.out_dir)
    return results


def _out_of_time(args, started: float, row: Dict, world: int, device: torch.device) -> bool:
    """--max-minutes-this-run: would one more epoch (as long as the last, evaluation included)
    end past the budget? Under torchrun the ranks agree (any rank out of time stops all)."""
    if args.max_minutes_this_run is None:
        return False
    next_epoch = row["seconds"] + row.get("eval_seconds", 0.0)
    stop = time.perf_counter() - started + next_epoch > 60.0 * args.max_minutes_this_run
    if world > 1:
        import torch.distributed as dist

        from .distributed import _comm_device

        flag = torch.tensor([int(stop)], device=_comm_device(None, device))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop


Z_STAT_KEYS = ("z", "z_true", "log10_z_true_over_z", "p0_over_c_median", "pneg_over_c_mean",
               "neg_saturated_frac", "neg_grad_weight", "pos_grad_weight", "feature_cos_mean", "bank_cos_mean")


@torch.no_grad()
def z_stats(features: torch.Tensor, index: torch.Tensor, criterion, num_negatives: int, n: int, epoch: int,
            step: int) -> Dict[str, float]:
    """--z-stats: how the NCE of this step sees the batch, against the whole bank (before the step's
    update, with the Z the step uses). z_true = n * mean_j exp(v_j . x / T) averaged over the batch
    (the Z that makes P a normalised distribution); P = exp(s)/Z, c = K/n. The negatives' values are
    expectations over uniform noise, i.e. over all n rows: pneg_over_c_mean = E[P/c] (1/K when Z is
    right), neg_saturated_frac = P(P > c), neg_grad_weight = K * E[P/(P+c)] (the summed weights of the
    negatives in the gradient; about 1 when Z is right), pos_grad_weight = median c/(P0+c).
    feature_cos_mean, bank_cos_mean: mean pairwise cosine of the batch's features and of bank rows."""
    memory = criterion.memory.float()
    T = criterion.temperature
    s = features @ memory.t() / T  # (B, n)
    e = s.double().exp()
    if getattr(criterion, "z_mode", "first-batch") == "batch":  # the Z this step will use: its own noise rows
        noise = sample_negatives(index, criterion.rng_state, n, num_negatives)[:, 1:]
        z = float(e.gather(1, noise).mean() * n)
    elif float(criterion.z.item()) > 0:
        z = float(criterion.z.item())
    else:  # the first step: lemniscate's estimate over the step's K+1 columns
        rows = sample_negatives(index, criterion.rng_state, n, num_negatives)
        z = float(e.gather(1, rows).mean() * n)
    z_true = float(e.mean() * n)
    c = num_negatives / n
    p = e / z
    p0 = p.gather(1, index.view(-1, 1)).squeeze(1)
    b = features.shape[0]
    fc = features @ features.t()
    sample = memory[torch.arange(0, memory.shape[0], max(1, memory.shape[0] // 512), device=memory.device)]
    sample = sample / sample.norm(dim=1, keepdim=True).clamp_min(1e-12)
    bc = sample @ sample.t()
    m = sample.shape[0]
    return {"epoch": epoch + 1, "step": step + 1, "z": z, "z_true": z_true,
            "log10_z_true_over_z": math.log10(z_true / z),
            "p0_over_c_median": float((p0 / c).median()), "pneg_over_c_mean": float((p / c).mean()),
            "neg_saturated_frac": float((p > c).double().mean()),
            "neg_grad_weight": float(num_negatives * (p / (p + c)).mean()),
            "pos_grad_weight": float((c / (p0 + c)).median()),
            "feature_cos_mean": float((fc.sum() - fc.diagonal().sum()) / max(b * (b - 1), 1)),
            "bank_cos_mean": float((bc.sum() - bc.diagonal().sum()) / max(m * (m - 1), 1))}


class StepLog:
    """The per-step training log (steps.csv): every step's loss and, for NCE, the Z it was scored
    with, kept as device tensors during the epoch and read to the host once at its end (a read
    per step would sync the GPU every step). Several processes: the losses are averaged over the
    ranks (one all_reduce per epoch), like the loss the ranks' gradients average."""

    PARTS = ("instance_loss", "proximal_loss", "positive_sq_dist")  # NPIDLoss.loss_parts

    def __init__(self, criterion):
        self.criterion = criterion
        self.parts = isinstance(getattr(criterion, "loss_parts", None), dict)
        z = getattr(criterion, "z", None)
        self.z = z if getattr(criterion, "loss_type", None) == "nce" else None
        self.columns = ["loss"] + (list(self.PARTS) if self.parts else [])
        self.values = []

    def record(self, loss: torch.Tensor) -> None:
        row = [loss.detach().double().reshape(())]
        if self.parts:
            row += [self.criterion.loss_parts[key].reshape(()) for key in self.PARTS]
        if self.z is not None:  # Z after the step: the one the next step is scored with
            row.append(self.z.detach().to(torch.float64, copy=True).reshape(()))
        self.values.append(torch.stack(row))

    def rows(self, epoch: int, steps_per_epoch: int, lr: float, world: int) -> List[Dict]:
        if not self.values:
            return []
        table = torch.stack(self.values)
        averaged = len(self.columns)  # the losses and their parts; Z is the same on every rank
        if world > 1:
            import torch.distributed as dist

            means = table[:, :averaged] / world
            dist.all_reduce(means)
            table[:, :averaged] = means
        out = []
        for i, values in enumerate(table.tolist()):
            row = {"step": epoch * steps_per_epoch + i + 1, "epoch": epoch + 1, "lr": lr}
            row.update(zip(self.columns, values))
            if self.z is not None:
                row["z"] = values[averaged]
            out.append(row)
        self.values = []
        return out


def _truncate_steps(path: str, epochs_done: int) -> None:
    """Keep the steps of the first `epochs_done` epochs (all of them when resuming where the file
    ends, none for a fresh run): steps written by an epoch whose checkpoint was never saved go."""
    if not os.path.exists(path):
        return
    if epochs_done == 0:
        os.remove(path)
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, kept = reader.fieldnames, [row for row in reader if int(row["epoch"]) <= epochs_done]
    _write_rows_atomic(kept, fields, path)


def _append_csv(rows, path, fresh: bool):
    """Append rows to a CSV file (write it anew when fresh). A file with other columns (written by
    another version of the driver before a resume) is rewritten once with the union of both, so
    every line keeps matching the header."""
    if not rows:
        return
    fields = list(rows[0])
    if not fresh and os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = reader.fieldnames or []
            if old_fields != fields:
                earlier = list(reader)
        if old_fields != fields:
            union = old_fields + [k for k in fields if k not in old_fields]
            _write_rows_atomic(earlier + rows, union, path)
            return
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerows(rows)
        return
    _write_rows_atomic(rows, fields, path)


def _write_rows_atomic(rows, fields, path):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_csv(history, path):
    _write_rows_atomic(history, sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k)), path)


def evaluate(model, bank: torch.Tensor, data: DataModule, args) -> Dict:
    """The final evaluation: weighted kNN (bank and/or recomputed features), and on request the
    linear probe / SVM and the retrieval picture. Each feature pass runs once."""
    amp, channels_last = getattr(args, "amp", False), getattr(args, "channels_last", False)
    temperature = getattr(args, "nce_t", 0.07)
    test_features = data.features(model, "test", amp=amp, channels_last=channels_last)
    train_features = None
    if args.knn_source != "bank" or args.linear_probe:
        train_features = data.features(model, "train", amp=amp, channels_last=channels_last)
    results = knn_results(model, bank, data, k=args.knn_k, temperature=temperature, source=args.knn_source,
                          amp=amp, channels_last=channels_last, test_features=test_features,
                          train_features=train_features)
    results["knn_k"], results["knn_t"] = min(args.knn_k, data.num_train), temperature
    if args.linear_probe:
        results.update(linear_probe(model, data, amp=amp, channels_last=channels_last,
                                    svm_max_train=args.svm_max_train, seed=getattr(args, "seed", 0),
                                    lowdim=(train_features, test_features)))
    if args.retrieval_png:
        retrieval_png(data, test_features, bank, args.retrieval_png)
        results["retrieval_png"] = args.retrieval_png
    return results


def _print_summary(results: Dict, where: Optional[str] = None) -> None:
    print(json.dumps(results, indent=2), flush=True)
    parts = [f"{name} {results[f'knn_top1_{name}']:.2f}%" for name in ("bank", "features") if f"knn_top1_{name}" in results]
    print(f"final weighted kNN top-1 (k={results['knn_k']}): " + ", ".join(parts)
          + (f"  (results in {where})" if where else ""), flush=True)


# ---------------------------------------------------------------- eval / export

def _load_for_eval(args, device: Optional[torch.device] = None, ckpt: Optional[Dict] = None):
    ckpt = C.load(args.checkpoint) if ckpt is None else ckpt
    saved = argparse.Namespace(**ckpt["args"])
    check_dependencies(argparse.Namespace(arch=saved.arch), "export")
    model = build_encoder(saved.arch, saved.low_dim, ckpt["in_channels"], saved.cifar_stem,
                          getattr(saved, "width", None))  # checkpoints from before --width: the default
    model.load_state_dict(ckpt["model"])
    return ckpt, saved, model.to(device or "cpu")


def run_eval(args) -> Dict:
    device = _resolve_device(args.device)
    ckpt = C.load(args.checkpoint)
    saved = argparse.Namespace(**ckpt["args"])
    check_dependencies(argparse.Namespace(dataset=saved.dataset, arch=saved.arch, linear_probe=args.linear_probe,
                                          retrieval_png=args.retrieval_png), "eval")
    ckpt, saved, model = _load_for_eval(args, device, ckpt)
    if args.data_dir:
        saved.data_dir = args.data_dir
    saved.workers, saved.download = args.workers, False
    data = DataModule.from_args(saved, device)
    C.check_bank_rows(ckpt, data.num_train, args.checkpoint)
    bank = ckpt["criterion"]["bank.memory"].to(device).float()
    for key in ("knn_k", "knn_source", "linear_probe", "svm_max_train", "retrieval_png", "amp"):
        setattr(saved, key, getattr(args, key))
    saved.channels_last = False
    results = evaluate(model, bank, data, saved)
    results.update({"checkpoint": args.checkpoint, "epoch": ckpt["epoch"], "dataset": saved.dataset})
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    _print_summary(results)
    return results


def run_export(args) -> None:
    ckpt, saved, model = _load_for_eval(args)
    state = export_state_dict(model)
    if args.no_head:
        head = getattr(model, "head_name", "head") + "."
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    C.save_atomic(state, args.output)
    if saved.arch in SMALL_NETS:
        how = (f"npid_kernels.models.build_encoder({saved.arch!r}, width={getattr(saved, 'width', None)}, ...)"
               ".backbone (body.*) plus the head")
    else:
        how = f"torchvision.models.get_model({saved.arch!r}, num_classes={saved.low_dim})"
        if saved.cifar_stem:
            how += f", then conv1 = Conv2d({ckpt['in_channels']}, 64, 3, 1, 1, bias=False) and maxpool = Identity()"
        elif ckpt["in_channels"] != 3:
            how += f", then conv1 with {ckpt['in_channels']} input channels"
        if args.no_head:
            how += ", load_state_dict(..., strict=False) (no head)"
    print(f"wrote {args.output} (epoch {ckpt['epoch']}): load into {how}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            train(args)
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "export":
            run_export(args)
        else:
            print(f"wrote {C.convert_legacy(args.checkpoint, args.output)} (format {C.FORMAT})")
    except (FileNotFoundError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"npid-train: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

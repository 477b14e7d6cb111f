"""npid-train: learn features with NPID (Wu et al., CVPR 2018) and evaluate them.

    npid-train train --dataset digits --epochs 30            # the default job: no download
    npid-train train --dataset cifar10 --data-dir data --arch resnet18 --cifar-stem
    npid-train eval --checkpoint runs/npid/checkpoint.pt --linear-probe --retrieval-png nn.png
    npid-train export --checkpoint runs/npid/checkpoint.pt --output resnet18_npid.pth

A run can be split into pieces (--max-epochs-this-run, then --resume): checkpoints are written
atomically after every epoch and hold the model, optimizer, bank, Z, sampler and RNG states, so
the pieces land exactly where one long run would.
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
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .knn import knn_evaluate, nearest_neighbors
from .models import build_encoder, export_state_dict
from .nn import NPIDLoss

CONFIG_KEYS = ("dataset", "arch", "low_dim", "cifar_stem", "loss", "nce_k", "nce_t", "bank_dtype", "train_fraction", "seed")


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npid-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,export}")
    sub.required = True

    train = sub.add_parser("train", help="train an encoder with NPID (resumable)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(train)
    g = train.add_argument_group("model")
    g.add_argument("--arch", default=None, help="small-cnn, resnet18, resnet50 or any torchvision classifier "
                   "(default: small-cnn for digits/fashion-mnist, resnet18 otherwise)")
    g.add_argument("--low-dim", type=int, default=128, help="feature dimension (paper: 32/64/128/256)")
    g.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 first conv, no max-pool (32x32 inputs)")
    g = train.add_argument_group("NPID loss")
    g.add_argument("--loss", choices=("nce", "softmax-ce", "softmax"), default="nce",
                   help="NCE, softmax cross-entropy over K sampled rows, or the exact softmax over all n")
    g.add_argument("--nce-k", type=int, default=4096, help="negatives per sample (capped at n - 1)")
    g.add_argument("--nce-t", type=float, default=0.07, help="temperature")
    g.add_argument("--nce-m", type=float, default=0.5, help="memory-bank momentum")
    g.add_argument("--bank-dtype", choices=("float32", "bfloat16"), default="float32")
    g = train.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=200)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.03)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--schedule", choices=("step", "cosine"), default="step",
                   help="step: lemniscate's CIFAR schedule (x0.1 at 60%% and 80%% of the epochs); cosine")
    g.add_argument("--seed", type=int, default=0)
    g = train.add_argument_group("speed")
    g.add_argument("--device", default=None, help="cuda if available, else cpu")
    g.add_argument("--amp", action="store_true", help="bf16 autocast for the backbone (GPU)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    g.add_argument("--cpu-augment", action="store_true",
                   help="per-sample torchvision augmentation in DataLoader workers instead of the batched "
                        "augmentation on uint8 tensors on the training device (in-memory datasets)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers (image folders, --cpu-augment)")
    g = train.add_argument_group("run control and logging")
    g.add_argument("--out-dir", default="runs/npid", help="checkpoint, CSV log, plots and results.json go here")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt if it exists")
    g.add_argument("--max-epochs-this-run", type=int, default=None,
                   help="stop after this many epochs (split a long run into resumable pieces)")
    g.add_argument("--eval-every", type=int, default=10, help="weighted kNN (k=200) every N epochs (k=1 every epoch)")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT_DIR/tb")
    g = train.add_argument_group("multi-process (launch with torchrun; --batch-size is per process)")
    g.add_argument("--bank-mode", choices=("replicated", "sharded"), default="replicated",
                   help="replicated: every rank holds the whole bank; sharded: each holds n/world rows")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm in the backbone")
    _add_eval_args(train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--device", default=None)
    ev.add_argument("--data-dir", default=None, help="override the dataset location stored in the checkpoint")
    _add_eval_args(ev)

    ex = sub.add_parser("export", help="write the backbone as a plain torchvision state_dict")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--output", required=True)
    return parser


def _add_data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=D.DATASETS, default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits (no download)")
    g.add_argument("--data-dir", default=None, help="fashion-mnist/cifar10/imagefolder directory, or the .npz file")
    g.add_argument("--download", action="store_true", help="cifar10: download through torchvision")
    g.add_argument("--train-fraction", type=float, default=1.0, help="train on a fixed random fraction")
    g.add_argument("--image-size", type=int, default=None, help="crop size (default: the images' size; 224 for folders)")
    g.add_argument("--augment", choices=("paper", "light", "none"), default=None,
                   help="paper: RandomResizedCrop(0.2-1), ColorJitter 0.4, grayscale 0.2, flip; "
                        "light: for 8x8 digits (default there)")


def _add_eval_args(p):
    g = p.add_argument_group("evaluation")
    g.add_argument("--knn-k", type=int, default=200)
    g.add_argument("--knn-source", choices=("bank", "features", "both"), default="both",
                   help="train features for kNN: the memory bank, recomputed features, or both")
    g.add_argument("--linear-probe", action="store_true",
                   help="linear classifier (and LinearSVC) on frozen 128-d and pooled features")
    g.add_argument("--retrieval-png", default=None, help="write a top-10 neighbour grid for a few test queries")


# ---------------------------------------------------------------- data

class Data:
    """Train/test splits plus how to turn raw images into model inputs."""

    def __init__(self, args, device: torch.device):
        name = args.dataset
        self.name = name
        self.folder = name == "imagefolder"
        if name == "digits":
            train, test = D.load_digits(seed=0)
        elif name == "fashion-mnist":
            train, test = D.load_fashion_mnist(args.data_dir)
        elif name == "cifar10":
            train, test = D.load_cifar10(args.data_dir or "data", download=getattr(args, "download", False))
        elif name == "npz":
            train, test = D.load_npz(args.data_dir)
        else:
            root = args.data_dir
            if not root or not os.path.isdir(os.path.join(root, "train")):
                raise FileNotFoundError(f"imagefolder: expected {root!r}/train and /val (ImageNet layout)")
            train = test = None
        strength = args.augment or ("light" if name == "digits" else "paper")
        if self.folder:
            size = args.image_size or 224
            mean, std = D.MEAN_STD["imagefolder"]
            self.train_set = D.InstanceImageFolder(os.path.join(root, "train"), D.paper_transform(size, mean, std, strength))
            val_root = os.path.join(root, "val") if os.path.isdir(os.path.join(root, "val")) else os.path.join(root, "train")
            eval_tf = D.eval_transform(size, mean, std, resize=int(size * 256 / 224))
            self.train_eval_set = D.InstanceImageFolder(os.path.join(root, "train"), eval_tf)
            self.test_set = D.InstanceImageFolder(val_root, eval_tf)
            self.train_labels = self.train_set.targets
            self.test_labels = self.test_set.targets
            self.num_classes = len(self.train_set.classes)
            self.in_channels = 3
        else:
            train = D.subset_fraction(train, args.train_fraction, args.seed)
            self.train, self.test = train, test
            self.train_labels, self.test_labels = train.labels, test.labels
            self.num_classes = int(max(train.labels.max(), test.labels.max())) + 1
            self.in_channels = train.images.shape[1]
            size = args.image_size or train.images.shape[-1]
            mean, std = D.MEAN_STD.get(name, ((0.5,) * self.in_channels, (0.5,) * self.in_channels))
            if len(mean) != self.in_channels:
                mean, std = (mean[0],) * self.in_channels, (std[0],) * self.in_channels
            self.batch_augment = D.BatchAugment(mean, std, strength, out_size=size)
            self.eval_augment = D.BatchAugment(mean, std, "none", out_size=size)
            self.cpu_transform = D.paper_transform(size, mean, std, strength)
        self.num_train = len(self.train_labels)
        self.device = device

    def train_batches(self, batch_size: int, epoch: int, seed: int, cpu_augment: bool, workers: int,
                      rank: int = 0, world: int = 1):
        """(inputs on device, instance indices) for one epoch, in an order fixed by (seed, epoch).
        With several processes, each global batch of world * batch_size instances of that order
        is split into consecutive per-rank slices (every rank has the same number of steps)."""
        order_gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(self.num_train, generator=order_gen)
        steps = self.steps_per_epoch(batch_size, world)
        mine = order[: steps * batch_size * world].view(steps, world, batch_size)[:, rank].reshape(-1)
        if self.folder or cpu_augment:
            dataset = self.train_set if self.folder else D.InstanceDataset(self.train, self.cpu_transform)
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(dataset, mine.tolist()), batch_size=batch_size, shuffle=False,
                drop_last=True, num_workers=workers, pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(seed * 100_003 + epoch + 31 * rank))
            for images, _, index in loader:
                yield images.to(self.device, non_blocking=True), index.to(self.device)
            return
        aug_gen = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919 + 104_729 * rank)
        images_all = self.train.images.to(self.device)
        for start in range(0, mine.numel(), batch_size):
            index = mine[start:start + batch_size].to(self.device)
            yield self.batch_augment(images_all[index], generator=aug_gen), index

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        return self.num_train // (batch_size * world)

    @torch.no_grad()
    def features(self, model, split: str, batch_size: int = 512, pooled: bool = False, amp: bool = False):
        """Features of the un-augmented train or test images, in dataset order."""
        model.eval()
        outs = []
        if self.folder:
            dataset = self.train_eval_set if split == "train" else self.test_set
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=2)
            batches = (images for images, _, _ in loader)
        else:
            images = (self.train if split == "train" else self.test).images
            batches = (self.eval_augment(images[i:i + batch_size].to(self.device)) for i in range(0, images.shape[0], batch_size))
        for x in batches:
            x = x.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp and self.device.type == "cuda"):
                out = model.pooled(x) if pooled else model(x)
            outs.append(out.float())
        return torch.cat(outs)

    def raw_images(self, split: str, index: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) images for pictures."""
        if self.folder:
            from torchvision.transforms import v2
            dataset = self.train_eval_set if split == "train" else self.test_set
            tf = v2.Compose([v2.Resize(64, antialias=True), v2.CenterCrop(64)])
            return torch.stack([tf(v2.functional.pil_to_tensor(dataset.folder.loader(dataset.folder.samples[i][0]))) for i in index.tolist()])
        return (self.train if split == "train" else self.test).images[index]


# ---------------------------------------------------------------- training

def learning_rate(args, epoch: int) -> float:
    if args.schedule == "cosine":
        return 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))
    # lemniscate cifar.py: lr * 0.1 ** ((epoch - 80) // 40) from epoch 80 of 200, i.e. x0.1 at 60% and 80%.
    return args.lr * (0.1 if epoch >= 0.6 * args.epochs else 1.0) * (0.1 if epoch >= 0.8 * args.epochs else 1.0)


def _config(args) -> Dict:
    return {k: getattr(args, k) for k in CONFIG_KEYS}


def _rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: str) -> None:
    """Write to a temporary file beside `path`, then rename: a killed run never leaves a torn file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resolve_device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def train(args) -> Dict:
    from .distributed import DistributedNPIDLoss, cleanup_distributed, init_distributed, wrap_ddp

    dist_info = init_distributed()  # single process unless launched by torchrun
    world, rank, main_rank = dist_info.world_size, dist_info.rank, dist_info.is_main
    device = dist_info.device if world > 1 else _resolve_device(args.device)
    log = print if main_rank else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    data = Data(args, device)
    if args.arch is None:
        args.arch = "small-cnn" if args.dataset in ("digits", "fashion-mnist") else "resnet18"
    n = data.num_train
    args.nce_k = min(args.nce_k, n - 1)
    batch_size = min(args.batch_size, n)
    model = build_encoder(args.arch, args.low_dim, data.in_channels, args.cifar_stem).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bank_dtype = torch.bfloat16 if args.bank_dtype == "bfloat16" else torch.float32
    if world > 1:
        criterion = DistributedNPIDLoss(n, args.low_dim, args.nce_k, args.nce_t, args.nce_m, loss=args.loss,
                                        bank_dtype=bank_dtype, seed=args.seed, mode=args.bank_mode,
                                        device=device, equal_batches=True)
    else:
        criterion = NPIDLoss(n, args.low_dim, args.nce_k, args.nce_t, args.nce_m, loss=args.loss,
                             bank_dtype=bank_dtype, seed=args.seed, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=False)

    def criterion_state():  # the whole bank, world-size independent (a collective when distributed)
        return criterion.full_state_dict() if world > 1 else criterion.state_dict()

    def whole_bank():
        if world > 1 and args.bank_mode == "sharded":
            state = criterion.full_state_dict(rank0_only=False)
            return state["bank.memory"].to(device).float()
        return criterion.memory.float()

    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    start_epoch, history = 0, []
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        mismatch = {k: (ckpt["config"].get(k), v) for k, v in _config(args).items() if ckpt["config"].get(k) != v}
        if mismatch:
            raise ValueError(f"{ckpt_path} was written by another configuration: {mismatch} (checkpoint, now)")
        if ckpt["criterion"]["bank.memory"].shape[0] != n:
            raise ValueError(f"checkpoint bank has {ckpt['criterion']['bank.memory'].shape[0]} rows but the dataset has {n} images")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if world > 1:
            criterion.load_full_state_dict(ckpt["criterion"])
        else:
            criterion.load_state_dict(ckpt["criterion"])
        _set_rng_state(ckpt["rng"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")
    train_model = wrap_ddp(model, device, sync_bn=args.sync_bn) if world > 1 else model
    forward_model = torch.compile(train_model) if args.compile else train_model
    writer = None
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ValueError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {error}")
        writer = SummaryWriter(os.path.join(args.out_dir, "tb"))

    end_epoch = args.epochs if args.max_epochs_this_run is None else min(args.epochs, start_epoch + args.max_epochs_this_run)
    from tqdm.auto import tqdm

    for epoch in range(start_epoch, end_epoch):
        lr = learning_rate(args, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        criterion.train()
        t0, total_loss, steps, seen = time.perf_counter(), 0.0, 0, 0
        bar = tqdm(data.train_batches(batch_size, epoch, args.seed, args.cpu_augment, args.workers, rank, world),
                   total=data.steps_per_epoch(batch_size, world), desc=f"epoch {epoch + 1}/{args.epochs}",
                   leave=False, mininterval=1.0, disable=None if main_rank else True)
        for inputs, index in bar:
            if args.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                features = forward_model(inputs)
            loss = criterion(features.float(), index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            steps += 1
            seen += inputs.shape[0]
            bar.set_postfix(loss=f"{total_loss / steps:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "loss": total_loss / max(steps, 1), "lr": lr,
               "images_per_s": seen * world / seconds, "seconds": seconds}
        test_features = data.features(model, "test", amp=args.amp)
        bank = whole_bank()
        row["knn1_top1"] = knn_evaluate(test_features, data.test_labels.to(device), bank, data.train_labels.to(device),
                                        data.num_classes, k=1, temperature=args.nce_t, recall_ks=())["knn_top1"]
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            row["knn_top1"] = knn_evaluate(test_features, data.test_labels.to(device), bank, data.train_labels.to(device),
                                           data.num_classes, k=min(args.knn_k, n), temperature=args.nce_t,
                                           recall_ks=())["knn_top1"]
        history.append(row)
        log(f"epoch {epoch + 1}: loss {row['loss']:.4f}  lr {lr:.4g}  {row['images_per_s']:.0f} img/s  "
              f"1-NN {row['knn1_top1']:.2f}%" + (f"  kNN(k={args.knn_k}) {row['knn_top1']:.2f}%" if "knn_top1" in row else ""),
              flush=True)
        if writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch + 1)
        crit_state = criterion_state()
        if main_rank:  # saved once; loadable at any world size (the bank is whole)
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "criterion": crit_state, "rng": _rng_state(), "epoch": epoch + 1,
                         "history": history, "config": _config(args), "args": vars(args),
                         "num_classes": data.num_classes, "in_channels": data.in_channels}, ckpt_path)
            _write_csv(history, os.path.join(args.out_dir, "log.csv"))
    if writer is not None:
        writer.close()
    if end_epoch < args.epochs:
        log(f"stopped after epoch {end_epoch} of {args.epochs}; continue with --resume", flush=True)
        cleanup_distributed()
        return {"epochs_done": end_epoch}
    bank = whole_bank()
    cleanup_distributed()
    if not main_rank:
        return {}
    results = evaluate(model, bank, data, args, device)
    results.update({"epochs": args.epochs, "dataset": args.dataset, "arch": args.arch, "loss": args.loss,
                    "nce_k": args.nce_k, "train_images": n, "wall_s_last_piece": None})
    plot_history(history, os.path.join(args.out_dir, "curves.png"))
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    key = "knn_top1_bank" if "knn_top1_bank" in results else "knn_top1_features"
    print(f"final weighted kNN top-1 (k={args.knn_k}): {results[key]:.2f}%")
    return results


def _write_csv(history, path):
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- evaluation

def evaluate(model, bank: Optional[torch.Tensor], data: Data, args, device) -> Dict:
    results = {}
    test_features = data.features(model, "test", amp=getattr(args, "amp", False))
    train_labels, test_labels = data.train_labels.to(device), data.test_labels.to(device)
    k = min(args.knn_k, data.num_train)
    sources = {"bank": bank, "features": None}
    if args.knn_source in ("features", "both") or bank is None:
        sources["features"] = data.features(model, "train", amp=getattr(args, "amp", False))
    for name, train_features in sources.items():
        if train_features is None or (args.knn_source not in (name, "both")):
            continue
        scores = knn_evaluate(test_features, test_labels, train_features, train_labels, data.num_classes,
                              k=k, temperature=getattr(args, "nce_t", 0.07), recall_ks=(1, 10))
        for key, value in scores.items():
            results[f"{key}_{name}"] = value
    if args.linear_probe:
        results.update(linear_probe(model, data, device))
    if args.retrieval_png:
        retrieval_png(data, test_features, bank if bank is not None else sources["features"], args.retrieval_png)
    return results


def linear_probe(model, data: Data, device, epochs: int = 100) -> Dict:
    """Top-1 of a linear softmax classifier and of scikit-learn's LinearSVC trained on frozen
    features (the 128-d output and the pooled backbone features)."""
    from sklearn.svm import LinearSVC

    out = {}
    for name, pooled in (("lowdim", False), ("pooled", True)):
        tr = data.features(model, "train", pooled=pooled)
        te = data.features(model, "test", pooled=pooled)
        mean, std = tr.mean(0), tr.std(0) + 1e-6
        tr, te = (tr - mean) / std, (te - mean) / std
        ytr, yte = data.train_labels.to(device), data.test_labels.to(device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        clf = torch.nn.Linear(tr.shape[1], data.num_classes).to(device)
        opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=epochs, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(clf(tr), ytr) + 1e-4 * clf.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        del gen
        with torch.no_grad():
            out[f"linear_top1_{name}"] = 100.0 * (clf(te).argmax(1) == yte).float().mean().item()
        svm = LinearSVC(C=0.1, max_iter=5000).fit(tr.cpu().numpy(), ytr.cpu().numpy())
        out[f"svm_top1_{name}"] = 100.0 * float((svm.predict(te.cpu().numpy()) == yte.cpu().numpy()).mean())
    return out


def retrieval_png(data: Data, test_features, bank, path: str, queries: int = 6, k: int = 10) -> None:
    """The paper's retrieval figure: each row a test query and its top-k neighbours in the bank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q_index = torch.linspace(0, test_features.shape[0] - 1, queries).long()
    sims, idx = nearest_neighbors(test_features[q_index.to(test_features.device)], bank, min(k, bank.shape[0]))
    q_img = data.raw_images("test", q_index)
    fig, axes = plt.subplots(queries, idx.shape[1] + 1, figsize=(1.2 * (idx.shape[1] + 1), 1.2 * queries), squeeze=False)
    for r in range(queries):
        row_images = [q_img[r]] + list(data.raw_images("train", idx[r].cpu()))
        for c, image in enumerate(row_images):
            ax = axes[r][c]
            img = image.permute(1, 2, 0).cpu().numpy()
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_title("query", fontsize=7)
            else:
                label = int(data.train_labels[idx[r, c - 1]])
                ax.set_title(f"{label} ({sims[r, c - 1].item():.2f})", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(history, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(epochs, [row["loss"] for row in history])
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.set_title("NPID loss")
    b.plot(epochs, [row["knn1_top1"] for row in history], label="1-NN")
    knn = [(row["epoch"], row["knn_top1"]) for row in history if "knn_top1" in row]
    if knn:
        b.plot(*zip(*knn), "o-", label="weighted kNN")
    b.set_xlabel("epoch"), b.set_ylabel("top-1 (%)"), b.set_title("kNN accuracy"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load_for_eval(args):
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    device = _resolve_device(getattr(args, "device", None))
    ckpt = torch.load(args.checkpoint, map_location=device, weights_only=False)
    saved = argparse.Namespace(**ckpt["args"])
    model = build_encoder(saved.arch, saved.low_dim, ckpt["in_channels"], saved.cifar_stem).to(device)
    model.load_state_dict(ckpt["model"])
    return ckpt, saved, model, device


def run_eval(args) -> Dict:
    ckpt, saved, model, device = _load_for_eval(args)
    if args.data_dir:
        saved.data_dir = args.data_dir
    data = Data(saved, device)
    bank = ckpt["criterion"]["bank.memory"].float()
    if bank.shape[0] != data.num_train:
        raise ValueError(f"checkpoint bank has {bank.shape[0]} rows but the dataset has {data.num_train} images")
    saved.knn_k, saved.knn_source = args.knn_k, args.knn_source
    saved.linear_probe, saved.retrieval_png = args.linear_probe, args.retrieval_png
    results = evaluate(model, bank, data, saved, device)
    print(json.dumps(results, indent=2))
    return results


def run_export(args) -> None:
    _, saved, model, _ = _load_for_eval(args)
    torch.save(export_state_dict(model), args.output)
    print(f"wrote {args.output}: {saved.arch} with num_classes={saved.low_dim}"
          + (" and the CIFAR stem" if saved.cifar_stem else ""))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            train(args)
        elif args.command == "eval":
            run_eval(args)
        else:
            run_export(args)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"npid-train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Datasets for the driver, all returning (image, target, instance index), and the paper's
augmentation, both per sample (torchvision transforms) and batched on uint8 tensors (on any
device, so small images never wait on a data loader).

Loaders of each on-disk format (load_digits, load_fashion_mnist, load_cifar10, load_npz,
InstanceImageFolder); DataModule puts one dataset together for training and evaluation.
In-memory datasets (digits, Fashion-MNIST, CIFAR-10, .npz) hold uint8 tensors N x C x H x W.
"""
from __future__ import annotations

import copy
import gzip
import math
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "fashion-mnist", "cifar10", "npz", "imagefolder")

# Channel statistics used for normalisation (CIFAR-10's from lemniscate; ImageNet's for folders).
MEAN_STD = {
    "digits": ((0.5,), (0.5,)),
    "fashion-mnist": ((0.286,), (0.353,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class TensorSplit:
    """uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor


class InstanceDataset(torch.utils.data.Dataset):
    """(image, target, index) from in-memory uint8 tensors; `transform` maps a uint8 (C, H, W)
    tensor to a float tensor (None: the raw uint8 image, for batched augmentation)."""

    def __init__(self, split: TensorSplit, transform: Optional[Callable] = None):
        self.images, self.targets = split.images, split.labels
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index


class InstanceImageFolder(torch.utils.data.Dataset):
    """torchvision ImageFolder returning (image, target, index); `keep` (sorted positions)
    restricts it to a subset, re-indexed 0..len(keep)-1 (the instance index is the bank row)."""

    def __init__(self, root: str, transform: Optional[Callable] = None, keep: Optional[torch.Tensor] = None):
        from torchvision.datasets import ImageFolder

        if not os.path.isdir(root):
            raise FileNotFoundError(f"imagefolder: directory {root!r} does not exist")
        self.folder = ImageFolder(root, transform=transform)
        if len(self.folder) == 0:
            raise FileNotFoundError(f"imagefolder: no images under {root!r}")
        self.classes = self.folder.classes
        self.restrict(keep)

    def restrict(self, keep: Optional[torch.Tensor]) -> "InstanceImageFolder":
        """Keep only the images at positions `keep` (None: all), re-indexed from 0."""
        if keep is not None:
            self.folder.samples = [self.folder.samples[i] for i in keep.tolist()]
            self.folder.imgs = self.folder.samples
            self.folder.targets = [target for _, target in self.folder.samples]
        self.targets = torch.tensor(self.folder.targets, dtype=torch.int64)
        return self

    def with_transform(self, transform: Optional[Callable]) -> "InstanceImageFolder":
        """The same images (no second directory scan) under another transform."""
        other = copy.copy(self)
        other.folder = copy.copy(self.folder)
        other.folder.transform = transform
        return other

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        image, target = self.folder[index]
        return image, target, index


# ---------------------------------------------------------------- loaders of each on-disk format

def _require_dir(path: Optional[str], what: str) -> str:
    if not path:
        raise FileNotFoundError(f"--data-dir is required for {what}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: data directory {path!r} does not exist")
    return path


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Tuple[TensorSplit, TensorSplit]:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), a fixed stratified-free
    random 80/20 split. Pixel values 0..16 are scaled to 0..255."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return TensorSplit(images[train], labels[train]), TensorSplit(images[test], labels[test])


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported (type 0x{dtype_code:02x})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {array.size}")
    return array.reshape(dims)


def load_fashion_mnist(root: str) -> Tuple[TensorSplit, TensorSplit]:
    """A directory holding the four original idx files (.gz or not)."""
    _require_dir(root, "fashion-mnist")

    def find(stem):
        for name in (stem + ".gz", stem):
            if os.path.exists(os.path.join(root, name)):
                return os.path.join(root, name)
        raise FileNotFoundError(f"fashion-mnist: {stem}(.gz) not found in {root}")

    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx(find(f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(find(f"{prefix}-labels-idx1-ubyte"))
        splits.append(TensorSplit(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


class _CifarBatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR python batch and nothing else: a batch is a dict of a numpy uint8 array, lists,
    bytes, str and int, so the only globals it may name are what rebuilds a numpy array (and, in a
    protocol-2 pickle written by Python 3, `_codecs.encode` for bytes). Any other name is refused
    before it is looked up, so a crafted file cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("_codecs", "encode")}

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # the official batches were pickled by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"cifar10: {self.path} names {module}.{name}, which a CIFAR-10 batch never "
                                         "holds; refusing to load it")
        return super().find_class(module, name)


def load_cifar10(root: str, download: bool = False) -> Tuple[TensorSplit, TensorSplit]:
    """torchvision's directory format: root/cifar-10-batches-py/{data_batch_1..5,test_batch}
    (python pickles). --download passes through to torchvision."""
    if download:
        from torchvision.datasets import CIFAR10

        os.makedirs(root, exist_ok=True)
        CIFAR10(root, train=True, download=True)
    folder = os.path.join(_require_dir(root, "cifar10"), "cifar-10-batches-py")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cifar10: {folder} not found (use --download, or point --data-dir at its parent)")

    def read(names):
        images, labels = [], []
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"cifar10: {path} is missing")
            try:
                with open(path, "rb") as f:
                    entry = _CifarBatchUnpickler(f, path).load()
            except (pickle.UnpicklingError, EOFError) as error:
                message = str(error) if str(error).startswith("cifar10:") else f"cifar10: cannot read {path}: {error}"
                raise ValueError(message) from None
            if not isinstance(entry, dict) or "data" not in entry:
                raise ValueError(f"cifar10: {path} is not a CIFAR-10 python batch (expected a dict with 'data')")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        return TensorSplit(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64))

    return read([f"data_batch_{i}" for i in range(1, 6)]), read(["test_batch"])


def _to_nchw_uint8(array: np.ndarray, name: str) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        if array.dtype.kind == "f" and array.size and array.max() <= 1.0:
            array = np.round(array * 255)
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3:  # N, H, W
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)  # N, H, W, C -> N, C, H, W
    if array.ndim != 4:
        raise ValueError(f"npz: {name} must be N x H x W or N x H x W x C images, got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array))


def load_npz(path: str) -> Tuple[TensorSplit, TensorSplit]:
    """A .npz with train_x, train_y, test_x, test_y (images uint8 or float in [0, 1])."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"npz: file {path!r} does not exist")
    with np.load(path) as data:
        missing = {"train_x", "train_y", "test_x", "test_y"} - set(data.files)
        if missing:
            raise KeyError(f"npz: {path} lacks arrays {sorted(missing)}")
        return (TensorSplit(_to_nchw_uint8(data["train_x"], "train_x"), torch.from_numpy(data["train_y"].astype(np.int64))),
                TensorSplit(_to_nchw_uint8(data["test_x"], "test_x"), torch.from_numpy(data["test_y"].astype(np.int64))))


def subset_indices(total: int, fraction: float, seed: int) -> Optional[torch.Tensor]:
    """Sorted positions of a fixed random fraction of `total` items (None: all of them)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--train-fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return None
    n = max(1, int(round(total * fraction)))
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def subset_fraction(split: TensorSplit, fraction: float, seed: int) -> TensorSplit:
    """The paper's training-set-size ablation: a fixed random fraction of the training set."""
    keep = subset_indices(len(split.labels), fraction, seed)
    if keep is None:
        return split
    return TensorSplit(split.images[keep], split.labels[keep])


def hold_out(split: TensorSplit, count: int, seed: int, name: str) -> Tuple[TensorSplit, TensorSplit]:
    """(the rest, `count` images) of a training split, picked at random by `seed`: the held-out
    images stand in for the test set when settings are chosen, so the test set is never looked at."""
    total = len(split.labels)
    if not 0 < count < total:
        raise ValueError(f"{name}: --holdout must be between 1 and {total - 1} (the training images), got {count}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed * 1_000_003 + 17))
    held, rest = order[:count].sort().values, order[count:].sort().values
    return TensorSplit(split.images[rest], split.labels[rest]), TensorSplit(split.images[held], split.labels[held])


# ---------------------------------------------------------------- augmentation

def paper_transform(size: int, mean, std, strength: str = "paper", hflip: bool = True):
    """Per-sample torchvision (v2) pipeline on uint8 tensors or PIL images: RandomResizedCrop
    (scale 0.2-1), ColorJitter(0.4 x 4), RandomGrayscale(0.2), horizontal flip, normalise.
    "light": crop scale 0.5-1 and brightness/contrast 0.2; "none": resize and normalise."""
    from torchvision.transforms import v2

    if strength not in ("paper", "light", "none"):
        raise ValueError(f"augmentation strength must be paper, light or none, got {strength!r}")
    steps = [v2.ToImage()]
    if strength == "none":
        steps += [v2.Resize((size, size), antialias=True)]
    else:
        steps += [v2.RandomResizedCrop(size, scale=(0.2 if strength == "paper" else 0.5, 1.0), antialias=True)]
    if strength == "paper":
        steps += [v2.ColorJitter(0.4, 0.4, 0.4, 0.4), v2.RandomGrayscale(0.2)]
    elif strength == "light":
        steps += [v2.ColorJitter(0.2, 0.2)]
    if hflip and strength == "paper":
        steps += [v2.RandomHorizontalFlip()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def eval_transform(size: int, mean, std, resize: Optional[int] = None):
    from torchvision.transforms import v2

    steps = [v2.ToImage()]
    if resize:
        steps += [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class BatchAugment:
    """The paper's augmentation on a whole uint8 batch (B, C, H, W) at once, on its device:
    random resized crop (scale 0.2-1, aspect 3/4-4/3) and horizontal flip through one
    grid_sample, colour jitter (brightness, contrast, saturation, hue as a YIQ rotation),
    random grayscale, normalisation. Deterministic given the generator.

    strength "paper" is the paper's recipe; "light" (for 8x8 digits) crops with scale 0.5-1
    and jitters brightness/contrast by 0.2, no flip; "none" only normalises (and resizes).
    hflip=False leaves the flip out of "paper" (lemniscate's cifar.py has it commented out).
    """

    def __init__(self, mean, std, strength: str = "paper", out_size: Optional[int] = None, hflip: bool = True):
        if strength not in ("paper", "light", "none"):
            raise ValueError(f"augmentation strength must be paper, light or none, got {strength!r}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.strength = strength
        self.out_size = out_size
        self.hflip = hflip

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = images.float().div_(255)
        B, C, H, W = x.shape
        size = self.out_size or H
        if self.strength == "none":
            out = x if size == H else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            return self.normalize(out)
        dev = x.device

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device="cpu").to(dev)

        paper = self.strength == "paper"
        scale_lo = 0.2 if paper else 0.5
        area = scale_lo + (1 - scale_lo) * rand(B)
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(B)
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (rand(B) * 2 - 1) * (1 - w)
        cy = (rand(B) * 2 - 1) * (1 - h)
        coin = rand(B) if paper else None  # drawn even with hflip off: the other draws stay the same
        flip = torch.where(coin < 0.5, -1.0, 1.0) if paper and self.hflip else torch.ones(B, device=dev)
        theta = torch.zeros(B, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, (B, C, size, size), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

        jitter = 0.4 if paper else 0.2
        brightness = 1 + (rand(B) * 2 - 1) * jitter
        contrast = 1 + (rand(B) * 2 - 1) * jitter
        x = x * brightness.view(B, 1, 1, 1)
        gray_mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (x - gray_mean) * contrast.view(B, 1, 1, 1) + gray_mean
        if C == 3 and paper:
            saturation = 1 + (rand(B) * 2 - 1) * jitter
            luma = _luma(x)
            x = (x - luma) * saturation.view(B, 1, 1, 1) + luma
            x = _rotate_hue(x, (rand(B) * 2 - 1) * jitter * math.pi)  # hue 0.4 of a half turn
            to_gray = (rand(B) < 0.2).view(B, 1, 1, 1)
            x = torch.where(to_gray, _luma(x).expand_as(x), x)
        return self.normalize(x.clamp_(0, 1))


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma plane of YIQ by `angle` radians per image."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
    from_yiq = torch.linalg.inv(to_yiq)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", from_yiq, yiq)


# ---------------------------------------------------------------- the driver's view of a dataset

class DataModule:
    """Train/test splits of one dataset plus how to turn its images into model inputs.

    In-memory datasets (digits, fashion-mnist, cifar10, npz) keep uint8 tensors; each training
    batch is gathered on the training device and augmented there as a batch (BatchAugment), or,
    with cpu_augment, per sample by torchvision transforms in DataLoader workers. Image folders
    always go through a DataLoader. Labels are only used for evaluation.
    """

    def __init__(self, dataset: str = "digits", data_dir: Optional[str] = None, download: bool = False,
                 train_fraction: float = 1.0, seed: int = 0, image_size: Optional[int] = None,
                 augment: Optional[str] = None, hflip: bool = True, device="cpu", workers: int = 2,
                 holdout: int = 0):
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}: choose from {', '.join(DATASETS)}")
        self.name = dataset
        self.folder = dataset == "imagefolder"
        self.device = torch.device(device)
        self.workers = workers
        self._train_on_device = None
        strength = augment or ("light" if dataset == "digits" else "paper")
        self.holdout = holdout
        if self.folder:
            if holdout:
                raise ValueError("--holdout works with the in-memory datasets (digits, fashion-mnist, cifar10, npz), "
                                 "not imagefolder")
            root = data_dir
            if not root:
                raise FileNotFoundError("--data-dir is required for imagefolder (a folder with train/ and val/)")
            if not os.path.isdir(os.path.join(root, "train")):
                raise FileNotFoundError(f"imagefolder: {os.path.join(root, 'train')!r} does not exist "
                                        "(expected the ImageNet layout: DIR/train/<class>/*, DIR/val/<class>/*)")
            val_root = os.path.join(root, "val")
            if not os.path.isdir(val_root):
                raise FileNotFoundError(f"imagefolder: {val_root!r} does not exist (kNN and linear evaluation "
                                        "use DIR/val/<class>/*)")
            size = image_size or 224
            mean, std = MEAN_STD["imagefolder"]
            eval_tf = eval_transform(size, mean, std, resize=int(round(size * 256 / 224)))
            self.train_set = InstanceImageFolder(os.path.join(root, "train"), paper_transform(size, mean, std, strength, hflip))
            self.train_set.restrict(subset_indices(len(self.train_set), train_fraction, seed))
            self.train_eval_set = self.train_set.with_transform(eval_tf)
            self.test_set = InstanceImageFolder(val_root, eval_tf)
            if self.test_set.classes != self.train_set.classes:
                raise ValueError(f"imagefolder: train/ and val/ hold different classes under {root!r}")
            self.train_labels, self.test_labels = self.train_set.targets, self.test_set.targets
            self.num_classes = len(self.train_set.classes)
            self.in_channels = 3
        else:
            if dataset == "digits":
                train, test = load_digits(seed=0)
            elif dataset == "fashion-mnist":
                train, test = load_fashion_mnist(data_dir)
            elif dataset == "cifar10":
                train, test = load_cifar10(data_dir or "data", download=download)
            else:
                train, test = load_npz(data_dir)
            if train.images.shape[1:] != test.images.shape[1:]:
                raise ValueError(f"{dataset}: train images are {tuple(train.images.shape[1:])} but test images are "
                                 f"{tuple(test.images.shape[1:])}")
            train = subset_fraction(train, train_fraction, seed)
            if holdout:
                train, test = hold_out(train, holdout, seed, dataset)
            self.train, self.test = train, test
            self.train_labels, self.test_labels = train.labels, test.labels
            self.num_classes = int(max(train.labels.max(), test.labels.max())) + 1
            self.in_channels = train.images.shape[1]
            size = image_size or train.images.shape[-1]
            mean, std = MEAN_STD.get(dataset, ((0.5,) * self.in_channels, (0.5,) * self.in_channels))
            if len(mean) != self.in_channels:
                mean, std = (mean[0],) * self.in_channels, (std[0],) * self.in_channels
            self.batch_augment = BatchAugment(mean, std, strength, out_size=size, hflip=hflip)
            self.eval_augment = BatchAugment(mean, std, "none", out_size=size)
            self._cpu_transform_args = (size, mean, std, strength, hflip)  # built on first use (torchvision)
        self.augment = strength
        self.image_size = size
        self.num_train = len(self.train_labels)

    @classmethod
    def from_args(cls, args, device) -> "DataModule":
        return cls(args.dataset, args.data_dir, getattr(args, "download", False), args.train_fraction, args.seed,
                   args.image_size, args.augment, getattr(args, "hflip", True), device, getattr(args, "workers", 2),
                   getattr(args, "holdout", 0) or 0)

    def describe(self) -> str:
        test = "held-out training" if self.holdout else "test"
        return (f"{self.name}: {self.num_train} training / {len(self.test_labels)} {test} images, "
                f"{self.num_classes} classes, {self.in_channels}x{self.image_size}x{self.image_size} inputs, "
                f"augmentation {self.augment}")

    # ------------------------------------------------------------ training batches

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        return self.num_train // (batch_size * world)

    def train_batches(self, batch_size: int, epoch: int, seed: int, cpu_augment: bool = False,
                      rank: int = 0, world: int = 1):
        """(inputs on device, instance indices) for one epoch, in an order fixed by (seed, epoch)
        (the last incomplete batch is dropped). With several processes, each global batch of
        world * batch_size instances of that order is split into consecutive per-rank slices
        (every rank has the same number of steps)."""
        order_gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(self.num_train, generator=order_gen)
        steps = self.steps_per_epoch(batch_size, world)
        mine = order[: steps * batch_size * world].view(steps, world, batch_size)[:, rank].reshape(-1)
        if self.folder or cpu_augment:
            dataset = self.train_set if self.folder else InstanceDataset(self.train, paper_transform(*self._cpu_transform_args))
            # The workers' seeds come from this generator, so the augmentation is fixed by (seed, epoch, rank).
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(dataset, mine.tolist()), batch_size=batch_size, shuffle=False,
                drop_last=True, num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(seed * 100_003 + epoch + 31 * rank))
            for images, _, index in loader:
                yield images.to(self.device, non_blocking=True), index.to(self.device)
            return
        aug_gen = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919 + 104_729 * rank)
        if self._train_on_device is None:
            self._train_on_device = self.train.images.to(self.device)
        for start in range(0, mine.numel(), batch_size):
            index = mine[start:start + batch_size].to(self.device)
            yield self.batch_augment(self._train_on_device[index], generator=aug_gen), index

    # ------------------------------------------------------------ evaluation inputs

    def eval_batches(self, split: str, batch_size: int = 512, shard: Optional[Tuple[int, int]] = None):
        """Un-augmented, normalised inputs of the train or test split, in dataset order; with
        shard = (rank, world), only the images rank, rank + world, ... (one process's share)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be train or test, got {split!r}")
        rank, world = shard if shard is not None else (0, 1)
        if self.folder:
            dataset = self.train_eval_set if split == "train" else self.test_set
            if world > 1:
                dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=self.workers,
                                                 pin_memory=self.device.type == "cuda")
            for images, _, _ in loader:
                yield images.to(self.device, non_blocking=True)
            return
        images = (self.train if split == "train" else self.test).images[rank::world]
        for i in range(0, images.shape[0], batch_size):
            yield self.eval_augment(images[i:i + batch_size].to(self.device))

    @torch.no_grad()
    def features(self, model, split: str, batch_size: int = 512, pooled: bool = False, amp: bool = False,
                 channels_last: bool = False, shard: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """float32 features of the un-augmented train or test images, in dataset order: the model's
        L2-normalised low-dim output, or (pooled=True) the backbone's pooled features. shard: as
        in eval_batches."""
        was_training = model.training
        model.eval()
        outs = []
        for x in self.eval_batches(split, batch_size, shard):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp and self.device.type == "cuda"):
                out = model.pooled(x) if pooled else model(x)
            outs.append(out.float())
        model.train(was_training)
        return torch.cat(outs)

    def raw_images(self, split: str, index: torch.Tensor, size: int = 64) -> torch.Tensor:
        """uint8 (N, C, H, W) images for pictures (image folders: resized and centre-cropped)."""
        index = torch.as_tensor(index).cpu()
        if self.folder:
            from torchvision.transforms import v2

            dataset = self.train_eval_set if split == "train" else self.test_set
            tf = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
            return torch.stack([tf(v2.functional.pil_to_tensor(dataset.folder.loader(dataset.folder.samples[i][0])))
                                for i in index.tolist()])
        return (self.train if split == "train" else self.test).images[index]

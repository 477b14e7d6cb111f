"""Datasets for the driver, all returning (image, target, instance index), and the paper's
augmentation, both per sample (torchvision transforms) and batched on uint8 tensors (on any
device, so small images never wait on a data loader).

In-memory datasets (digits, Fashion-MNIST, CIFAR-10, .npz) hold uint8 tensors N x C x H x W.
"""
from __future__ import annotations

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
    """torchvision ImageFolder returning (image, target, index)."""

    def __init__(self, root: str, transform: Optional[Callable] = None):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(root, transform=transform)
        self.targets = torch.tensor(self.folder.targets, dtype=torch.int64)
        self.classes = self.folder.classes

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
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
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


def subset_fraction(split: TensorSplit, fraction: float, seed: int) -> TensorSplit:
    """The paper's training-set-size ablation: a fixed random fraction of the training set."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--train-fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return split
    n = max(1, int(round(len(split.labels) * fraction)))
    keep = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return TensorSplit(split.images[keep], split.labels[keep])


# ---------------------------------------------------------------- augmentation

def paper_transform(size: int, mean, std, strength: str = "paper"):
    """Per-sample torchvision (v2) pipeline on uint8 tensors or PIL images: RandomResizedCrop
    (scale 0.2-1), ColorJitter(0.4 x 4), RandomGrayscale(0.2), horizontal flip, normalise."""
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)]
    if strength == "paper":
        steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.4)], p=1.0), v2.RandomGrayscale(0.2), v2.RandomHorizontalFlip()]
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
    and jitters brightness/contrast by 0.2, no flip; "none" only normalises.
    """

    def __init__(self, mean, std, strength: str = "paper", out_size: Optional[int] = None):
        if strength not in ("paper", "light", "none"):
            raise ValueError(f"augmentation strength must be paper, light or none, got {strength!r}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.strength = strength
        self.out_size = out_size

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
        flip = torch.where(rand(B) < 0.5, -1.0, 1.0) if paper else torch.ones(B, device=dev)
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

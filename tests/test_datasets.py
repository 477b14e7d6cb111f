"""Each dataset loader on tiny data it writes itself in the real on-disk format."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from npid_kernels import data as D
from npid_kernels import train as T

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 255, (10, 28, 28)), rng.integers(0, 255, (4, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(10) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1]))
    train, test = D.load_fashion_mnist(str(tmp_path))
    assert train.images.shape == (10, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], torch.from_numpy(train_x.astype(np.uint8)))
    assert test.labels.tolist() == [3, 1, 4, 1]
    dataset = D.InstanceDataset(train)
    image, target, index = dataset[7]
    assert index == 7 and target == 7 and image.shape == (1, 28, 28)


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, count in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 2)]:
        entry = {"data": rng.integers(0, 255, (count, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, count))}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    train, test = D.load_cifar10(str(tmp_path))
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    with open(folder / "data_batch_2", "rb") as f:
        second = pickle.load(f)
    assert torch.equal(train.images[3].reshape(-1), torch.from_numpy(second["data"][0]))


def test_npz_arrays(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "d.npz", train_x=rng.random((6, 5, 5)), train_y=np.arange(6), test_x=rng.integers(0, 255, (2, 5, 5, 3), dtype=np.uint8), test_y=[0, 1])
    train, test = D.load_npz(str(tmp_path / "d.npz"))
    assert train.images.shape == (6, 1, 5, 5) and train.images.dtype == torch.uint8 and int(train.images.max()) > 1
    assert test.images.shape == (2, 3, 5, 5)
    np.savez(tmp_path / "bad.npz", train_x=np.zeros((2, 3, 3)))
    with pytest.raises(KeyError, match="lacks arrays"):
        D.load_npz(str(tmp_path / "bad.npz"))


def test_imagefolder_training_runs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / "imgs" / split / cls)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / split / cls / f"{i}.png")
    dataset = D.InstanceImageFolder(str(tmp_path / "imgs" / "train"), D.paper_transform(16, (0.5,) * 3, (0.5,) * 3))
    image, target, index = dataset[4]
    assert image.shape == (3, 16, 16) and target == 1 and index == 4
    assert T.main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--arch", "small-cnn",
                   "--image-size", "16", "--epochs", "1", "--batch-size", "3", "--nce-k", "4", "--workers", "0",
                   "--knn-k", "3", "--out-dir", str(tmp_path / "run")]) == 0


def test_train_fraction_is_a_fixed_subset():
    train, _ = D.load_digits()
    a = D.subset_fraction(train, 0.1, seed=5)
    b = D.subset_fraction(train, 0.1, seed=5)
    assert len(a.labels) == round(0.1 * len(train.labels)) and torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="train-fraction"):
        D.subset_fraction(train, 0.0, seed=0)


def test_batch_augment_is_deterministic_and_normalised():
    images = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    aug = D.BatchAugment(D.MEAN_STD["cifar10"][0], D.MEAN_STD["cifar10"][1], "paper")
    a = aug(images, generator=torch.Generator().manual_seed(1))
    b = aug(images, generator=torch.Generator().manual_seed(1))
    c = aug(images, generator=torch.Generator().manual_seed(2))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    plain = D.BatchAugment((0.0,) * 3, (1.0,) * 3, "none")(images)
    assert torch.allclose(plain, images.float() / 255)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "fashion-mnist")), reason="../shared/data/fashion-mnist not present")
def test_real_fashion_mnist_from_shared_data():
    train, test = D.load_fashion_mnist(os.path.join(SHARED, "fashion-mnist"))
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10

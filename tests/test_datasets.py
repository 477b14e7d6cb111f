"""Each dataset loader on tiny data it writes itself in the real on-disk format, the driver
training on each format, the subset and augmentation helpers; the real Fashion-MNIST and digits
copies from ../shared/data when present."""
import gzip
import json
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


def make_fashion_mnist(root, n_train=10, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    train_x, test_x = rng.integers(0, 255, (n_train, 28, 28)), rng.integers(0, 255, (n_test, 28, 28))
    write_idx(root / "train-images-idx3-ubyte.gz", train_x)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(root / "t10k-images-idx3-ubyte.gz", test_x)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)
    return train_x, test_x


def make_cifar10(root, per_batch=3, n_test=2, seed=1, protocol=2):
    """torchvision's layout: root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta},
    pickled with protocol 2 as the official (Python 2) batches are."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, count in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        entry = {"batch_label": name, "data": rng.integers(0, 255, (count, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, count)], "filenames": [f"{i}.png" for i in range(count)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=protocol)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": per_batch}, f, protocol=protocol)
    return folder


def make_imagefolder(root, classes=("cat", "dog"), per_class=3, size=(20, 24), seed=3):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls in classes:
            os.makedirs(root / split / cls)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_fashion_mnist_idx_files(tmp_path):
    train_x, test_x = make_fashion_mnist(tmp_path)
    train, test = D.load_fashion_mnist(str(tmp_path))
    assert train.images.shape == (10, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], torch.from_numpy(train_x.astype(np.uint8)))
    assert torch.equal(test.images[:, 0], torch.from_numpy(test_x.astype(np.uint8)))
    assert test.labels.tolist() == [0, 1, 2, 3] and train.labels.dtype == torch.int64
    image, target, index = D.InstanceDataset(train)[7]
    assert index == 7 and target == 7 and image.shape == (1, 28, 28)
    # uncompressed idx files are read too; a missing one is named
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        D.load_fashion_mnist(str(tmp_path))


def test_idx_rejects_a_corrupt_file(tmp_path):
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">III", 2, 28, 28) + b"\0" * 10)
    with pytest.raises(ValueError, match="expected"):
        D._read_idx(str(tmp_path / "bad.gz"))


def test_cifar10_python_batches(tmp_path):
    folder = make_cifar10(tmp_path)
    train, test = D.load_cifar10(str(tmp_path))
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    with open(folder / "data_batch_2", "rb") as f:
        second = pickle.load(f)
    assert torch.equal(train.images[3].reshape(-1), torch.from_numpy(second["data"][0]))
    assert train.labels[3:6].tolist() == second["labels"]
    os.remove(folder / "test_batch")
    with pytest.raises(FileNotFoundError, match="test_batch"):
        D.load_cifar10(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        D.load_cifar10(str(tmp_path / "cifar-10-batches-py"))


def test_npz_arrays(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "d.npz", train_x=rng.random((6, 5, 5)), train_y=np.arange(6),
             test_x=rng.integers(0, 255, (2, 5, 5, 3), dtype=np.uint8), test_y=[0, 1])
    train, test = D.load_npz(str(tmp_path / "d.npz"))
    assert train.images.shape == (6, 1, 5, 5) and train.images.dtype == torch.uint8 and int(train.images.max()) > 1
    assert test.images.shape == (2, 3, 5, 5)
    np.savez(tmp_path / "bad.npz", train_x=np.zeros((2, 3, 3)))
    with pytest.raises(KeyError, match="lacks arrays"):
        D.load_npz(str(tmp_path / "bad.npz"))


def test_imagefolder_returns_instance_indices(tmp_path):
    make_imagefolder(tmp_path / "imgs")
    dataset = D.InstanceImageFolder(str(tmp_path / "imgs" / "train"), D.paper_transform(16, (0.5,) * 3, (0.5,) * 3))
    image, target, index = dataset[4]
    assert image.shape == (3, 16, 16) and target == 1 and index == 4 and dataset.classes == ["cat", "dog"]
    subset = D.InstanceImageFolder(str(tmp_path / "imgs" / "train"), keep=torch.tensor([1, 4]))
    assert len(subset) == 2 and subset.targets.tolist() == [0, 1] and subset[1][2] == 1
    plain = subset.with_transform(D.eval_transform(8, (0.5,) * 3, (0.5,) * 3, resize=8))
    assert plain[0][0].shape == (3, 8, 8) and subset.folder.transform is None


@pytest.mark.parametrize("fmt", ["fashion-mnist", "cifar10", "npz", "imagefolder"])
def test_driver_trains_and_evaluates_on_each_format(tmp_path, fmt):
    """One epoch of the real driver on each on-disk format, then eval from the checkpoint."""
    if fmt == "fashion-mnist":
        make_fashion_mnist(tmp_path, n_train=12, n_test=4)
        data_dir, extra = tmp_path, []
    elif fmt == "cifar10":
        make_cifar10(tmp_path)
        data_dir, extra = tmp_path, ["--cifar-stem", "--arch", "small-cnn"]
    elif fmt == "npz":
        rng = np.random.default_rng(4)
        np.savez(tmp_path / "d.npz", train_x=rng.integers(0, 255, (12, 10, 10, 3), dtype=np.uint8),
                 train_y=np.arange(12) % 3, test_x=rng.integers(0, 255, (4, 10, 10, 3), dtype=np.uint8),
                 test_y=np.arange(4) % 3)
        data_dir, extra = tmp_path / "d.npz", ["--arch", "small-cnn"]
    else:
        make_imagefolder(tmp_path / "imgs", per_class=4)
        data_dir, extra = tmp_path / "imgs", ["--arch", "small-cnn", "--image-size", "16", "--workers", "0"]
    out = tmp_path / "run"
    assert T.main(["train", "--dataset", fmt, "--data-dir", str(data_dir), "--epochs", "1", "--batch-size", "4",
                   "--nce-k", "3", "--knn-k", "3", "--out-dir", str(out)] + extra) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    n = {"fashion-mnist": 12, "cifar10": 15, "npz": 12, "imagefolder": 8}[fmt]
    assert ckpt["criterion"]["bank.memory"].shape == (n, 128)
    assert T.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--knn-k", "3", "--workers", "0"]) == 0


def test_holdout_evaluates_on_training_images_never_the_test_set(tmp_path, capsys):
    """--holdout N: N training images (picked by the seed) replace the test set, the bank holds the
    rest; the test images (all zero here) are never used."""
    rng = np.random.default_rng(5)
    train_x = rng.integers(1, 255, (20, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", train_x=train_x, train_y=np.arange(20) % 4,
             test_x=np.zeros((4, 8, 8, 3), dtype=np.uint8), test_y=np.arange(4) % 4)
    data = D.DataModule("npz", str(tmp_path / "d.npz"), holdout=5, seed=3)
    assert data.num_train == 15 and data.test.images.shape[0] == 5 and "5 held-out training images" in data.describe()
    seen = sorted(map(bytes, torch.cat([data.train.images, data.test.images]).numpy()))
    assert seen == sorted(map(bytes, train_x.transpose(0, 3, 1, 2).copy()))  # a partition of the training set
    assert data.test.images.flatten(1).any(dim=1).all()  # no test image
    again, other = (D.DataModule("npz", str(tmp_path / "d.npz"), holdout=5, seed=s) for s in (3, 4))
    assert torch.equal(again.test.images, data.test.images) and not torch.equal(other.test.images, data.test.images)
    with pytest.raises(ValueError, match="--holdout must be between 1 and 19"):
        D.DataModule("npz", str(tmp_path / "d.npz"), holdout=20)
    out = tmp_path / "run"
    assert T.main(["train", "--dataset", "npz", "--data-dir", str(tmp_path / "d.npz"), "--holdout", "5", "--epochs", "1",
                   "--arch", "small-cnn", "--batch-size", "4", "--nce-k", "3", "--knn-k", "3", "--out-dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["test_images"] == 5 and res["train_images"] == 15 and res["holdout"] == 5
    assert torch.load(out / "checkpoint.pt", weights_only=True)["criterion"]["bank.memory"].shape[0] == 15
    make_imagefolder(tmp_path / "imgs")
    assert T.main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--holdout", "2",
                   "--out-dir", str(tmp_path / "r2")]) == 2
    assert "--holdout works with the in-memory datasets" in capsys.readouterr().err


def test_imagefolder_train_fraction(tmp_path):
    make_imagefolder(tmp_path / "imgs", per_class=5)
    data = D.DataModule("imagefolder", str(tmp_path / "imgs"), train_fraction=0.5, seed=3, image_size=8, workers=0)
    again = D.DataModule("imagefolder", str(tmp_path / "imgs"), train_fraction=0.5, seed=3, image_size=8, workers=0)
    assert data.num_train == 5 and len(data.test_labels) == 10
    assert [s for s, _ in data.train_set.folder.samples] == [s for s, _ in again.train_set.folder.samples]
    assert [s for s, _ in data.train_eval_set.folder.samples] == [s for s, _ in data.train_set.folder.samples]
    indices = torch.cat([index for _, index in data.train_batches(2, epoch=0, seed=0)])
    assert sorted(indices.tolist()) == sorted(set(indices.tolist())) and max(indices.tolist()) < 5


def test_missing_imagefolder_val_is_a_clear_error(tmp_path):
    make_imagefolder(tmp_path / "imgs")
    import shutil

    shutil.rmtree(tmp_path / "imgs" / "val")
    with pytest.raises(FileNotFoundError, match="val"):
        D.DataModule("imagefolder", str(tmp_path / "imgs"))


def test_digits_split_and_train_fraction_are_fixed():
    train, test = D.load_digits()
    assert len(train.labels) == 1438 and len(test.labels) == 359 and train.images.shape[1:] == (1, 8, 8)
    assert int(train.images.max()) == 255 and torch.equal(D.load_digits()[1].images, test.images)
    a = D.subset_fraction(train, 0.1, seed=5)
    b = D.subset_fraction(train, 0.1, seed=5)
    c = D.subset_fraction(train, 0.1, seed=6)
    assert len(a.labels) == round(0.1 * len(train.labels)) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    with pytest.raises(ValueError, match="train-fraction"):
        D.subset_fraction(train, 0.0, seed=0)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    data = D.DataModule("digits", augment="none")
    def order(epoch, seed=0):
        return torch.cat([index for _, index in data.train_batches(100, epoch, seed)])
    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))
    assert not torch.equal(order(3), order(3, seed=1))
    assert len(order(0)) == 1400 and len(set(order(0).tolist())) == 1400  # drop_last, no repeats


def test_batch_augment_is_deterministic_and_normalised():
    images = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    aug = D.BatchAugment(D.MEAN_STD["cifar10"][0], D.MEAN_STD["cifar10"][1], "paper")
    a = aug(images, generator=torch.Generator().manual_seed(1))
    b = aug(images, generator=torch.Generator().manual_seed(1))
    c = aug(images, generator=torch.Generator().manual_seed(2))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    plain = D.BatchAugment((0.0,) * 3, (1.0,) * 3, "none")(images)
    assert torch.allclose(plain, images.float() / 255)
    up = D.BatchAugment((0.0,) * 3, (1.0,) * 3, "paper", out_size=40)(images, generator=torch.Generator().manual_seed(1))
    assert up.shape == (8, 3, 40, 40) and float(up.min()) >= 0 and float(up.max()) <= 1


def test_batch_augment_crops_and_flips_like_the_recipe():
    """A left-right ramp: with the flip, about half the images come out reversed; without it none."""
    ramp = torch.arange(32, dtype=torch.float32).mul(8).clamp(max=255).to(torch.uint8).expand(200, 3, 32, 32)
    for hflip, expect in ((True, (0.3, 0.7)), (False, (0.0, 0.0))):
        aug = D.BatchAugment((0.0,) * 3, (1.0,) * 3, "paper", hflip=hflip)
        out = aug(ramp.contiguous(), generator=torch.Generator().manual_seed(0))
        luma = out.mean(dim=(1, 2))  # (B, W)
        reversed_share = float((luma[:, 0] > luma[:, -1]).float().mean())
        assert expect[0] <= reversed_share <= expect[1], (hflip, reversed_share)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "fashion-mnist")),
                    reason="../shared/data/fashion-mnist not present (offline copy for tests only)")
def test_real_fashion_mnist_from_shared_data():
    train, test = D.load_fashion_mnist(os.path.join(SHARED, "fashion-mnist"))
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "digits", "digits.csv.gz")),
                    reason="../shared/data/digits not present (offline copy for tests only)")
def test_bundled_digits_match_the_shared_copy():
    raw = np.loadtxt(os.path.join(SHARED, "digits", "digits.csv.gz"), delimiter=",")
    train, test = D.load_digits()
    assert len(raw) == len(train.labels) + len(test.labels) == 1797
    assert sorted(np.bincount(raw[:, -1].astype(int)).tolist()) == sorted(
        torch.bincount(torch.cat([train.labels, test.labels])).tolist())

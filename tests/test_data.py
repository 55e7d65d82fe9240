"""Datasets as tensors (fastvae.data): real Fashion-MNIST (Debian's dataset-fashion-mnist), digits, files."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from fastvae import data
from fastvae.data import DatasetNotFoundError, as_images, load_dataset, read_idx, resolve_dataset


def _write_idx(path, array: np.ndarray, *, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    (gzip.open if compress else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_is_the_real_data(tmp_path):
    """Needs Fashion-MNIST on the machine (CI: apt-get install dataset-fashion-mnist)."""
    assert data.fashion_mnist_available(tmp_path), "install dataset-fashion-mnist (see .ci/run)"
    x, y = load_dataset("fashion-mnist", root=tmp_path, download=False)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))  # 6000 images of each class
    x_test, y_test = load_dataset("fashion-mnist", root=tmp_path, split="test", download=False)
    assert x_test.shape == (10000, 1, 28, 28) and torch.equal(torch.bincount(y_test), torch.full((10,), 1000))
    assert resolve_dataset("auto", tmp_path) == "fashion-mnist"


@pytest.mark.parametrize("compress", [False, True])
def test_torchvision_folder_layout_comes_first(tmp_path, compress):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    suffix = ".gz" if compress else ""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", np.array([1, 2, 3]), compress=compress)
    assert np.array_equal(read_idx(raw / f"train-images-idx3-ubyte{suffix}"), images)
    x, y = load_dataset("fashion-mnist", root=tmp_path, download=False)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [1, 2, 3]
    torch.testing.assert_close(x[:, 0] * 255, torch.as_tensor(images, dtype=torch.float32))


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", root=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and str(tmp_path / "nowhere") in message
    assert "apt-get install dataset-fashion-mnist" in message and "torchvision" in message
    assert resolve_dataset("auto", tmp_path) == "digits"
    with pytest.raises(DatasetNotFoundError, match="MNIST"):
        load_dataset("mnist", root=tmp_path, download=False)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_cifar10_pickles_read_without_torchvision(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        pickle.dump(batch, open(folder / name, "wb"))
    x, y = load_dataset("cifar10", root=tmp_path, download=False)
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    raw = pickle.load(open(folder / "data_batch_1", "rb"))["data"][0].reshape(3, 32, 32)
    torch.testing.assert_close(x[0] * 255, torch.as_tensor(raw, dtype=torch.float32))
    assert load_dataset("cifar10", root=tmp_path, split="test", download=False)[0].shape == (4, 3, 32, 32)


def test_digits_always_available():
    x, y = load_dataset("digits")
    x_test, _ = load_dataset("digits", split="test")
    assert x.shape == (1500, 1, 8, 8) and x_test.shape == (297, 1, 8, 8)
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0 and set(y.tolist()) == set(range(10))


def test_npy_and_npz_files(tmp_path):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", hwc)
    x, y = load_dataset(str(tmp_path / "a.npy"))
    assert x.shape == (5, 3, 32, 32) and y.tolist() == [-1] * 5
    torch.testing.assert_close(x[2, 1] * 255, torch.as_tensor(hwc[2, :, :, 1], dtype=torch.float32))
    np.savez(tmp_path / "b.npz", x=rng.random((6, 8, 8)), y=np.arange(6), x_test=rng.random((2, 8, 8)))
    assert load_dataset(str(tmp_path / "b.npz"))[1].tolist() == list(range(6))
    assert load_dataset(str(tmp_path / "b.npz"), split="test")[0].shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="no test split"):
        load_dataset(str(tmp_path / "a.npy"), split="test")
    np.save(tmp_path / "c.npy", rng.random((3, 8, 8)) * 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_dataset(str(tmp_path / "c.npy"))
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npz"))


def test_as_images_and_bad_arguments():
    assert as_images(torch.zeros(2, 5, 5, dtype=torch.uint8)).shape == (2, 1, 5, 5)
    with pytest.raises(TypeError, match="uint8 or floating"):
        as_images(torch.zeros(2, 5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        as_images(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="validation")
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("imagenet")
    with pytest.raises(TypeError, match="name"):
        load_dataset(3)

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


# ------------------------------------------------------------------------- torchvision: used where it imports
def _fake_torchvision(root, init: str, utils: str = "") -> None:
    package = root / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(init)
    (package / "utils.py").write_text(utils)
    info = root / "torchvision-0.99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\n")


@pytest.fixture
def torchvision_status(monkeypatch):
    import sys

    from fastvae.train import grid

    def torchvision_modules():
        return [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]

    for name in torchvision_modules():
        monkeypatch.delitem(sys.modules, name)
    grid.torchvision_status.cache_clear()
    yield grid.torchvision_status
    for name in torchvision_modules():  # the fakes imported here must not reach later tests (torchmetrics imports it)
        del sys.modules[name]
    grid.torchvision_status.cache_clear()


def test_torchvision_not_installed_is_said_so(torchvision_status, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails, and no such package is found
    module, message = torchvision_status()
    assert module is None and message == "torchvision is not installed"
    assert data._torchvision_download("mnist", tmp_path, True) == "torchvision is not installed"


def test_torchvision_installed_but_broken_says_why(torchvision_status, monkeypatch, tmp_path):
    _fake_torchvision(tmp_path, 'raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    module, message = torchvision_status()
    assert module is None and "not installed" not in message and "\n" not in message
    assert "torchvision 0.99.0 is installed but does not import" in message
    assert "RuntimeError: operator torchvision::nms does not exist" in message and torch.__version__ in message
    with pytest.raises(DatasetNotFoundError, match="installed but does not import"):
        load_dataset("cifar10", root=tmp_path / "empty", download=True)


def test_image_grid_uses_make_grid_where_torchvision_imports(torchvision_status, monkeypatch, tmp_path):
    from PIL import Image

    from fastvae.train.grid import image_grid

    images = torch.rand(5, 1, 8, 8)
    fallback = np.asarray(Image.open(image_grid(images, tmp_path / "pil.png", nrow=3)))
    torchvision_status.cache_clear()  # the status is read once per process; here torchvision arrives
    (tmp_path / "tv").mkdir()
    _fake_torchvision(tmp_path / "tv", "__version__ = '0.99.0'\nfrom . import utils\n", (
        "import torch\n"
        "def make_grid(x, nrow=8, padding=2, pad_value=0.0):\n"
        "    n, c, h, w = x.shape\n"
        "    rows = -(-n // nrow)\n"
        "    grid = torch.full((3, padding + rows * (h + padding), padding + nrow * (w + padding)), pad_value)\n"
        "    for i in range(n):\n"
        "        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)\n"
        "        grid[:, top:top + h, left:left + w] = x[i].expand(3, h, w)\n"
        "    CALLS.append((n, nrow, padding, pad_value))\n"
        "    return grid\n"
        "CALLS = []\n"))
    monkeypatch.syspath_prepend(str(tmp_path / "tv"))
    module, message = torchvision_status()
    assert module is not None and message == "torchvision 0.99.0"
    calls = module.utils.CALLS
    drawn = np.asarray(Image.open(image_grid(images, tmp_path / "tv.png", nrow=3)))
    assert calls == [(5, 3, 2, 1.0)]
    assert np.array_equal(drawn, fallback)  # one channel stays one channel, the same pixels


# ------------------------------------------------------------------------- streamed data
def test_image_folder_streams_uint8_images(tmp_path):
    from PIL import Image

    from fastvae.data import BatchStream, ImageFolder

    pixels = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / ("sub" if i % 2 else ".") / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = ImageFolder(tmp_path)
    assert len(folder) == 5 and folder[0].dtype == torch.uint8 and folder[0].shape == (3, 6, 7)
    by_name = {p.name: folder[i] for i, p in enumerate(folder.files)}
    for i in range(5):
        assert torch.equal(by_name[f"{i}.png"], torch.from_numpy(pixels[i]).permute(2, 0, 1))
    stream = BatchStream(folder, batch_size=2, order=lambda n, epoch: torch.arange(n).flip(0))
    assert stream.batches_per_epoch == 3
    batches = list(stream.epoch(0))
    assert [b.shape[0] for b in batches] == [2, 2, 1] and torch.equal(batches[0][0], folder[4])
    assert [b.shape[0] for b in stream.epoch(0, start=1)] == [2, 1]
    images, _ = load_dataset(f"folder:{tmp_path}")
    assert images.shape == (5, 3, 6, 7) and images.dtype == torch.float32
    Image.fromarray(pixels[0][:3]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="small.png: 7x3 pixels"):
        [ImageFolder(tmp_path)[i] for i in range(6)]
    (tmp_path / "sub" / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="holds no images"):
        ImageFolder(tmp_path / "sub" / "empty")


def test_a_gzipped_idx_file_is_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """The first read writes the decoded bytes to the cache; later reads take them from there without gunzip;
    a changed file, or a damaged copy in the cache, is decoded afresh; an unwritable cache is skipped."""
    import os

    monkeypatch.setenv("FASTVAE_CACHE_DIR", str(tmp_path / "cache"))
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    source = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(source, images, compress=True)
    assert np.array_equal(read_idx(source), images)
    cached = data.decoded_idx(source)
    assert cached.is_file() and cached.parent == tmp_path / "cache" / "datasets"
    opened, gunzip = [], gzip.open
    monkeypatch.setattr(data.gzip, "open", lambda *a, **k: (a[1:] == ("rb",) and opened.append(a)) or gunzip(*a, **k))
    assert np.array_equal(read_idx(source), images) and opened == []  # from the cache
    cached.write_bytes(cached.read_bytes()[:100])  # damaged copy
    assert np.array_equal(read_idx(source), images) and len(opened) == 1
    assert cached.stat().st_size == 16 + images.size  # written whole again
    changed = (images + 1) % 256
    _write_idx(source, changed, compress=True)
    os.utime(source, ns=(1, 1))
    assert np.array_equal(read_idx(source), changed) and len(opened) == 2
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("FASTVAE_CACHE_DIR", str(blocked))
    assert np.array_equal(read_idx(source), changed) and len(opened) == 3

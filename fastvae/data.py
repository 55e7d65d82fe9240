"""Datasets as tensors on the target device: ``load_dataset(name, root=None, split="train", device="cpu")``.

Every dataset comes back whole as ``(images, labels)``: ``images`` float32 ``(N, C, H, W)`` scaled to
``[0, 1]``, ``labels`` int64 ``(N,)`` (``-1`` where a file has none). The training loop shuffles it with a
seeded permutation per epoch and slices batches with ``index_select``: no per-sample Python work.

Names (``DATASETS``) and where they are looked for, in order:

- ``fashion-mnist``, ``mnist``: IDX files (gzipped or not) in torchvision's folder layout
  ``ROOT/FashionMNIST/raw/`` or ``ROOT/MNIST/raw/``, then ``ROOT`` itself, then (Fashion-MNIST) Debian's
  ``/usr/share/datasets/fashion-mnist/`` (``apt-get install dataset-fashion-mnist``); then torchvision's
  download into ``ROOT`` when ``download`` is true and torchvision imports.
- ``cifar10``: the python pickles ``ROOT/cifar-10-batches-py/`` (torchvision's layout, read without
  torchvision), else torchvision's download.
- ``celeba``: ``ROOT/celeba/img_align_celeba/*.jpg`` and ``list_eval_partition.txt`` (torchvision's layout),
  centre-cropped to 140x140 and resized to 64x64 (Dai & Wipf's preprocessing), cached once as
  ``ROOT/celeba/celeba64-SPLIT.npy``; else torchvision's download.
- ``digits``: scikit-learn's 8x8 digits, always available offline (first 1500 images train, last 297 test).
- a path to a ``.npy`` or ``.npz`` file of images: ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``, uint8
  (divided by 255) or float in ``[0, 1]``. An ``.npz`` holds the images under ``images``/``x``/``x_train``
  (and optionally ``x_test``/``images_test`` for the test split, ``labels``/``y``/``y_train``/``y_test``).

- ``folder:PATH``: the images of a folder (``ImageFolder``), read from disk as they are needed (streamed).

``ROOT`` is ``root``, else ``$FASTVAE_DATA``, else ``./data``. A dataset found nowhere raises
``DatasetNotFoundError`` listing the places looked in and how to get it. ``load_dataset(..., keep_uint8=True)``
keeps uint8 images as uint8 (a quarter of the memory); ``to_float`` converts each batch, bit-identically to the
float path.

Data that does not fit in memory, or needs augmentation, reaches ``fit`` as a ``torch.utils.data.Dataset``, a
``DataLoader`` or any re-iterable of batches with a ``len()``: ``BatchStream`` is fit's view of them.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .cache import cache_dir

__all__ = ["DATASETS", "DatasetNotFoundError", "load_dataset", "as_images", "to_float", "default_root",
           "resolve_dataset", "fashion_mnist_available", "ImageFolder", "BatchStream", "batch_samples", "FOLDER_PREFIX"]

DATASETS = ("fashion-mnist", "mnist", "cifar10", "celeba", "digits")
SPLITS = ("train", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_TORCHVISION_FOLDER = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset was found in none of the places searched; the message lists them and how to get it."""


def default_root() -> Path:
    """``$FASTVAE_DATA`` when set, else ``./data``."""
    return Path(os.environ.get("FASTVAE_DATA") or "data")


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------
def as_images(array, *, name: str = "images", keep_uint8: bool = False) -> Tensor:
    """``(N, C, H, W)`` float32 in ``[0, 1]`` from a numpy array or tensor of images.

    Accepted: ``(N, H, W)`` (one channel), ``(N, H, W, C)`` with ``C`` in (1, 3, 4) (channels last), or
    ``(N, C, H, W)``; uint8 values are divided by 255 (kept as uint8 ``(N, C, H, W)`` when ``keep_uint8``:
    ``to_float`` then converts each batch), float values must already lie in ``[0, 1]``.
    """
    x = torch.as_tensor(array) if not isinstance(array, Tensor) else array
    if x.dtype == torch.bool or x.dtype.is_complex or not (x.dtype == torch.uint8 or x.dtype.is_floating_point):
        raise TypeError(f"{name} must hold uint8 or floating values, got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"{name} must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if x.dtype == torch.uint8:
        return x.contiguous() if keep_uint8 else to_float(x.contiguous())
    x = x.float().contiguous()
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"{name}: NaN or infinite values in {bad.numel()} sample(s), the first at index {int(bad[0])}")
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"{name}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return x


def to_float(images: Tensor) -> Tensor:
    """Images as float32 in ``[0, 1]``: uint8 divided by 255 (the one conversion every path uses, so a uint8
    batch converted on the device has the bits of the float dataset's batch); floating images as they are."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def _labels(array, n: int) -> Tensor:
    if array is None:
        return torch.full((n,), -1, dtype=torch.int64)
    labels = torch.as_tensor(np.asarray(array)).reshape(-1).to(torch.int64)
    if labels.numel() != n:
        raise ValueError(f"labels: expected {n} labels, got {labels.numel()}")
    return labels


# --------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (``.gz`` or raw) as a uint8 array: ``(N, H, W)`` images or ``(N,)`` labels. A ``.gz`` file is
    decoded once: its bytes are kept under ``cache_dir() / "datasets"`` (``decoded_idx``) and read from there."""
    path = Path(path)
    if path.suffix == ".gz":
        cached = decoded_idx(path)
        try:
            return _parse_idx(bytearray(cached.read_bytes()), path)
        except (OSError, ValueError):  # not cached yet, or a damaged copy: decode the file itself
            pass
        with gzip.open(path, "rb") as handle:
            data = bytearray(handle.read())
        array = _parse_idx(data, path)
        _keep(cached, data)
        return array
    return _parse_idx(bytearray(path.read_bytes()), path)  # writable, so torch.from_numpy needs no copy


def decoded_idx(path: Path) -> Path:
    """Where the decoded bytes of the gzipped IDX file ``path`` are cached: named by the file's name, size and
    modification time, so that a changed file is decoded afresh."""
    stat = path.stat()
    return cache_dir() / "datasets" / f"{path.name[:-len('.gz')]}-{stat.st_size}-{stat.st_mtime_ns}"


def _keep(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` whole or not at all (a temporary file, then a rename); a cache that cannot be
    written is skipped."""
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        os.replace(partial, target)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()


def _parse_idx(data: bytearray, path: Path) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {array.size} bytes")
    return array.reshape(shape)


def _idx_dirs(name: str, root: Path) -> list[Path]:
    dirs = [root / _TORCHVISION_FOLDER[name] / "raw", root / name, root]
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    return dirs


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx(name: str, root: Path, split: str, download: bool):
    images_stem, labels_stem = _IDX_FILES[split]
    dirs = _idx_dirs(name, root)
    for directory in dirs:
        images, labels = _find_idx(directory, images_stem), _find_idx(directory, labels_stem)
        if images is not None and labels is not None:
            return read_idx(images), read_idx(labels)
    error = _torchvision_download(name, root, download)
    if error is None:
        return _load_idx(name, root, split, download=False)
    how = [f"put {images_stem}[.gz] and {labels_stem}[.gz] in {dirs[0]}"]
    if name == "fashion-mnist":
        how.insert(0, "on Debian or Ubuntu: apt-get install dataset-fashion-mnist")
    how.append(f"or pip install torchvision and run online (the download goes to {root}); {error}")
    raise DatasetNotFoundError(_not_found(name, [str(d) for d in dirs], how))


def fashion_mnist_folder(root: str | Path | None = None) -> Path | None:
    """The folder that holds Fashion-MNIST's IDX files on this machine (no download), or None."""
    root = Path(root) if root is not None else default_root()
    for directory in _idx_dirs("fashion-mnist", root):
        if _find_idx(directory, _IDX_FILES["train"][0]) and _find_idx(directory, _IDX_FILES["test"][0]):
            return directory.resolve()
    return None


def fashion_mnist_available(root: str | Path | None = None) -> bool:
    """Whether Fashion-MNIST's IDX files are on this machine (no download)."""
    return fashion_mnist_folder(root) is not None


# --------------------------------------------------------------------------------------------------
# CIFAR-10, CelebA
# --------------------------------------------------------------------------------------------------
class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's python batches and nothing else: dicts, lists, bytes, str, numbers and numpy arrays.
    Any other global a file names (``os.system``, a class with a ``__reduce__``) is refused, so a crafted file in
    the data folder cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 3, 32, 32) uint8, labels (N,))`` of one CIFAR-10 python batch, read with a restricted
    unpickler; a file that is not such a batch raises ValueError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="latin1").load()
        data, labels = batch["data"], batch["labels"]
        images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({error})") from None
    return images, np.asarray(labels)


def _load_cifar10(root: Path, split: str, download: bool):
    folder = root / "cifar-10-batches-py"
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((folder / f).is_file() for f in files):
        error = _torchvision_download("cifar10", root, download)
        if error is not None:
            raise DatasetNotFoundError(_not_found("cifar10", [str(folder)], [
                f"pip install torchvision and run online (the download goes to {root})",
                f"or unpack cifar-10-python.tar.gz into {root}", error]))
    batches = [read_cifar_batch(folder / f) for f in files]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


_CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}


def _load_celeba(root: Path, split: str, download: bool):
    folder = root / "celeba"
    cache = folder / f"celeba64-{split}.npy"
    if cache.is_file():
        return np.load(cache), None
    partition, images_dir = folder / "list_eval_partition.txt", folder / "img_align_celeba"
    if not (partition.is_file() and images_dir.is_dir()):
        error = _torchvision_download("celeba", root, download)
        if error is not None:
            raise DatasetNotFoundError(_not_found("celeba", [str(folder)], [
                f"pip install torchvision and run online (the download goes to {root}; Google Drive limits it)",
                f"or unpack img_align_celeba.zip and list_eval_partition.txt into {folder}", error]))
    from PIL import Image

    wanted = _CELEBA_SPLITS[split]
    names = [line.split()[0] for line in partition.read_text().splitlines()
             if line.strip() and int(line.split()[1]) == wanted]
    out = np.empty((len(names), 64, 64, 3), dtype=np.uint8)
    for i, file in enumerate(names):  # once, then cached
        with Image.open(images_dir / file) as image:
            w, h = image.size
            left, top = (w - 140) // 2, (h - 140) // 2
            out[i] = np.asarray(image.convert("RGB").crop((left, top, left + 140, top + 140))
                                .resize((64, 64), Image.BILINEAR))
    np.save(cache, out)
    return out, None


def _torchvision_download(name: str, root: Path, download: bool) -> str | None:
    """Download ``name`` with torchvision into ``root``; None on success, else why it did not happen."""
    if not download:
        return "download=False"
    from .train.grid import torchvision_status

    torchvision, status = torchvision_status()
    if torchvision is None:
        return status
    import torchvision.datasets as tvd
    try:
        if name == "celeba":
            tvd.CelebA(str(root), split="all", download=True)
        else:
            cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[name]
            for train in (True, False):
                cls(str(root), train=train, download=True)
    except Exception as error:  # offline, quota, checksum
        return f"torchvision's download failed: {error}"
    return None


def _not_found(name: str, looked: list[str], how: list[str]) -> str:
    return (f"dataset {name!r} not found. Looked in: {', '.join(looked)}. To get it: " + "; ".join(how)
            + ". (scikit-learn's 'digits' works offline.)")


# --------------------------------------------------------------------------------------------------
# digits, files
# --------------------------------------------------------------------------------------------------
def _load_digits(split: str):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    cut = slice(0, 1500) if split == "train" else slice(1500, None)
    return images[cut], digits.target[cut]


_NPZ_IMAGES = {"train": ("images", "x", "x_train", "images_train"), "test": ("x_test", "images_test")}
_NPZ_LABELS = {"train": ("labels", "y", "y_train", "labels_train"), "test": ("y_test", "labels_test")}


MAX_NPY_BYTES = 2**36  # 64 GiB: a header that claims more is refused before anything is allocated


@contextlib.contextmanager
def _named_errors(path: Path):
    """numpy's errors for a bad file (pickled objects, truncation, not numpy at all) as one ValueError naming it."""
    try:
        yield
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as error:
        if isinstance(error, (FileNotFoundError, PermissionError)):
            raise
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        what = ("it holds Python objects (pickled), which fastvae does not load" if "pickle" in text else
                "it does not start with numpy's magic string (not a .npy file)" if "magic" in text else text)
        raise ValueError(f"{path}: not a readable array file: {what}") from None


def read_npy(path: str | Path) -> np.ndarray:
    """The array in the ``.npy`` file ``path``, in native byte order. Its header is checked against the file's size
    before anything is read, so a header claiming 730 GiB or a truncated file is one ValueError naming the file."""
    path = Path(path)
    with _named_errors(path), open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(handle)  # 3.0 differs from 2.0 only in the header's text encoding
        if dtype.hasobject:
            raise ValueError("it holds Python objects (pickled), which fastvae does not load")
        needed = math.prod(shape) * dtype.itemsize
        if needed > MAX_NPY_BYTES:
            raise ValueError(f"its header claims shape {shape} of {dtype} ({needed / 2**30:.0f} GiB), more than the "
                             f"{MAX_NPY_BYTES // 2**30} GiB fastvae loads")
        available = os.fstat(handle.fileno()).st_size - handle.tell()
        if needed > available:
            raise ValueError(f"truncated: its header says shape {shape} of {dtype} ({needed} bytes) but the file "
                             f"holds {available} bytes of data")
        handle.seek(0)
        array = np.lib.format.read_array(handle, allow_pickle=False)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def file_digest(path: str | Path) -> str:
    """The sha256 of the file ``path``, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 24), b""):
            digest.update(piece)
    return digest.hexdigest()


def _load_file(path: Path, split: str):
    if not path.is_file():
        raise DatasetNotFoundError(f"dataset file {str(path)!r} does not exist")
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"{path}: a dataset file must be .npy or .npz")
    if path.suffix == ".npy":
        if split == "test":
            raise ValueError(f"{path} holds one array and so no test split; use an .npz with x_test")
        return read_npy(path), None
    with _named_errors(path), np.load(path, allow_pickle=False) as archive:
        keys = set(archive.files)
        image_key = next((k for k in _NPZ_IMAGES[split] if k in keys), None)
        if image_key is None:
            raise ValueError(f"{path}: no {split} images; expected one of the keys {_NPZ_IMAGES[split]}, found "
                             f"{sorted(keys)}")
        label_key = next((k for k in _NPZ_LABELS[split] if k in keys), None)
        return archive[image_key], (archive[label_key] if label_key else None)


# --------------------------------------------------------------------------------------------------
# Public
# --------------------------------------------------------------------------------------------------
def resolve_dataset(name: str, root: str | Path | None = None) -> str:
    """``auto`` becomes ``fashion-mnist`` when its files are on this machine, else ``digits``; other names pass."""
    if name == "auto":
        return "fashion-mnist" if fashion_mnist_available(root) else "digits"
    return name


def load_dataset(name: str, root: str | Path | None = None, split: str = "train", device: str | torch.device = "cpu",
                 *, download: bool = True, keep_uint8: bool = False) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` of dataset ``name`` (see the module docstring) on ``device``.

    Args:
        name: one of ``DATASETS``, ``auto`` (Fashion-MNIST if present, else digits), or a ``.npy``/``.npz`` path.
        root: the data folder (default ``$FASTVAE_DATA`` or ``./data``).
        split: ``train`` or ``test``.
        device: where the tensors go.
        download: let torchvision download a dataset that is not found (needs torchvision and a network).
        keep_uint8: images stored as uint8 stay uint8 (``fit`` converts each batch with ``to_float``).

    Returns:
        ``images`` float32 ``(N, C, H, W)`` in ``[0, 1]`` (uint8 with ``keep_uint8`` where the source is uint8)
        and ``labels`` int64 ``(N,)`` (-1 when unknown).
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"load_dataset: name must be a dataset name or a file path, got {type(name).__name__}")
    if split not in SPLITS:
        raise ValueError(f"load_dataset: split must be one of {SPLITS}, got {split!r}")
    root = Path(root) if root is not None else default_root()
    name = resolve_dataset(str(name), root)
    if name in ("fashion-mnist", "mnist"):
        images, labels = _load_idx(name, root, split, download)
    elif name == "cifar10":
        images, labels = _load_cifar10(root, split, download)
    elif name == "celeba":
        images, labels = _load_celeba(root, split, download)
    elif name == "digits":
        images, labels = _load_digits(split)
    elif str(name).endswith((".npy", ".npz")):
        images, labels = _load_file(Path(name), split)
    elif str(name).startswith(FOLDER_PREFIX):
        if split == "test":
            raise ValueError(f"{name} is one folder of images and so has no test split")
        folder = ImageFolder(str(name)[len(FOLDER_PREFIX):])
        images, labels = torch.stack([folder[i] for i in range(len(folder))]).numpy(), None
    else:
        raise ValueError(f"load_dataset: name must be one of {DATASETS}, 'auto', a .npy/.npz file or folder:PATH, got "
                         f"{name!r}")
    images = as_images(np.ascontiguousarray(images), name=f"{name} images", keep_uint8=keep_uint8)
    return images.to(device), _labels(labels, images.shape[0]).to(device)


# --------------------------------------------------------------------------------------------------
# Streamed data: a folder of images, and fit's view of any Dataset, DataLoader or iterable of batches
# --------------------------------------------------------------------------------------------------
FOLDER_PREFIX = "folder:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFolder(torch.utils.data.Dataset):
    """The images under ``root`` (recursively, sorted by path), each read when asked for as a uint8 ``(C, H, W)``
    tensor: ``C = 1`` when the first image is grayscale, else 3 (RGB). All must have the first one's size;
    ``transform`` (a function of that tensor) runs on each, e.g. a crop or a flip."""

    def __init__(self, root: str | Path, transform=None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {str(self.root)!r} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DatasetNotFoundError(f"image folder {str(self.root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.transform = transform
        from PIL import Image

        with Image.open(self.files[0]) as first:
            self.mode = "L" if first.mode in ("1", "L", "I", "I;16") else "RGB"
            self.size = first.size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as image:
                if image.size != self.size:
                    raise ValueError(f"{path}: {image.size[0]}x{image.size[1]} pixels, but {self.files[0].name} "
                                     f"has {self.size[0]}x{self.size[1]}; resize the folder's images to one size")
                pixels = np.asarray(image.convert(self.mode))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{path}: not a readable image ({error})") from None
        x = torch.from_numpy(pixels.copy())
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()
        return self.transform(x) if self.transform is not None else x


_BATCH_KEYS = ("pixel_values", "images", "image", "data", "x", "input")  # diffusers: pixel_values; pythae: data


def batch_samples(batch) -> Tensor:
    """The samples of one batch as a loader gives it: a tensor, the first entry of an ``(images, labels, ...)``
    tuple or list, or a dict's ``pixel_values`` (diffusers), ``images``, ``image``, ``data`` (pythae), ``x`` or
    ``input``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        key = next((k for k in _BATCH_KEYS if isinstance(batch.get(k), Tensor)), None)
        if key is not None:
            return batch[key]
        raise TypeError(f"fit: a batch dict needs its images under one of {_BATCH_KEYS}, got keys {sorted(batch)}")
    raise TypeError(f"fit: a batch must be a tensor, an (images, labels) pair or a dict, got {type(batch).__name__}")


class BatchStream:
    """``fit``'s view of data that is not one in-memory tensor: each epoch's batches of samples.

    A map-style ``Dataset`` is batched here (``batch_size``, ``drop_last``, ``num_workers``) in the order
    ``order(n, epoch)`` gives (``fit``: the seeded permutation of the tensor path, this rank's share), so it trains
    on the batches the same data as one tensor would. A ``DataLoader`` or any other re-iterable of batches (with a
    ``len()``: the steps per epoch) is used as it comes: its order, its sampler (a ``DistributedSampler`` under
    torchrun) and its workers are the caller's.
    """

    def __init__(self, data, *, batch_size: int, drop_last: bool = False, order=None, limit: int = 0,
                 num_workers: int = 0, name: str = "data"):
        from torch.utils.data import DataLoader, IterableDataset, Subset

        self.name = name
        self.sampler = None
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, IterableDataset):
            if limit:
                data = Subset(data, range(min(limit, len(data))))
            self.dataset = data
            if order is not None:
                self.sampler = _EpochOrder(len(data), order)
            # its own generator: a DataLoader draws a base seed per pass, which must not move torch's default generator
            # (the reparameterization noise draws from it)
            self.loader = DataLoader(data, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
                                     num_workers=num_workers, generator=torch.Generator())
        else:
            if limit:
                raise ValueError(f"fit: limit applies to tensors and Datasets; take the first batches of the {name} "
                                 "loader yourself")
            if iter(data) is data:
                raise TypeError(f"fit: {name} is a one-shot iterator; pass something fit can iterate once per epoch "
                                "(a DataLoader, a list of batches, a Dataset)")
            self.dataset, self.loader = None, data
        try:
            self.batches_per_epoch = len(self.loader)
        except TypeError:
            raise TypeError(f"fit: {name} ({type(data).__name__}) must have a len() (its batches per epoch)") from None
        if self.batches_per_epoch == 0:
            raise ValueError(f"fit: {name} gives no batches")

    def epoch(self, epoch: int, start: int = 0):
        """Epoch ``epoch``'s batches (sample tensors, where the loader made them) from batch ``start`` on."""
        if self.sampler is not None:
            self.sampler.epoch, self.sampler.start = epoch, start * self.loader.batch_size
            start = 0
        for b, batch in enumerate(self.loader):
            if b >= start:
                yield batch_samples(batch)

    def dataset_sample(self) -> Tensor | None:
        """The first sample of a Dataset (None for a loader, which is not read before training)."""
        return batch_samples(self.dataset[0]) if self.dataset is not None else None

    def head(self, n: int) -> Tensor:
        """The first ``n`` samples (in the dataset's own order for a Dataset, the loader's first batches
        otherwise), as one tensor: what evaluation and the grids read when there is no test data."""
        if self.dataset is not None:
            return torch.stack([batch_samples(self.dataset[i]) for i in range(min(n, len(self.dataset)))])
        taken, count = [], 0
        for batch in self.epoch(0):
            taken.append(batch[:n - count])
            count += taken[-1].shape[0]
            if count >= n:
                break
        return torch.cat(taken)


class _EpochOrder(torch.utils.data.Sampler):
    """The indices ``order(n, epoch)`` from position ``start`` on; ``epoch`` and ``start`` set before each pass."""

    def __init__(self, n: int, order):
        self.n, self.order, self.epoch, self.start = n, order, 0, 0
        self.length = len(order(n, 0))

    def __iter__(self):
        return iter(self.order(self.n, self.epoch)[self.start:].tolist())

    def __len__(self) -> int:
        return self.length

"""Frechet distance between feature sets, and the feature extractors that produce them.

``FID = ||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` for the means ``m`` and covariances ``S`` of two
feature sets ``(N, F)``. Two extractors:

- ``inception``: Inception-v3 pool features (2048) in the standard FID setting (pytorch-fid's network and
  weights, images resized to 299x299, grey images repeated to three channels). Used only when
  ``pytorch_fid`` imports and its weights file is already on this machine; fastvae never downloads it.
- ``classifier``: a small CNN that fastvae trains on the dataset itself (``fastvae fid-features``) and
  caches; its features are the 128 post-ReLU units before the last layer. Numbers from it are comparable
  with each other, not with published Inception FIDs.

Every result names the extractor that produced it (``FeatureExtractor.name``).
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .cache import cache_dir

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
EXTRACTORS = ("auto", "inception", "classifier")
CLASSIFIER_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------
def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and covariance ``(F, F)`` (unbiased, as pytorch-fid) of ``features`` ``(N, F)``, in float64."""
    if isinstance(features, Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"feature_statistics: features must be (N, F), got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError("feature_statistics: features needs at least 2 rows for a covariance, "
                         f"got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6, imag_rtol: float = 1e-3) -> np.ndarray:
    """``(S1 S2)^(1/2)`` by scipy's Schur method, real ``(F, F)``.

    ``S1 S2`` of two covariances has real non-negative eigenvalues, but when either is singular (dead
    ReLU units, fewer samples than features) the computed root can be non-finite or carry an
    imaginary part. Then it is recomputed with ``eps`` added to both diagonals (pytorch-fid's offset);
    an imaginary part on the diagonal still larger than ``imag_rtol`` times the mean diagonal magnitude
    raises ``ValueError`` rather than being dropped silently.
    """
    from scipy import linalg

    def root(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # singular products are expected here and handled below
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            return np.asarray(linalg.sqrtm(a @ b))

    def imag_too_large(m: np.ndarray) -> bool:
        if not np.iscomplexobj(m):
            return False
        diag = np.diagonal(m)
        scale = max(float(np.abs(diag).mean()), 1e-12)
        return float(np.abs(diag.imag).max()) > imag_rtol * scale

    covmean = root(sigma1, sigma2)
    if not np.isfinite(covmean).all() or imag_too_large(covmean):
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = root(sigma1 + offset, sigma2 + offset)
    if not np.isfinite(covmean).all():
        raise ValueError("frechet_distance: the matrix square root is not finite even with the diagonal offset")
    if imag_too_large(covmean):
        diag = np.diagonal(covmean)
        raise ValueError(
            f"frechet_distance: the matrix square root has an imaginary part {np.abs(diag.imag).max():.3g} "
            f"on its diagonal (mean magnitude {np.abs(diag).mean():.3g}); the covariances are not valid"
        )
    return covmean.real


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))`` for means ``(F,)`` and
    covariances ``(F, F)`` (arrays or tensors), in float64.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(_numpy(m), dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(_numpy(s), dtype=np.float64)) for s in (sigma1, sigma2))
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,):
        raise ValueError(f"frechet_distance: mu1 and mu2 must both be (F,), got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(f"frechet_distance: sigma1 and sigma2 must be ({f}, {f}), got {sigma1.shape} and "
                         f"{sigma2.shape}")
    diff = mu1 - mu2
    covmean = sqrtm_product(sigma1, sigma2, eps=eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1, features2, *, eps: float = 1e-6) -> float:
    """Frechet distance between two feature sets ``(N1, F)`` and ``(N2, F)``."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2), eps=eps)


def _numpy(x):
    return x.detach().to("cpu", torch.float64).numpy() if isinstance(x, Tensor) else x


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------
class FeatureExtractor:
    """Images ``(N, C, H, W)`` (or ``(N, C*H*W)`` when ``image_shape`` is known) in ``[0, 1]`` -> features ``(N, F)``.

    ``name`` says which network produced the features; every FID report prints it. ``metric`` is what the
    distance is called where it is printed: ``FID`` for Inception features (comparable with published FIDs),
    ``classifier-FID`` for any other network (comparable only with numbers of the same network).
    """

    def __init__(self, name: str, network: nn.Module, image_shape: tuple[int, ...] | None,
                 transform: Callable[[Tensor], Tensor] | None = None, *, metric: str = "classifier-FID"):
        self.name = name
        self.metric = metric
        self.network = network.eval()
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.transform = transform

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device) -> "FeatureExtractor":
        self.network.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: Tensor, *, batch_size: int = 500) -> Tensor:
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise TypeError(f"FeatureExtractor: images must be a floating torch.Tensor, got {type(images).__name__}")
        if batch_size < 1:
            raise ValueError(f"FeatureExtractor: batch_size must be positive, got {batch_size}")
        images = self._shaped(images)
        out = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(self.device, torch.float32)
            if self.transform is not None:
                batch = self.transform(batch)
            out.append(self.network(batch).flatten(1).double().cpu())
        return torch.cat(out)

    def _shaped(self, images: Tensor) -> Tensor:
        if self.image_shape is None or tuple(images.shape[1:]) == self.image_shape:
            return images
        if images[0].numel() != int(np.prod(self.image_shape)):
            raise ValueError(f"FeatureExtractor ({self.name}): images of shape {tuple(images.shape[1:])} do not fit "
                             f"the extractor's image shape {self.image_shape}")
        return images.reshape(images.shape[0], *self.image_shape)


class FeatureClassifier(nn.Module):
    """The small CNN behind the ``classifier`` extractor; ``forward`` returns the 128 features.

    conv3x3(C, 32) - ReLU - maxpool2 - conv3x3(32, 64) - ReLU - maxpool2 - adaptive avgpool 3x3 -
    linear(576, 128) - ReLU [features] - linear(128, classes) [``logits``]. Any image size from 4x4 up.
    """

    def __init__(self, in_channels: int, num_classes: int, num_features: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(3), nn.Flatten(),
            nn.Linear(64 * 9, num_features), nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def classifier_path(dataset: str, root: str | os.PathLike | None = None) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)
    return cache_dir(root) / "fid" / f"classifier-{safe}-v{CLASSIFIER_VERSION}.pt"


def _as_images(images: Tensor) -> Tensor:
    """``(N, C, H, W)`` from ``(N, C, H, W)``, ``(N, H, W)`` or square ``(N, H*W)``."""
    if images.dim() == 4:
        return images
    if images.dim() == 3:
        return images.unsqueeze(1)
    if images.dim() == 2:
        side = int(round(images.shape[1] ** 0.5))
        if side * side != images.shape[1]:
            raise ValueError(f"images of shape {tuple(images.shape)} are flat and not square; pass (N, C, H, W)")
        return images.reshape(images.shape[0], 1, side, side)
    raise ValueError(f"images must be (N, C, H, W), (N, H, W) or (N, H*W), got shape {tuple(images.shape)}")


def train_feature_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    test: tuple[Tensor, Tensor] | None = None,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[FeatureClassifier, dict]:
    """Train ``FeatureClassifier`` with cross-entropy on ``images`` ``(N, C, H, W)`` in ``[0, 1]`` and integer
    ``labels`` ``(N,)``.

    Returns the network (eval mode) and a dict of what it was trained on and its accuracy on ``test``.
    """
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("train_feature_classifier: images and labels must be tensors")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"train_feature_classifier: images and labels differ in length ({images.shape[0]} and "
                         f"{labels.shape[0]})")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"train_feature_classifier: epochs and batch_size must be positive, got {epochs} and "
                         f"{batch_size}")
    images = _as_images(images).float()
    labels = labels.long()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(labels.max()) + 1
    net = FeatureClassifier(images.shape[1], num_classes).to(images.device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(images.shape[0], generator=generator).to(images.device)
        total = 0.0
        for i in range(0, images.shape[0], batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(net.logits(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        if log:
            log(f"fid classifier epoch {epoch + 1}/{epochs}: loss {total / images.shape[0]:.4f}")
    net.eval()
    info = {"num_classes": num_classes, "image_shape": list(images.shape[1:]), "epochs": epochs,
            "train_size": images.shape[0], "seconds": round(time.perf_counter() - start, 1)}
    if test is not None:
        info["test_accuracy"] = classifier_accuracy(net, *test)
    return net, info


@torch.no_grad()
def classifier_accuracy(net: FeatureClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    images = _as_images(images).float()
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        pred = net.logits(images[i:i + batch_size].to(device)).argmax(dim=1)
        correct += int((pred.cpu() == labels[i:i + batch_size].cpu()).sum())
    return correct / images.shape[0]


def fit_classifier_features(
    dataset: str,
    *,
    root: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    epochs: int = 3,
    force: bool = False,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train the feature classifier on ``dataset``'s training split (``fastvae.data.load_dataset``), test it
    on the test split, and save it to ``classifier_path(dataset, root)``; an existing file is kept unless ``force``.
    """
    path = classifier_path(dataset, root)
    if path.exists() and not force:
        if log:
            log(f"fid classifier for {dataset!r} already cached at {path} (use --force to retrain)")
        return path
    from .data import load_dataset

    images, labels = load_dataset(dataset, root=data_root, split="train", device=device)
    test = load_dataset(dataset, root=data_root, split="test", device=device)
    net, info = train_feature_classifier(images, labels, test=test, epochs=epochs, log=log)
    info["dataset"] = dataset
    save_classifier(net, info, path)
    if log:
        accuracy = info.get("test_accuracy", float("nan"))
        log(f"fid classifier for {dataset!r}: test accuracy {accuracy:.4f}, saved to {path}")
    return path


def save_classifier(net: FeatureClassifier, info: dict, path: str | os.PathLike) -> None:
    from .train.checkpoint import save_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"state_dict": net.state_dict(), "info": info, "version": CLASSIFIER_VERSION}, path)


def load_classifier_extractor(path: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The feature extractor of a classifier cached by ``save_classifier``, verified against the sha256 saved
    beside it; a file without one, damaged, foreign or garbage raises ``CheckpointError`` (a ValueError) naming it
    and how to rebuild it."""
    from .train.checkpoint import CheckpointError, read_checkpoint, weights_digest

    path = Path(path)
    try:
        saved = read_checkpoint(path, require_digest=True, key="state_dict")
        info = saved["info"]
        shape = tuple(info["image_shape"])
        net = FeatureClassifier(shape[0], info["num_classes"])
        net.load_state_dict(saved["state_dict"])
    except (CheckpointError, KeyError, TypeError, IndexError, RuntimeError) as error:
        why = str(error) if isinstance(error, CheckpointError) else f"{path}: not a fastvae fid classifier ({error})"
        raise CheckpointError(f"{why}; rebuild it with `fastvae fid-features --dataset DATASET --force`") from None

    digest = weights_digest(saved["state_dict"])[:8]  # of the weights: a retrain to the same weights keeps it
    acc = info.get("test_accuracy")
    name = (f"fastvae classifier features (128-d) trained on {info.get('dataset', '?')}"
            + (f", test accuracy {acc:.3f}" if acc is not None else "") + f", {path.name} weights sha256 {digest}")
    return FeatureExtractor(name, net.to(device), shape)


def inception_weights_path() -> Path | None:
    """pytorch-fid's Inception weights when they are already on this machine: ``$FASTVAE_INCEPTION_WEIGHTS``,
    else ``<torch hub dir>/checkpoints/pt_inception-2015-12-05-6726825d.pth``; ``None`` otherwise.
    """
    env = os.environ.get("FASTVAE_INCEPTION_WEIGHTS")
    candidates = [Path(env)] if env else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS)
    for path in candidates:
        if path.is_file():
            return path
    return None


def inception_available() -> bool:
    """Whether the Inception extractor can run here without downloading anything."""
    if inception_weights_path() is None:
        return False
    try:
        import pytorch_fid.inception  # noqa: F401
    except Exception:
        return False
    return True


def load_inception_extractor(device: str | torch.device = "cpu") -> FeatureExtractor:
    """Inception-v3 pool3 features (2048-d) in the standard FID setting, from the local weights file."""
    path = inception_weights_path()
    if path is None:
        raise RuntimeError(f"Inception weights ({INCEPTION_WEIGHTS}) are not on this machine; fastvae does not "
                           "download them. "
                           "Put the file in the torch hub checkpoints directory or set FASTVAE_INCEPTION_WEIGHTS.")
    try:
        import pytorch_fid.inception as pfi
        from pytorch_fid.inception import InceptionV3
    except Exception as error:
        raise RuntimeError("the Inception extractor needs pytorch-fid (pip install pytorch-fid, which needs "
                           "torchvision)") from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    # pytorch-fid fetches its weights through load_state_dict_from_url; hand it the local file instead.
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
    finally:
        pfi.load_state_dict_from_url = original

    class _Pool(nn.Module):
        def __init__(self, inception):
            super().__init__()
            self.inception = inception

        def forward(self, x):
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            return self.inception(x.clamp(0, 1))[0]

    name = f"Inception-v3 pool3 (2048-d, pytorch-fid weights {path.name})"
    return FeatureExtractor(name, _Pool(net).to(device), None, metric="FID")


def get_extractor(
    dataset: str,
    kind: str = "auto",
    *,
    root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    train_if_missing: bool = True,
    data_root: str | os.PathLike | None = None,
    epochs: int = 3,
    log: Callable[[str], None] | None = print,
) -> FeatureExtractor:
    """The extractor ``kind`` for ``dataset``: ``inception`` (local weights only), ``classifier`` (cached,
    trained first when missing and ``train_if_missing``), or ``auto`` (inception when available, else classifier).
    """
    if kind not in EXTRACTORS:
        raise ValueError(f"get_extractor: kind must be one of {EXTRACTORS}, got {kind!r}")
    if kind == "inception" or (kind == "auto" and inception_available()):
        return load_inception_extractor(device)
    path = classifier_path(dataset, root)
    if not path.exists():
        if not train_if_missing:
            raise FileNotFoundError(f"no cached fid classifier for {dataset!r} at {path}; run `fastvae fid-features "
                                    f"--dataset {dataset}`")
        fit_classifier_features(dataset, root=root, data_root=data_root, epochs=epochs, device=device, log=log)
    return load_classifier_extractor(path, device)


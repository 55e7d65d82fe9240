"""``train(config)``: load ``config.dataset``, build ``config.model`` for it and ``fit``."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..models import build_model
from .config import TrainConfig
from .loop import TrainResult, _distributed, fit
from .runfolder import unique_folder

__all__ = ["train", "model_from_config", "resolved_dataset"]


def model_from_config(config: TrainConfig, input_shape) -> nn.Module:
    """``build_model`` with the model fields of ``config`` for inputs of ``input_shape``."""
    kwargs: dict = {}
    if config.model in ("dense", "second-stage") and config.hidden is not None:
        kwargs["hidden"] = tuple(config.hidden)
    if config.model in ("conv", "resnet"):
        if config.hidden is not None:
            kwargs["hidden"] = config.hidden[0]
        if config.channels is not None:
            kwargs["channels"] = tuple(config.channels)
    if config.model == "resnet":
        kwargs["blocks_per_scale"] = config.blocks_per_scale
    return build_model(config.model, tuple(input_shape), config.latent, **kwargs)


def resolved_dataset(config: TrainConfig) -> tuple[str, str | None]:
    """``(dataset, note)``: ``auto`` made concrete, a file path made absolute (so that the run folder can be
    read from anywhere); ``note`` says what ``auto`` chose and where it found it (None otherwise)."""
    from ..data import FOLDER_PREFIX, fashion_mnist_folder, resolve_dataset

    if config.dataset.startswith(FOLDER_PREFIX):
        return FOLDER_PREFIX + str(Path(config.dataset[len(FOLDER_PREFIX):]).expanduser().resolve()), None
    name = resolve_dataset(config.dataset, config.data_root)
    if name.endswith((".npy", ".npz")):
        return str(Path(name).expanduser().resolve()), None
    if config.dataset != "auto":
        return name, None
    if name == "fashion-mnist":
        return name, f"dataset auto: fashion-mnist, found in {fashion_mnist_folder(config.data_root)}"
    return name, ("dataset auto: digits (scikit-learn's; no Fashion-MNIST found on this machine; "
                  "apt-get install dataset-fashion-mnist to train on it)")


def train(config: TrainConfig | None = None, *, resume: bool = False, callbacks: Iterable[Callable] | None = None,
          echo: Callable[[str], None] | None = None) -> tuple[nn.Module, TrainResult]:
    """Load ``config.dataset`` (train and, where there is one, test split), build ``config.model`` for it and
    ``fit``; returns ``(model, result)``. ``echo`` receives one line on what ``auto`` chose. Without
    ``config.out`` the run goes to a new folder ``runs/DATASET-MODEL-TIME`` (``-2``, ``-3``, ... when taken).
    Images stored as uint8 stay uint8 on the device (``fit`` converts each batch); ``folder:PATH`` streams a
    folder of images from disk."""
    from ..data import FOLDER_PREFIX, ImageFolder, load_dataset

    config = (config or TrainConfig()).validate()
    rank, world = _distributed()
    name, note = resolved_dataset(config)
    if note is not None and echo is not None and rank == 0:
        echo(note)
    config = dataclasses.replace(config, dataset=name)
    if config.out is None:
        stem = f"runs/{Path(name.removeprefix(FOLDER_PREFIX)).stem}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = [str(unique_folder(stem)) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(out, src=0)
        config = dataclasses.replace(config, out=out[0])
    if name.startswith(FOLDER_PREFIX):
        images, test = ImageFolder(name[len(FOLDER_PREFIX):]), None
        input_shape = images[0].shape
    else:
        images, _ = load_dataset(name, config.data_root, "train", download=config.download, keep_uint8=True)
        try:
            test, _ = load_dataset(name, config.data_root, "test", download=config.download, keep_uint8=True)
        except ValueError:  # a user file without a test split
            test = None
        input_shape = images.shape[1:]
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run with this seed
    model = model_from_config(config, input_shape)
    return model, fit(model, images, config, test_data=test, callbacks=callbacks, resume=resume)

"""A finished (or interrupted) run folder read back: ``fastvae.load(run_dir) -> (model, config)``."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .models import build_model
from .train import CHECKPOINT, TrainConfig

__all__ = ["load", "load_checkpoint"]


def load_checkpoint(run_dir: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """The dict saved in ``run_dir/checkpoint.pt`` (model, optimizer, ..., ``step``, ``epoch``, ``config``).

    ``run_dir`` may also be the checkpoint file itself."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: is {run_dir!s} a run folder written by fastvae train?")
    return torch.load(path, map_location=map_location, weights_only=True)


def load(run_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained model of a run folder, on ``device`` and in eval mode, and the run's ``TrainConfig``.

    Example::

        >>> model, config = fastvae.load("runs/fashion")
        >>> x = model.sample(64)                   # (64, 1, 28, 28) in [0, 1]
    """
    state = load_checkpoint(run_dir, map_location=device)
    spec = state.get("model_spec")
    if not spec:
        raise ValueError(f"{run_dir}: the checkpoint's model has no spec (not a fastvae.models model); rebuild it "
                         "and call model.load_state_dict(fastvae.run.load_checkpoint(run_dir)['model'])")
    model = build_model(**spec)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), TrainConfig.from_dict(state["config"])

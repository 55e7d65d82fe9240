"""A finished (or interrupted) run folder read back: ``fastvae.load(run_dir) -> (model, config)``."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .models import build_model
from .train.checkpoint import load_run_checkpoint
from .train.config import TrainConfig

__all__ = ["load", "load_checkpoint"]


def load_checkpoint(run_dir: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """The dict saved in ``run_dir/checkpoint.pt`` (model, optimizer, ..., ``step``, ``epoch``, ``config``),
    verified against its sha256; when that file is damaged, the previous checkpoint with a warning.

    ``run_dir`` may also be the checkpoint file itself. Raises ``FileNotFoundError`` when there is none and
    ``fastvae.train.CheckpointError`` (a ValueError naming the file) when it cannot be trusted."""
    return load_run_checkpoint(run_dir, map_location=map_location)


def load(run_dir: str | Path, *, device: str | torch.device = "cpu", ema: bool = True) -> tuple[nn.Module, TrainConfig]:
    """The trained model of a run folder, on ``device`` and in eval mode, and the run's ``TrainConfig``.

    A run trained with ``ema`` (``--ema DECAY``) comes back with its averaged weights (what ``fastvae sample``,
    ``analyze`` and ``fid`` use); ``ema=False`` gives the trained weights themselves.

    Example::

        >>> import fastvae, torch
        >>> model, config = fastvae.load("runs/fashion")
        >>> x = model.sample(64, generator=torch.Generator().manual_seed(0))   # (64, 1, 28, 28) in [0, 1]
    """
    from .train.devices import resolve_device

    device = resolve_device(device)
    state = load_checkpoint(run_dir, map_location=device)
    spec = state.get("model_spec")
    if not spec:
        raise ValueError(f"{run_dir}: the checkpoint's model has no spec (not a fastvae.models model); rebuild it "
                         "and call model.load_state_dict(fastvae.run.load_checkpoint(run_dir)['model'])")
    model = build_model(**spec)
    model.load_state_dict(state["ema"] if ema and "ema" in state else state["model"])
    return model.to(device).eval(), TrainConfig.from_dict(state["config"])

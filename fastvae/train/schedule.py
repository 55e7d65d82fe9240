"""The learning-rate schedule on the device: the optimizer's ``lr`` is a tensor that the step updates in place.

``lr(s) = lr_0 * factor(s)`` at step ``s`` (counted from 0), with ``W`` warm-up steps and ``T`` steps in all:

- ``s < W``: ``factor = (s + 1) / W``;
- else, with ``p = min(1, (s - W) / max(1, T - W))``: ``cosine``: ``(1 + cos(pi p)) / 2``; ``linear``: ``1 - p``;
  ``constant``: ``1``.

The same values as ``torch.optim.lr_scheduler.LambdaLR`` with that factor, but the step counter and the rate
live on the device, so that a training step reads nothing from the host and writes no Python number into the
optimizer (which a CUDA graph would freeze at its captured value): ``step()`` is a few device ops.
"""
from __future__ import annotations

import math

import torch

__all__ = ["DeviceLR", "lr_factor"]


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """``factor(step)`` of the formula above, in Python (the spec that ``DeviceLR`` is tested against)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


class DeviceLR:
    """The schedule of ``optimizer`` (one base rate ``lr``) with the counter and the rate as device tensors.

    Each param group's ``lr`` becomes one shared float32 tensor on ``device`` (Adam takes a tensor rate when
    fused or capturable). ``step()`` advances the counter and writes the next rate in place; ``state_dict`` holds
    ``last_epoch`` as LambdaLR's does, so a checkpoint of either resumes with the other."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, *, warmup: int, total: int, schedule: str,
                 device: torch.device):
        self.optimizer, self.base_lr = optimizer, float(lr)
        self.warmup, self.total, self.schedule = warmup, total, schedule
        # the factor in float64, as LambdaLR computes it; the rate in float32, which fused Adam reads on CUDA
        self.counter = torch.zeros((), dtype=torch.float64, device=device)
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self._pin()
        self._write()

    def _pin(self) -> None:
        """Point every param group at the one rate tensor (a loaded optimizer state brings its own value)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def _write(self) -> None:
        """``lr = lr_0 * factor(counter)`` with device ops only."""
        s = self.counter
        if self.warmup:
            warm = (s + 1) / self.warmup
        progress = ((s - self.warmup) / max(1, self.total - self.warmup)).clamp(0.0, 1.0)
        if self.schedule == "cosine":
            after = 0.5 * (1.0 + torch.cos(math.pi * progress))
        elif self.schedule == "linear":
            after = 1.0 - progress
        else:
            after = torch.ones_like(s)
        factor = torch.where(s < self.warmup, warm, after) if self.warmup else after
        self.lr.copy_(factor * self.base_lr)

    @torch.no_grad()
    def step(self) -> None:
        """After an optimizer step: ``counter += 1`` and the rate of the next step (a constant rate, the default,
        stays as written: one device op a step instead of seven)."""
        self.counter.add_(1)
        if self.warmup or self.schedule != "constant":
            self._write()

    def get_last_lr(self) -> list[float]:
        """The rate of the next step, read from the device (for the log rows only)."""
        return [float(self.lr)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict:
        return {"last_epoch": int(self.counter), "base_lrs": [self.base_lr] * len(self.optimizer.param_groups)}

    def load_state_dict(self, state: dict) -> None:
        self.counter.fill_(int(state["last_epoch"]))
        self._pin()
        self._write()

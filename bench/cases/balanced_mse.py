"""balanced_mse: the balanced reconstruction loss (batchmean, min-ema) on image batches ``(B, C, H, W)``."""
from __future__ import annotations

import torch
from torch import Tensor

import fastvae

from . import OpBench, acc, numel, traffic


def eager(x_hat: Tensor, x: Tensor, running_mse: Tensor, momentum: float = 0.99) -> tuple[Tensor]:
    """The balanced loss as ``fastvae.reference.balanced_mse`` computes it (``batchmean``, ``min-ema``):
    ``sum((x_hat - x)^2 / (2 gamma^2) + log(gamma^2) / 2) / N`` with ``gamma^2 = running_mse``, then
    ``running_mse = min(r, m r + (1 - m) mean((x_hat - x)^2))`` in place, without gradient."""
    gamma2 = running_mse.detach()
    err = acc(x_hat) - acc(x)
    loss = (err.pow(2) / (2 * gamma2) + torch.log(gamma2) / 2).sum() / x.shape[0]
    with torch.no_grad():
        ema = momentum * running_mse + (1 - momentum) * err.pow(2).mean()
        running_mse.copy_(torch.minimum(running_mse, ema))
    return (loss,)


def fused(x_hat: Tensor, x: Tensor, running_mse: Tensor) -> tuple[Tensor]:
    return (fastvae.balanced_mse(x_hat, x, running_mse),)


def inputs(case: dict, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    shape = (case["B"], *case["image"])
    x = torch.rand(shape, device=device, dtype=dtype)
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    return x_hat, x, torch.ones((), device=device, dtype=torch.float32)


def min_bytes(case: dict, mode: str, s: int) -> int:
    n = numel(case)
    return traffic(2 * n * s, 3 * n * s, mode)  # read x_hat, x | read x_hat, x, write grad x_hat


def label(case: dict) -> str:
    return f"{case['B']}x{'x'.join(map(str, case['image']))}"


CASES = tuple({"B": 128, "image": im} for im in ((1, 28, 28), (3, 32, 32), (3, 64, 64)))
CASE = OpBench(
    "balanced_mse", CASES, ({"B": 8, "image": (1, 28, 28)},), inputs, eager, fused, min_bytes, label,
    "forward: read x_hat, x (2 N s); backward: read x_hat, x, write d x_hat (3 N s)",
    typical={"B": 128, "image": (3, 64, 64)})

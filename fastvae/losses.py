"""Reconstruction-loss policies, chosen by name, and the objective ``loss = rec + kl_weight * kl``.

Per batch of ``N`` samples with ``P`` elements each (``rec`` is a sum over elements, averaged over the batch):

- ``balanced`` (default): ``fastvae.BalancedMSE``, Asperti & Trentin's Gaussian NLL with
  ``gamma^2`` = a running estimate of the MSE: ``rec = sum((x_hat - x)^2) / (2 gamma^2 N) + P log(gamma^2) / 2``.
- ``beta``: plain summed MSE, ``rec = sum((x_hat - x)^2) / N``; with ``kl_weight`` as the fixed ``beta``.
- ``learned-gamma`` (Dai & Wipf 2019): a trainable ``log gamma`` in the Gaussian NLL,
  ``rec = sum((x_hat - x)^2) / (2 gamma^2 N) + P log(gamma)``, ``gamma = exp(log_gamma)`` (the constant
  ``P log(2 pi) / 2`` is left out, as in ``balanced``).

Each policy is a module ``policy(x_hat, x) -> rec`` (float32 scalar) with a ``gamma`` property (a tensor,
or None for ``beta``); its state (``running_mse`` or ``log_gamma``) is in its state_dict.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import BalancedMSE, kl_divergence

__all__ = ["LOSSES", "BalancedLoss", "BetaLoss", "LearnedGammaLoss", "Objective", "build_loss"]


class BalancedLoss(BalancedMSE):
    """``fastvae.BalancedMSE`` with ``reduction="batchmean"``: the ``balanced`` policy."""

    def __init__(self, momentum: float = 0.99, rule: str = "min-ema"):
        super().__init__(momentum=momentum, rule=rule, reduction="batchmean")


class BetaLoss(nn.Module):
    """``sum((x_hat - x)^2) / N``: the ``beta`` policy (the KL weight is the objective's ``kl_weight``)."""

    gamma = None

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        return (x_hat.float() - x.float()).square().sum() / x.shape[0]


class LearnedGammaLoss(nn.Module):
    """``sum((x_hat - x)^2) / (2 gamma^2 N) + P log(gamma)`` with ``log_gamma`` a trainable scalar (start 0)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        if not init > 0:
            raise ValueError(f"LearnedGammaLoss: init must be positive, got {init}")
        self.log_gamma = nn.Parameter(torch.tensor(float(init)).log())

    @property
    def gamma(self) -> Tensor:
        return self.log_gamma.detach().exp()

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        n, per_sample = x.shape[0], x[0].numel()
        sse = (x_hat.float() - x.float()).square().sum()
        return sse / (2 * n) * torch.exp(-2 * self.log_gamma) + per_sample * self.log_gamma


LOSSES = {"balanced": BalancedLoss, "beta": BetaLoss, "learned-gamma": LearnedGammaLoss}


def build_loss(name: str, *, momentum: float = 0.99, rule: str = "min-ema") -> nn.Module:
    """The policy called ``name`` (one of ``LOSSES``); ``momentum`` and ``rule`` configure ``balanced``."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
    if name == "balanced":
        return BalancedLoss(momentum=momentum, rule=rule)
    return LOSSES[name]()


class Objective(nn.Module):
    """``forward(x, seed=None) -> (loss, rec, kl)`` with ``loss = rec + kl_weight * kl``, for ``model``
    (``model(x, seed) -> (x_hat, kl)``) and a reconstruction policy. One module, so that DDP and the
    optimizer see the model's and the policy's parameters together."""

    def __init__(self, model: nn.Module, policy: nn.Module, kl_weight: float = 1.0):
        super().__init__()
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.model, self.policy, self.kl_weight = model, policy, float(kl_weight)

    def forward(self, x: Tensor, seed: int | Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        x_hat, kl = self.model(x, seed)
        rec = self.policy(x_hat, x)
        return rec + self.kl_weight * kl, rec, kl


KL_MODES = ("full", "quadratic", "none")
"""The KL terms of ``fastvae train --kl``: the full KL to N(0, I), its ``mu^2 / 2`` part alone, or none."""


def kl_penalty(mu: Tensor, logvar: Tensor, kl: str = "full") -> Tensor:
    """The batch-mean KL term of mode ``kl`` for ``(N, D)`` codes, a float32 scalar:
    ``full``: ``sum(mu^2 + exp(logvar) - logvar - 1) / (2 N)``; ``quadratic``: ``sum(mu^2) / (2 N)``; ``none``: 0."""
    if kl not in KL_MODES:
        raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")
    if kl == "full":
        return kl_divergence(mu, logvar, reduction="batchmean")
    if kl == "quadratic":
        return 0.5 * mu.float().square().sum() / mu.shape[0]
    return mu.new_zeros((), dtype=torch.float32)

"""The balanced weighting of any per-element reconstruction loss: ``balanced_loss`` and ``BalancedLoss``.

taming's latent-diffusion autoencoder loss weights its reconstruction term as ``rec / exp(logvar) + logvar``
with a learned scalar ``logvar``; here ``exp(logvar)`` is the running estimate of the mean reconstruction
loss, as ``balanced_mse`` does for the squared error (Asperti & Trentin 2020), so the balance with the KL
stays constant along training whatever the reconstruction loss (L1, L1 plus a perceptual term, ...).

The loss is linear in ``rec``, so the plain composition is already one pass: ``batchmean`` and ``sum``
are one reduction of ``rec`` (which also gives the batch mean for the update), and the backward is
``g / r`` broadcast to ``rec``'s shape as an expanded scalar, with nothing of ``rec``'s size saved.
No custom op or kernel is needed, and ``torch.compile`` traces it as it is.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import reference
from ..reference.reduce import MEAN
from ._checks import REDUCTIONS, check_choice, check_finite, check_float_tensor, check_running_estimate
from .balanced_mse import UPDATE_RULES, batch_mse

__all__ = ["balanced_loss", "BalancedLoss"]


def balanced_loss(
    rec: Tensor,
    running_loss: Tensor,
    *,
    momentum: float = 0.99,
    rule: str = "min-ema",
    update: bool = True,
    reduction: str = "batchmean",
) -> Tensor:
    r"""Balanced weighting of a per-element reconstruction loss by its own running mean.

    .. math::
        \ell = \frac{\text{rec}}{r} + \log r, \qquad r = \texttt{running\_loss}

    taming's ``rec / exp(logvar) + logvar`` with ``exp(logvar) = r`` instead of a learned scalar; no
    gradient flows through ``r``: ``d loss / d rec = g / r``. For ``rec = (x_hat - x)^2`` this is twice
    ``balanced_mse(x_hat, x, r)`` (whose Gaussian NLL has the factor 1/2), with the same update.

    Args:
        rec: ``(N, *)`` per-element reconstruction loss (``(x_hat - x).abs()``, plus a perceptual term
            broadcast to it, ...), float16, bfloat16, float32 or float64; it carries the gradient.
        running_loss: one-element floating tensor (> 0) on ``rec``'s device: ``r``. When ``update``, it is
            updated in place after the forward from ``batch_loss = mean(rec)`` (over all ranks under
            torch.distributed): ``min-ema``: ``r = min(r, m r + (1 - m) batch_loss)``; ``ema``:
            ``r = m r + (1 - m) batch_loss``, ``m = momentum``.
        reduction: ``none`` (shape of rec), ``per_sample`` (sum over all but dim 0: ``(N,)``),
            ``batchmean`` (total / N, taming's ``sum / shape[0]``), ``sum``, or torch's ``mean`` (total /
            ``rec.numel()``); reduced losses are float32 for half inputs.

    Example::

        >>> running = torch.ones(())
        >>> rec = (x_hat - x).abs() + 0.5 * lpips(x_hat, x)          # (N, C, H, W)
        >>> loss = fastvae.balanced_loss(rec, running) + kl_weight * kl
    """
    op = "balanced_loss"
    check_float_tensor(op, "rec", rec)
    check_running_estimate(op, "running_loss", running_loss, rec.device)
    check_choice(op, "reduction", reduction, REDUCTIONS + (MEAN,))
    check_choice(op, "rule", rule, UPDATE_RULES)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: momentum must be in [0, 1], got {momentum}")
    check_finite(op, rec=rec, running_loss=running_loss)
    acc = reference.accumulation_dtype(rec.dtype)
    # a copy: the backward uses r as it was before this call's in-place update
    r = running_loss.detach().to(acc, copy=True).reshape(())
    log_r = torch.log(r)
    if reduction in ("batchmean", "sum", MEAN):
        total = rec.sum(dtype=acc)
        loss = total / r + rec.numel() * log_r
        if reduction != "sum":
            loss = loss / (rec.shape[0] if reduction == "batchmean" else rec.numel())
    else:
        total = None
        loss = reference.reduce_loss(rec.to(acc) / r + log_r, reduction, tuple(range(1, rec.dim())), rec.dtype)
    if update:
        total = rec.detach().sum(dtype=acc) if total is None else total.detach()
        reference.update_running_mse(running_loss, batch_mse(total, rec.numel()), momentum=momentum, rule=rule)
    return loss


class BalancedLoss(nn.Module):
    """``balanced_loss`` as a module beside ``BalancedMSE``: ``running_loss`` is a buffer (in the state_dict
    and checkpoints, start value ``init``), updated only in training mode. ``logvar = log(running_loss)``
    is taming's ``logvar``, here an estimate rather than a parameter."""

    def __init__(self, momentum: float = 0.99, rule: str = "min-ema", reduction: str = "batchmean", init: float = 1.0):
        super().__init__()
        check_choice("BalancedLoss", "rule", rule, UPDATE_RULES)
        check_choice("BalancedLoss", "reduction", reduction, REDUCTIONS + (MEAN,))
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BalancedLoss: momentum must be in [0, 1], got {momentum}")
        if not init > 0:
            raise ValueError(f"BalancedLoss: init must be positive, got {init}")
        self.momentum, self.rule, self.reduction = momentum, rule, reduction
        self.register_buffer("running_loss", torch.tensor(float(init)))

    @property
    def logvar(self) -> Tensor:
        return self.running_loss.log()

    def forward(self, rec: Tensor) -> Tensor:
        return balanced_loss(
            rec, self.running_loss, momentum=self.momentum, rule=self.rule, update=self.training,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, rule={self.rule!r}, reduction={self.reduction!r}"

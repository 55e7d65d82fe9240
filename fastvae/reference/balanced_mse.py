"""Spec of the balanced reconstruction loss and of its running-MSE update."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .reduce import accumulation_dtype, expand_reduced_grad, reduce_loss

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
UPDATE_RULES = ("min-ema", "ema")
__all__ = ["UPDATE_RULES", "balanced_mse_loss", "balanced_mse_forward", "update_running_mse", "balanced_mse",
           "balanced_mse_backward", "balanced_loss"]


def sample_dims(x: Tensor) -> tuple[int, ...]:
    """All dims but the batch dim 0 (none for a 1-D batch of scalars)."""
    return tuple(range(1, x.dim()))


def balanced_mse_loss(x_hat: Tensor, x: Tensor, running_mse: Tensor, *, reduction: str = "batchmean",
                      full: bool = False) -> Tensor:
    """The Gaussian NLL with variance ``gamma^2 = running_mse`` (no gradient through it), per element

    ``(x_hat - x)^2 / (2 gamma^2) + log(gamma^2) / 2`` (``+ log(2 pi) / 2`` when ``full``),
    for ``x_hat``, ``x`` of shape ``(N, *)``. Reductions: ``none`` (shape of x), ``per_sample``
    (sum over all but dim 0: shape ``(N,)``), ``batchmean`` (total / N), ``sum``.
    """
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    gamma2 = running_mse.detach().to(acc).reshape(())
    err = x_hat.to(acc) - x.to(acc)
    values = err * err / (2 * gamma2) + torch.log(gamma2) / 2 + (HALF_LOG_2PI if full else 0.0)
    return reduce_loss(values, reduction, sample_dims(x_hat), x_hat.dtype)


def balanced_mse_forward(x_hat: Tensor, x: Tensor, running_mse: Tensor, *, reduction: str = "batchmean",
                         full: bool = False) -> tuple[Tensor, Tensor]:
    """What the custom op returns: ``(balanced_mse_loss(...), sum((x_hat - x)^2))``; the sum (the
    statistic of the running-MSE update, in the accumulation dtype) carries no gradient."""
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    err = x_hat.detach().to(acc) - x.detach().to(acc)
    return balanced_mse_loss(x_hat, x, running_mse, reduction=reduction, full=full), (err * err).sum()


def update_running_mse(running_mse: Tensor, batch_mse: Tensor, *, momentum: float = 0.99,
                       rule: str = "min-ema") -> Tensor:
    """Update ``running_mse`` in place from this batch's mean squared error and return it.

    ``ema``: ``r = m r + (1 - m) batch_mse``; ``min-ema`` (the authors' code):
    ``r = min(r, m r + (1 - m) batch_mse)``.
    """
    with torch.no_grad():
        batch_mse = batch_mse.to(running_mse.dtype).reshape(running_mse.shape)
        ema = running_mse * momentum + batch_mse * (1 - momentum)
        if rule == "min-ema":
            ema = torch.minimum(running_mse, ema)
        elif rule != "ema":
            raise ValueError(f"unknown rule {rule!r}")
        running_mse.copy_(ema)
    return running_mse


def balanced_mse(
    x_hat: Tensor,
    x: Tensor,
    running_mse: Tensor,
    *,
    momentum: float = 0.99,
    rule: str = "min-ema",
    update: bool = True,
    reduction: str = "batchmean",
    full: bool = False,
) -> Tensor:
    """``balanced_mse_loss`` with ``gamma^2`` as ``running_mse`` was before the call, then, when ``update``,
    ``update_running_mse`` with ``batch_mse = mean((x_hat - x)^2)`` (single process)."""
    loss, sse = balanced_mse_forward(x_hat, x, running_mse, reduction=reduction, full=full)
    if update:
        update_running_mse(running_mse, sse / x_hat.numel(), momentum=momentum, rule=rule)
    return loss


def balanced_mse_backward(grad: Tensor, x_hat: Tensor, x: Tensor, running_mse: Tensor, reduction: str, *,
                          need_x: bool = True) -> tuple[Tensor, Tensor | None]:
    """``d/dx_hat = g * (x_hat - x) / gamma^2`` and ``d/dx = -d/dx_hat`` (None unless ``need_x``), with ``g``
    broadcast back over the reduction."""
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    gamma2 = running_mse.detach().to(acc).reshape(())
    g = expand_reduced_grad(grad.to(acc), reduction, x_hat.shape, sample_dims(x_hat))
    grad_x_hat = g * (x_hat.to(acc) - x.to(acc)) / gamma2
    return grad_x_hat.to(x_hat.dtype), ((-grad_x_hat).to(x.dtype) if need_x else None)


def balanced_loss(rec: Tensor, running_loss: Tensor, *, reduction: str = "batchmean") -> Tensor:
    """taming's ``rec / exp(logvar) + logvar`` with ``exp(logvar) = r = running_loss`` (no gradient through
    it), per element of a per-element reconstruction loss ``rec`` of shape ``(N, *)``: ``rec / r + log(r)``.
    Reductions as ``balanced_mse_loss``. For ``rec = (x_hat - x)^2`` it is twice ``balanced_mse_loss``."""
    acc = accumulation_dtype(rec.dtype)
    r = running_loss.detach().to(acc).reshape(())
    return reduce_loss(rec.to(acc) / r + torch.log(r), reduction, sample_dims(rec), rec.dtype)

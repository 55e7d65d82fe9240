"""Spec of ``reparameterize_kl``, ``reparameterize`` and ``kl_divergence`` over latents ``(..., E_1, ..., E_k)``."""
from __future__ import annotations

import torch
from torch import Tensor

from .philox import philox_randn
from .reduce import accumulation_dtype, expand_reduced_grad, reduce_loss

__all__ = ["reparameterize", "kl_divergence", "reparameterize_kl", "reparameterize_kl_backward", "clamp_logvar",
           "clamp_logvar_grad"]
LATENT_DIMS = (-1,)


def reparameterize(mu: Tensor, logvar: Tensor, *, seed: Tensor | int) -> Tensor:
    """``z = mu + exp(logvar / 2) * eps`` with ``eps = philox_randn(seed, mu.shape)``; shape and dtype of mu."""
    acc = accumulation_dtype(mu.dtype)
    eps = philox_randn(seed, mu.shape, mu.device).to(acc)
    return (mu.to(acc) + torch.exp(logvar.to(acc) / 2) * eps).to(mu.dtype)


def kl_divergence(mu: Tensor, logvar: Tensor, *, reduction: str = "batchmean", event_dims: int = 1) -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, 1)) = 0.5 * (mu^2 + exp(logvar) - logvar - 1)`` per element.

    Reductions: ``none`` (shape of mu), ``per_sample`` (sum over the last ``event_dims`` dims: shape
    ``mu.shape[:-event_dims]``), ``batchmean`` (total / number of samples), ``sum``.
    """
    acc = accumulation_dtype(mu.dtype)
    mu_acc, logvar_acc = mu.to(acc), logvar.to(acc)
    kl = 0.5 * (mu_acc * mu_acc + torch.exp(logvar_acc) - logvar_acc - 1)
    return reduce_loss(kl, reduction, tuple(range(-event_dims, 0)), mu.dtype)


def reparameterize_kl(
    mu: Tensor, logvar: Tensor, *, seed: Tensor | int, reduction: str = "batchmean", event_dims: int = 1,
    logvar_clamp: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(reparameterize(mu, lv, seed=seed), kl_divergence(mu, lv, reduction=reduction, event_dims=event_dims))``
    with ``lv = clamp_logvar(logvar, logvar_clamp)`` (``torch.clamp``, its gradient included): the last
    ``event_dims`` dims form one sample (torch.distributions' ``Independent`` convention). Differentiable by
    autograd."""
    logvar = clamp_logvar(logvar, logvar_clamp)
    return (reparameterize(mu, logvar, seed=seed),
            kl_divergence(mu, logvar, reduction=reduction, event_dims=event_dims))


def reparameterize_kl_backward(
    grad_z: Tensor | None, grad_kl: Tensor | None, mu: Tensor, logvar: Tensor, seed: Tensor | int | None, reduction: str
) -> tuple[Tensor, Tensor]:
    """Gradients of ``reparameterize_kl`` with ``eps`` recomputed from ``seed``:

    ``d/dmu = g_z + g_kl * mu``;
    ``d/dlogvar = g_z * eps * exp(logvar / 2) / 2 + g_kl * (exp(logvar) - 1) / 2``,
    where ``g_kl`` is ``grad_kl`` broadcast back over the reduction. Either gradient may be None.
    """
    acc = accumulation_dtype(mu.dtype)
    mu_acc, logvar_acc = mu.to(acc), logvar.to(acc)
    grad_mu = torch.zeros_like(mu_acc)
    grad_logvar = torch.zeros_like(mu_acc)
    if grad_z is not None:
        eps = philox_randn(seed, mu.shape, mu.device).to(acc)
        g_z = grad_z.to(acc)
        grad_mu = grad_mu + g_z
        grad_logvar = grad_logvar + g_z * eps * torch.exp(logvar_acc / 2) / 2
    if grad_kl is not None:
        g_kl = expand_reduced_grad(grad_kl.to(acc), reduction, mu.shape, LATENT_DIMS)
        grad_mu = grad_mu + g_kl * mu_acc
        grad_logvar = grad_logvar + g_kl * (torch.exp(logvar_acc) - 1) / 2
    return grad_mu.to(mu.dtype), grad_logvar.to(mu.dtype)


def clamp_logvar(logvar: Tensor, logvar_clamp: tuple[float, float] | None) -> Tensor:
    """``torch.clamp(logvar, lo, hi)`` for ``logvar_clamp = (lo, hi)``; ``logvar`` itself for None."""
    return logvar if logvar_clamp is None else torch.clamp(logvar, logvar_clamp[0], logvar_clamp[1])


def clamp_logvar_grad(grad_logvar: Tensor, logvar: Tensor, logvar_clamp: tuple[float, float] | None) -> Tensor:
    """torch.clamp's gradient: ``grad_logvar`` where ``lo <= logvar <= hi``, zero elsewhere."""
    if logvar_clamp is None:
        return grad_logvar
    inside = (logvar >= logvar_clamp[0]) & (logvar <= logvar_clamp[1])
    return torch.where(inside, grad_logvar, torch.zeros_like(grad_logvar))

"""Spec of ``moments``, ``renormalize`` and ``variance_law``: per-dimension statistics over a dim."""
from __future__ import annotations

import torch
from torch import Tensor

from .reduce import accumulation_dtype

__all__ = ["RENORMALIZE_MODES", "moments", "renormalize", "renormalize_from_moments", "scalar_renormalization",
           "variance_law", "moments_backward", "renormalize_backward", "variance_law_backward"]


def _rows(z: Tensor, dim: int) -> Tensor:
    """``z`` with ``dim`` moved to the front and the rest flattened: ``(N, F)``."""
    return z.movedim(dim, 0).reshape(z.shape[dim], -1)


def moments(z: Tensor, dim: int = 0, correction: int = 0) -> tuple[Tensor, Tensor]:
    """Per-dimension ``mean`` and ``var`` of ``z`` over ``dim`` (the batch): two tensors of ``z``'s shape
    without ``dim``, in the accumulation dtype. ``var = sum((z - mean)^2) / (N - correction)``.

    Two passes (the mean first) with the corrected sum of squares ``sum(c^2) - sum(c)^2 / N``,
    ``c = z - mean``: the second term takes out the rounding error of ``mean``, which would otherwise
    add its square to every deviation, so it is exact to rounding when ``|mean| >> std``.
    """
    acc = accumulation_dtype(z.dtype)
    rows = _rows(z, dim).to(acc)
    n = rows.shape[0]
    mean = rows.mean(dim=0)
    centered = rows - mean
    sum_sq = (centered * centered).sum(dim=0) - centered.sum(dim=0) ** 2 / n
    var = sum_sq / max(n - correction, 0)
    out_shape = z.shape[:dim % z.dim()] + z.shape[dim % z.dim() + 1:]
    return mean.reshape(out_shape), var.reshape(out_shape)


RENORMALIZE_MODES = ("per_dim", "scalar")


def renormalize(
    z: Tensor,
    target_mean: Tensor | float = 0.0,
    target_var: Tensor | float = 1.0,
    *,
    dim: int = 0,
    mode: str = "per_dim",
    eps: float = 1e-6,
) -> Tensor:
    """Rescale ``z`` so that its moments over ``dim`` match the targets; shape and dtype of ``z``.

    ``per_dim``: ``z' = (z - mean) / sqrt(var + eps) * sqrt(target_var) + target_mean``, with the
    targets scalars or tensors of the per-dimension shape. ``scalar`` (the authors' code):
    ``z' = z * sqrt(mean(target_var)) / mean(sqrt(var + eps))``, one factor for all dimensions, no shift.
    Differentiable in ``z`` through ``mean`` and ``var`` (population variance, correction 0).
    """
    mean, var = moments(z, dim=dim)
    return renormalize_from_moments(z, mean, var, target_mean, target_var, dim=dim, mode=mode, eps=eps)


def renormalize_from_moments(
    z: Tensor,
    mean: Tensor,
    var: Tensor,
    target_mean: Tensor | float = 0.0,
    target_var: Tensor | float = 1.0,
    *,
    dim: int = 0,
    mode: str = "per_dim",
    eps: float = 1e-6,
) -> Tensor:
    """``renormalize`` with ``(mean, var) = moments(z, dim=dim)`` given."""
    acc = accumulation_dtype(z.dtype)
    z_acc = z.to(acc)
    mean, var = mean.to(acc).unsqueeze(dim), var.to(acc).unsqueeze(dim)
    target_mean = torch.as_tensor(target_mean, dtype=acc, device=z.device)
    target_var = torch.as_tensor(target_var, dtype=acc, device=z.device)
    if mode == "per_dim":
        if target_mean.dim() > 0:
            target_mean = target_mean.unsqueeze(dim)
        if target_var.dim() > 0:
            target_var = target_var.unsqueeze(dim)
        out = (z_acc - mean) / torch.sqrt(var + eps) * torch.sqrt(target_var) + target_mean
    elif mode == "scalar":
        out = z_acc * scalar_renormalization(var, target_var, eps)[0]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return out.to(z.dtype)


def scalar_renormalization(var: Tensor, target_var: Tensor | float, eps: float = 1e-6) -> Tensor:
    """``(factor, S)`` of the ``scalar`` mode, ``S = mean(sqrt(var + eps))`` over the dimensions and
    ``factor = sqrt(mean(target_var)) / S``: a ``(2,)`` tensor in ``var``'s dtype."""
    target_var = torch.as_tensor(target_var, dtype=var.dtype, device=var.device)
    mean_sd = torch.sqrt(var + eps).mean()
    return torch.stack([torch.sqrt(target_var.mean()) / mean_sd, mean_sd])


def variance_law(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of the aggregate posterior per latent dimension, over all leading dims of ``(..., D)``:

    ``mean = E[mu]`` and ``var = Var(mu) + E[exp(logvar)]`` (the law of total variance); two ``(D,)``
    tensors in the accumulation dtype.
    """
    acc = accumulation_dtype(mu.dtype)
    mu_rows = mu.reshape(-1, mu.shape[-1])
    mean, var_mu = moments(mu_rows, dim=0)
    mean_sigma2 = torch.exp(logvar.reshape(-1, logvar.shape[-1]).to(acc)).mean(dim=0)
    return mean, var_mu + mean_sigma2


def moments_backward(
    grad_mean: Tensor | None, grad_var: Tensor | None, z: Tensor, mean: Tensor, dim: int = 0, correction: int = 0
) -> Tensor:
    """Gradient of ``moments``: ``d/dz = g_mean / N + g_var * 2 (z - mean) / (N - correction)``, with the
    per-dimension gradients broadcast over ``dim``. Either may be None."""
    acc = accumulation_dtype(z.dtype)
    n = z.shape[dim]
    grad = torch.zeros(z.shape, dtype=acc, device=z.device)
    if grad_mean is not None:
        grad = grad + grad_mean.to(acc).unsqueeze(dim) / n
    if grad_var is not None:
        grad = grad + grad_var.to(acc).unsqueeze(dim) * 2 * (z.to(acc) - mean.to(acc).unsqueeze(dim)) / (n - correction)
    return grad.to(z.dtype)


def renormalize_backward(
    grad: Tensor, z: Tensor, mean: Tensor, var: Tensor, target_var: Tensor | float = 1.0, *,
    dim: int = 0, mode: str = "per_dim", eps: float = 1e-6,
) -> Tensor:
    """Gradient of ``renormalize`` in ``z`` (the targets are constants), from its moments over ``dim``:

    ``per_dim`` (batch norm's backward): with ``r = 1 / sqrt(var + eps)``, ``zhat = (z - mean) r``,
    ``d/dz = r sqrt(target_var) (g - mean(g) - zhat mean(g zhat))``, means over ``dim``;
    ``scalar``: with ``S = mean(sqrt(var + eps))`` over the dimensions (``F`` of them),
    ``c = sqrt(mean(target_var)) / S``,
    ``d/dz = c g - c sum(g z) / (S F N) (z - mean) / sqrt(var + eps)``, the sum over all elements.
    """
    acc = accumulation_dtype(z.dtype)
    g, z_acc = grad.to(acc), z.to(acc)
    mean, var = mean.to(acc).unsqueeze(dim), var.to(acc).unsqueeze(dim)
    target_var = torch.as_tensor(target_var, dtype=acc, device=z.device)
    if mode == "per_dim":
        if target_var.dim() > 0:
            target_var = target_var.unsqueeze(dim)
        rstd = 1 / torch.sqrt(var + eps)
        zhat = (z_acc - mean) * rstd
        mean_g = g.mean(dim=dim, keepdim=True)
        mean_gy = (g * zhat).mean(dim=dim, keepdim=True)
        out = rstd * torch.sqrt(target_var) * (g - mean_g - zhat * mean_gy)
    elif mode == "scalar":
        sd = torch.sqrt(var + eps)
        factor, mean_sd = scalar_renormalization(var, target_var, eps)
        n_total = z.numel()  # F * N
        out = factor * g - factor * (g * z_acc).sum() / (mean_sd * n_total) * (z_acc - mean) / sd
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return out.to(z.dtype)


def variance_law_backward(
    grad_mean: Tensor | None, grad_var: Tensor | None, mu: Tensor, logvar: Tensor, mean: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``variance_law`` over the ``N = numel / D`` rows of ``(..., D)``:
    ``d/dmu = g_mean / N + g_var * 2 (mu - mean) / N`` and ``d/dlogvar = g_var * exp(logvar) / N``."""
    D = mu.shape[-1]
    grad_mu = moments_backward(grad_mean, grad_var, mu.reshape(-1, D), mean, dim=0).reshape(mu.shape)
    if grad_var is None:
        return grad_mu, torch.zeros_like(logvar)
    acc = accumulation_dtype(logvar.dtype)
    grad_logvar = grad_var.to(acc) * torch.exp(logvar.to(acc)) / (logvar.numel() // D)
    return grad_mu, grad_logvar.to(logvar.dtype)

"""Reparameterized sampling and the closed-form KL divergence: ``reparameterize_kl``, ``reparameterize``,
``kl_divergence``.

Registered as the custom ops ``fastvae::reparameterize_kl``, ``fastvae::reparameterize`` and
``fastvae::kl_divergence`` (one backward op serves all three). The noise is Philox with the seed
as a one-element int64 tensor: the backward recomputes it, and only ``mu``, ``logvar`` and the seed
are saved for backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ._checks import REDUCTIONS, check_choice, check_finite, check_float_tensor, check_same_layout, seed_tensor
from ._layout import as_rows


# ---------------------------------------------------------------------------------------- dispatch
def _forward(mu: Tensor, logvar: Tensor, seed: Optional[Tensor], reduction: Optional[str]):
    """``(z, kl)``, either None when not asked for (no seed, no reduction)."""
    if backend.decide(mu) == "torch":
        z = reference.reparameterize(mu, logvar, seed=seed) if seed is not None else None
        kl = reference.kl_divergence(mu, logvar, reduction=reduction) if reduction is not None else None
        return z, kl
    D = mu.shape[-1]
    z, kl = backend.kernels().reparameterize.forward(as_rows(mu, D), as_rows(logvar, D), seed, reduction)
    if z is not None:
        z = z.view(mu.shape)
    if kl is not None:
        kl = kl.view(_kl_shape(mu, reduction))
    return z, kl


def _backward(grad_z: Optional[Tensor], grad_kl: Optional[Tensor], mu: Tensor, logvar: Tensor, seed: Optional[Tensor], reduction: str, backend_name: str):
    """The gradients on ``backend_name``: the backend that the forward ran on."""
    if backend_name == "torch":
        return reference.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, seed, reduction)
    D = mu.shape[-1]
    if grad_kl is not None:
        grad_kl = as_rows(grad_kl, D) if reduction == "none" else grad_kl.reshape(-1)
    grad_mu, grad_logvar = backend.kernels().reparameterize.backward(
        as_rows(grad_z, D) if grad_z is not None else None, grad_kl, as_rows(mu, D), as_rows(logvar, D), seed, reduction
    )
    return grad_mu.view(mu.shape), grad_logvar.view(mu.shape)


def _kl_shape(mu: Tensor, reduction: str) -> torch.Size:
    if reduction == "none":
        return mu.shape
    if reduction == "per_sample":
        return mu.shape[:-1]
    return torch.Size()


def _kl_like(mu: Tensor, reduction: str) -> Tensor:
    dtype = mu.dtype if reduction == "none" else reference.accumulation_dtype(mu.dtype)
    return mu.new_empty(_kl_shape(mu, reduction), dtype=dtype)


# ------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastvae::reparameterize_kl", mutates_args=())
def _reparameterize_kl_op(mu: Tensor, logvar: Tensor, seed: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    return _forward(mu, logvar, seed, reduction)


@torch.library.custom_op("fastvae::reparameterize", mutates_args=())
def _reparameterize_op(mu: Tensor, logvar: Tensor, seed: Tensor) -> Tensor:
    return _forward(mu, logvar, seed, None)[0]


@torch.library.custom_op("fastvae::kl_divergence", mutates_args=())
def _kl_divergence_op(mu: Tensor, logvar: Tensor, reduction: str) -> Tensor:
    return _forward(mu, logvar, None, reduction)[1]


@torch.library.custom_op("fastvae::reparameterize_kl_backward", mutates_args=())
def _backward_op(
    grad_z: Optional[Tensor], grad_kl: Optional[Tensor], mu: Tensor, logvar: Tensor, seed: Optional[Tensor], reduction: str,
    backend_name: str,
) -> tuple[Tensor, Tensor]:
    return _backward(grad_z, grad_kl, mu, logvar, seed, reduction, backend_name)


@_reparameterize_kl_op.register_fake
def _(mu, logvar, seed, reduction):
    return mu.new_empty(mu.shape), _kl_like(mu, reduction)


@_reparameterize_op.register_fake
def _(mu, logvar, seed):
    return mu.new_empty(mu.shape)


@_kl_divergence_op.register_fake
def _(mu, logvar, reduction):
    return _kl_like(mu, reduction)


@_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, seed, reduction, backend_name):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape)


def _setup_reparameterize_kl(ctx, inputs, output):
    mu, logvar, seed, reduction = inputs
    ctx.save_for_backward(mu, logvar, seed)
    ctx.reduction = reduction
    ctx.backend = backend.decide(mu)  # runs right after the forward, in its backend state


def _setup_reparameterize(ctx, inputs, output):
    mu, logvar, seed = inputs
    ctx.save_for_backward(mu, logvar, seed)
    ctx.backend = backend.decide(mu)


def _setup_kl_divergence(ctx, inputs, output):
    mu, logvar, reduction = inputs
    ctx.save_for_backward(mu, logvar)
    ctx.reduction = reduction
    ctx.backend = backend.decide(mu)


def _reparameterize_kl_grad(ctx, grad_z, grad_kl):
    mu, logvar, seed = ctx.saved_tensors
    grad_mu, grad_logvar = _backward_op(grad_z, grad_kl, mu, logvar, seed, ctx.reduction, ctx.backend)
    return grad_mu, grad_logvar, None, None


def _reparameterize_grad(ctx, grad_z):
    mu, logvar, seed = ctx.saved_tensors
    grad_mu, grad_logvar = _backward_op(grad_z, None, mu, logvar, seed, "none", ctx.backend)
    return grad_mu, grad_logvar, None


def _kl_divergence_grad(ctx, grad_kl):
    mu, logvar = ctx.saved_tensors
    grad_mu, grad_logvar = _backward_op(None, grad_kl, mu, logvar, None, ctx.reduction, ctx.backend)
    return grad_mu, grad_logvar, None


_reparameterize_kl_op.register_autograd(_reparameterize_kl_grad, setup_context=_setup_reparameterize_kl)
_reparameterize_op.register_autograd(_reparameterize_grad, setup_context=_setup_reparameterize)
_kl_divergence_op.register_autograd(_kl_divergence_grad, setup_context=_setup_kl_divergence)


# ------------------------------------------------------------------------------------- public API
def _check_latents(op: str, mu: Tensor, logvar: Tensor) -> None:
    check_float_tensor(op, "mu", mu)
    check_float_tensor(op, "logvar", logvar)
    check_same_layout(op, ("mu", "logvar"), mu, logvar)
    check_finite(op, mu=mu, logvar=logvar)


def reparameterize_kl(
    mu: Tensor, logvar: Tensor, *, seed: int | Tensor | None = None, reduction: str = "batchmean"
) -> tuple[Tensor, Tensor]:
    r"""Sample ``z ~ N(mu, exp(logvar))`` by reparameterization and compute its KL to ``N(0, I)``, in one pass.

    .. math::
        z = \mu + e^{\log\sigma^2 / 2} \epsilon, \quad \epsilon \sim N(0, 1) \\
        KL = \tfrac12 (\mu^2 + e^{\log\sigma^2} - \log\sigma^2 - 1)

    Args:
        mu, logvar: ``(..., D)``, same shape, dtype (float16, bfloat16, float32, float64) and device;
            either may be a strided view, such as the halves of ``h.chunk(2, dim=-1)``.
        seed: Philox seed (int or one-element integer tensor). Element ``i`` of the flattened ``z``
            uses ``tl.randn(seed, i)``; the same seed gives the same ``z`` on every backend. ``None``
            draws a seed from torch's generator for the device (``torch.manual_seed`` reproduces it).
        reduction: ``none`` (KL of ``mu``'s shape and dtype), ``per_sample`` (sum over D: ``(...)``),
            ``batchmean`` (total / ``numel // D``) or ``sum``; reduced KL is float32 for half inputs.

    Returns:
        ``(z, kl)``: ``z`` of ``mu``'s shape and dtype, and the reduced KL.

    The backward recomputes ``eps`` from the seed; only ``mu``, ``logvar`` and the seed are saved.

    Example::

        >>> h = encoder(x)                        # (N, 2 * D)
        >>> mu, logvar = h.chunk(2, dim=-1)
        >>> z, kl = fastvae.reparameterize_kl(mu, logvar)
    """
    op = "reparameterize_kl"
    _check_latents(op, mu, logvar)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    return torch.ops.fastvae.reparameterize_kl(mu, logvar, seed_tensor(op, seed, mu.device), reduction)


def reparameterize(mu: Tensor, logvar: Tensor, *, seed: int | Tensor | None = None) -> Tensor:
    """``z = mu + exp(logvar / 2) * eps``: the sample of ``reparameterize_kl`` alone (same seed, same ``z``)."""
    op = "reparameterize"
    _check_latents(op, mu, logvar)
    return torch.ops.fastvae.reparameterize(mu, logvar, seed_tensor(op, seed, mu.device))


def kl_divergence(mu: Tensor, logvar: Tensor, *, reduction: str = "batchmean") -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))``: the KL of ``reparameterize_kl`` alone, same reductions."""
    op = "kl_divergence"
    _check_latents(op, mu, logvar)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    return torch.ops.fastvae.kl_divergence(mu, logvar, reduction)

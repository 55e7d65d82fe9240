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
from . import _cpu, _eager
from ._checks import (
    REDUCTIONS, check_choice, check_event_dims, check_finite, check_float_tensor, check_logvar_clamp, check_same_layout,
    seed_tensor,
)

try:
    from ..kernels import reparameterize as kernels_reparameterize
except Exception as error:  # noqa: BLE001 - no Triton, or one the kernels cannot use: the CPU engine runs the op
    kernels_reparameterize = backend.kernels_unavailable(error)

Clamp = Optional[list[float]]


# ---------------------------------------------------------------------------------------- dispatch
# The custom ops take the latents in their own shape and strides with ``event_dims`` (the trailing dims of
# one sample). The kernels read them in place (the halves of chunk(2, dim=1) of a contiguous or
# channels_last encoder output included) and write z, the elementwise KL and the gradients in mu's
# memory format (``torch.empty_like(mu)``), which the fake implementations state too.
def _sample_shape(mu: Tensor, event_dims: int) -> torch.Size:
    return mu.shape[: mu.dim() - event_dims]


def _forward(mu: Tensor, logvar: Tensor, seed: Optional[Tensor], reduction: Optional[str], logvar_clamp: Clamp = None,
             event_dims: int = 1):
    """``(z, kl)``, either None when not asked for (no seed, no reduction)."""
    if backend.decide(mu) == "torch":
        return _cpu.reparameterize_kl_events(mu, logvar, seed, reduction, logvar_clamp, event_dims)
    if kernels_reparameterize.reads_in_place(event_dims, mu, logvar):
        return kernels_reparameterize.forward(mu, logvar, seed, reduction, logvar_clamp, event_dims)
    # strides the kernel cannot index (more than 3 sample or 2 event dims after merging): contiguous copies
    z, kl = kernels_reparameterize.forward(mu.contiguous(), logvar.contiguous(), seed, reduction, logvar_clamp,
                                           event_dims)
    return (None if z is None else _cpu.in_format(z, mu)), (_cpu.in_format(kl, mu) if reduction == "none" else kl)


def _backward(grad_z: Optional[Tensor], grad_kl: Optional[Tensor], mu: Tensor, logvar: Tensor, seed: Optional[Tensor],
              reduction: str, backend_name: str, logvar_clamp: Clamp = None, event_dims: int = 1):
    """The gradients on ``backend_name`` (the backend that the forward ran on), in mu's memory format."""
    if backend_name == "torch":
        return _cpu.reparameterize_kl_events_backward(grad_z, grad_kl, mu, logvar, seed, reduction, logvar_clamp,
                                                      event_dims)
    operands = [t for t in (mu, logvar, grad_z, grad_kl if reduction == "none" else None) if t is not None]
    if kernels_reparameterize.reads_in_place(event_dims, *operands):
        return kernels_reparameterize.backward(grad_z, grad_kl, mu, logvar, seed, reduction, logvar_clamp, event_dims)
    grad_z = None if grad_z is None else grad_z.contiguous()
    grad_kl = None if grad_kl is None else grad_kl.contiguous()
    grad_mu, grad_logvar = kernels_reparameterize.backward(grad_z, grad_kl, mu.contiguous(), logvar.contiguous(), seed,
                                                           reduction, logvar_clamp, event_dims)
    return _cpu.in_format(grad_mu, mu), _cpu.in_format(grad_logvar, mu)


def _kl_shape(mu: Tensor, reduction: str, event_dims: int = 1) -> torch.Size:
    if reduction == "none":
        return mu.shape
    if reduction == "per_sample":
        return _sample_shape(mu, event_dims)
    return torch.Size()


def _kl_like(mu: Tensor, reduction: str, event_dims: int = 1) -> Tensor:
    if reduction == "none":
        return torch.empty_like(mu)
    return mu.new_empty(_kl_shape(mu, reduction, event_dims), dtype=reference.accumulation_dtype(mu.dtype))


# ------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastvae::reparameterize_kl", mutates_args=())
def _reparameterize_kl_op(mu: Tensor, logvar: Tensor, seed: Tensor, reduction: str, logvar_clamp: Clamp = None,
                          event_dims: int = 1) -> tuple[Tensor, Tensor]:
    return _forward(mu, logvar, seed, reduction, logvar_clamp, event_dims)


@torch.library.custom_op("fastvae::reparameterize", mutates_args=())
def _reparameterize_op(mu: Tensor, logvar: Tensor, seed: Tensor, logvar_clamp: Clamp = None,
                       event_dims: int = 1) -> Tensor:
    return _forward(mu, logvar, seed, None, logvar_clamp, event_dims)[0]


@torch.library.custom_op("fastvae::kl_divergence", mutates_args=())
def _kl_divergence_op(mu: Tensor, logvar: Tensor, reduction: str, logvar_clamp: Clamp = None,
                      event_dims: int = 1) -> Tensor:
    return _forward(mu, logvar, None, reduction, logvar_clamp, event_dims)[1]


@torch.library.custom_op("fastvae::reparameterize_kl_backward", mutates_args=())
def _backward_op(
    grad_z: Optional[Tensor], grad_kl: Optional[Tensor], mu: Tensor, logvar: Tensor, seed: Optional[Tensor],
    reduction: str, backend_name: str, logvar_clamp: Clamp = None, event_dims: int = 1,
) -> tuple[Tensor, Tensor]:
    return _backward(grad_z, grad_kl, mu, logvar, seed, reduction, backend_name, logvar_clamp, event_dims)


@_reparameterize_kl_op.register_fake
def _(mu, logvar, seed, reduction, logvar_clamp=None, event_dims=1):
    return torch.empty_like(mu), _kl_like(mu, reduction, event_dims)


@_reparameterize_op.register_fake
def _(mu, logvar, seed, logvar_clamp=None, event_dims=1):
    return torch.empty_like(mu)


@_kl_divergence_op.register_fake
def _(mu, logvar, reduction, logvar_clamp=None, event_dims=1):
    return _kl_like(mu, reduction, event_dims)


@_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, seed, reduction, backend_name, logvar_clamp=None, event_dims=1):
    return torch.empty_like(mu), torch.empty_like(mu)


def _setup_reparameterize_kl(ctx, inputs, output):
    mu, logvar, seed, reduction, logvar_clamp, event_dims = inputs
    ctx.save_for_backward(mu, logvar, seed)
    ctx.reduction, ctx.logvar_clamp, ctx.event_dims = reduction, logvar_clamp, event_dims
    ctx.backend = backend.decide(mu)  # runs right after the forward, in its backend state


def _setup_reparameterize(ctx, inputs, output):
    mu, logvar, seed, logvar_clamp, event_dims = inputs
    ctx.save_for_backward(mu, logvar, seed)
    ctx.logvar_clamp, ctx.event_dims = logvar_clamp, event_dims
    ctx.backend = backend.decide(mu)


def _setup_kl_divergence(ctx, inputs, output):
    mu, logvar, reduction, logvar_clamp, event_dims = inputs
    ctx.save_for_backward(mu, logvar)
    ctx.reduction, ctx.logvar_clamp, ctx.event_dims = reduction, logvar_clamp, event_dims
    ctx.backend = backend.decide(mu)


def _reparameterize_kl_grad(ctx, grad_z, grad_kl):
    mu, logvar, seed = ctx.saved_tensors
    grad_mu, grad_logvar = _backward_op(grad_z, grad_kl, mu, logvar, seed, ctx.reduction, ctx.backend, ctx.logvar_clamp,
                                        ctx.event_dims)
    return grad_mu, grad_logvar, None, None, None, None


def _reparameterize_grad(ctx, grad_z):
    mu, logvar, seed = ctx.saved_tensors
    grad_mu, grad_logvar = _backward_op(grad_z, None, mu, logvar, seed, "none", ctx.backend, ctx.logvar_clamp,
                                        ctx.event_dims)
    return grad_mu, grad_logvar, None, None, None


def _kl_divergence_grad(ctx, grad_kl):
    mu, logvar = ctx.saved_tensors
    grad_mu, grad_logvar = _backward_op(None, grad_kl, mu, logvar, None, ctx.reduction, ctx.backend, ctx.logvar_clamp,
                                        ctx.event_dims)
    return grad_mu, grad_logvar, None, None, None


_reparameterize_kl_op.register_autograd(_reparameterize_kl_grad, setup_context=_setup_reparameterize_kl)
_reparameterize_op.register_autograd(_reparameterize_grad, setup_context=_setup_reparameterize)
_kl_divergence_op.register_autograd(_kl_divergence_grad, setup_context=_setup_kl_divergence)


# ------------------------------------------------------------------------------------- public API
def _check_latents(op: str, mu: Tensor, logvar: Tensor, event_dims: int, logvar_clamp) -> Clamp:
    check_float_tensor(op, "mu", mu)
    check_float_tensor(op, "logvar", logvar)
    check_same_layout(op, ("mu", "logvar"), mu, logvar)
    check_event_dims(op, event_dims, mu.dim())
    clamp = check_logvar_clamp(op, logvar_clamp)
    check_finite(op, mu=mu, logvar=logvar)
    return clamp


def reparameterize_kl(
    mu: Tensor, logvar: Tensor, *, seed: int | Tensor | None = None, reduction: str = "batchmean",
    event_dims: int = 1, logvar_clamp: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Sample ``z ~ N(mu, exp(logvar))`` by reparameterization and compute its KL to ``N(0, I)``, in one pass.

    .. math::
        z = \mu + e^{\log\sigma^2 / 2} \epsilon, \quad \epsilon \sim N(0, 1) \\
        KL = \tfrac12 (\mu^2 + e^{\log\sigma^2} - \log\sigma^2 - 1)

    Args:
        mu, logvar: ``(*, E_1, ..., E_k)``, same shape, dtype (float16, bfloat16, float32, float64) and
            device; either may be a strided view, such as the halves of ``h.chunk(2, dim=-1)`` or of
            ``h.chunk(2, dim=1)`` for a latent-diffusion ``(B, 2C, H, W)`` encoder output.
        seed: Philox seed (int or one-element integer tensor). Element ``i`` of the flattened ``z``
            uses ``tl.randn(seed, i)``; the same seed gives the same ``z`` on every backend and for
            every memory layout. ``None`` draws a seed from torch's generator for the device
            (``torch.manual_seed`` reproduces it).
        reduction: ``none`` (KL of ``mu``'s shape and dtype), ``per_sample`` (sum over the event dims:
            shape ``mu.shape[:-event_dims]``), ``batchmean`` (total / ``prod(mu.shape[:-event_dims])``)
            or ``sum``; reduced KL is float32 for half inputs.
        event_dims: the number of trailing dims that form one sample's latent (``k`` above;
            torch.distributions' ``Independent`` convention): 1 for ``(N, D)``, 3 for a ``(B, C, H, W)``
            latent, whose ``per_sample`` KL is diffusers' ``posterior.kl()``.
        logvar_clamp: ``(lo, hi)`` or None: ``logvar`` is clamped to ``[lo, hi]`` inside the op (diffusers
            uses ``(-30, 20)``), with torch.clamp's gradient (zero outside the range).

    Returns:
        ``(z, kl)``: ``z`` of ``mu``'s shape, dtype and memory format (a channels_last ``mu`` gives a
        channels_last ``z``; so do the gradients), and the reduced KL.

    The backward recomputes ``eps`` from the seed; only ``mu``, ``logvar`` and the seed are saved.

    Example::

        >>> h = encoder(x)                        # (N, 2 * D)
        >>> mu, logvar = h.chunk(2, dim=-1)
        >>> z, kl = fastvae.reparameterize_kl(mu, logvar)
        >>> mean, logvar = vae_encoder(x).chunk(2, dim=1)    # (B, C, H, W) each
        >>> z, kl = fastvae.reparameterize_kl(mean, logvar, event_dims=3, logvar_clamp=(-30.0, 20.0))
    """
    op = "reparameterize_kl"
    clamp = _check_latents(op, mu, logvar, event_dims, logvar_clamp)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    seed = seed_tensor(op, seed, mu.device)
    route = _eager.route("reparameterize_kl", mu, logvar) or torch.ops.fastvae.reparameterize_kl
    return route(mu, logvar, seed, reduction, clamp, event_dims)


def reparameterize(
    mu: Tensor, logvar: Tensor, *, seed: int | Tensor | None = None, event_dims: int = 1,
    logvar_clamp: tuple[float, float] | None = None,
) -> Tensor:
    """``z = mu + exp(logvar / 2) * eps``: the sample of ``reparameterize_kl`` alone (same seed, same ``z``;
    ``event_dims`` only decides the layout the kernel reads, never the values)."""
    op = "reparameterize"
    clamp = _check_latents(op, mu, logvar, event_dims, logvar_clamp)
    seed = seed_tensor(op, seed, mu.device)
    return (_eager.route("reparameterize", mu, logvar) or torch.ops.fastvae.reparameterize)(
        mu, logvar, seed, clamp, event_dims)


def kl_divergence(
    mu: Tensor, logvar: Tensor, *, reduction: str = "batchmean", event_dims: int = 1,
    logvar_clamp: tuple[float, float] | None = None,
) -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))``: the KL of ``reparameterize_kl`` alone, same reductions,
    ``event_dims`` and ``logvar_clamp``."""
    op = "kl_divergence"
    clamp = _check_latents(op, mu, logvar, event_dims, logvar_clamp)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    route = _eager.route("kl_divergence", mu, logvar) or torch.ops.fastvae.kl_divergence
    return route(mu, logvar, reduction, clamp, event_dims)

"""The moments of the aggregate posterior (the law of total variance): ``variance_law``, the op
``fastvae::variance_law``, on the moments kernels with ``HAS_LOGVAR``.

Saved for backward: ``mu``, ``logvar`` and the mean.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend
from . import engine
from ._op import Op

try:
    from ..kernels import moments as kernels_moments
except Exception as error:  # noqa: BLE001 - no Triton, or one the kernels cannot use: the engine runs the op
    kernels_moments = backend.kernels_unavailable(error)
from ._checks import check_dims, check_finite, check_float_tensor, check_same_layout
from ._layout import reduced_first, slab
from .moments import flat, stat_like

__all__ = ["variance_law"]


# ------------------------------------------------------------------------------------ declaration
def _engine(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """``(E[mu], Var(mu) + E[exp(logvar)])`` over the rows of ``(..., D)``."""
    return engine.variance_law(mu, logvar)


def _kernel(mu, logvar):
    mean, var, _ = kernels_moments.moments(slab(mu, None), logvar=slab(logvar, None))
    return mean, var


def _fake(mu, logvar):
    return stat_like(mu, None), stat_like(mu, None)


def _engine_backward(grad_mean, grad_var, mu, logvar, mean, needs):
    return engine.variance_law_backward(grad_mean, grad_var, mu, logvar, mean)


def _kernel_backward(grad_mean, grad_var, mu, logvar, mean, needs):
    grad_mu, grad_logvar = kernels_moments.moments_backward(
        flat(grad_mean), flat(grad_var), slab(mu, None), mean.reshape(-1), correction=0,
        logvar=slab(logvar, None) if needs[1] else None)
    return grad_mu.view(mu.shape), (grad_logvar.view(mu.shape) if grad_logvar is not None else None)


def _backward_fake(grad_mean, grad_var, mu, logvar, mean, needs):
    return mu.new_empty(mu.shape), logvar.new_empty(logvar.shape)


def _examples(n: int, d: int, device: torch.device) -> list[tuple]:
    mu, logvar = (half.requires_grad_() for half in torch.randn(n, 2 * d, device=device).chunk(2, dim=-1))
    return [(mu, logvar), (mu, logvar.detach())]


VARIANCE_LAW = Op("variance_law", _engine, _fake, _engine_backward, outputs=("mean", "var"),
                  saves=("mu", "logvar", "mean"), differentiable=("mu", "logvar"), kernel=_kernel,
                  kernel_backward=_kernel_backward, backward_fake=_backward_fake, examples=_examples,
                  bench=("bench.cases.variance_law",), aot="bench.aot.moments")


# ------------------------------------------------------------------------------------- public API
def variance_law(mu: Tensor, logvar: Tensor, dim: int | tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    r"""Moments of the aggregate posterior per latent dimension (the law of total variance), in one pass.

    .. math::
        \text{mean} = E[\mu], \qquad \text{var} = \operatorname{Var}(\mu) + E[e^{\log\sigma^2}]

    over all leading dims of ``(..., D)`` (population variance). For a trained VAE ``var ~ 1`` per
    dimension (the stationary condition); ``(mean, var)`` is the natural target of ``renormalize``
    for second-stage samples. At most 2 kernel launches.

    Args:
        mu, logvar: ``(..., D)``, same shape, dtype (float16, bfloat16, float32, float64) and device;
            either may be a strided view, such as the halves of ``h.chunk(2, dim=-1)``.
        dim: None (every dim but the last), an int or a tuple of dims to reduce over (as
            ``torch.var_mean``): ``dim=(0, 2, 3)`` gives the per-channel law of ``(B, C, H, W)`` latents.

    Returns:
        ``(mean, var)``: two ``(D,)`` tensors (the shape without ``dim``) in the accumulation dtype. Differentiable:
        ``d/dmu = g_mean / N + g_var 2 (mu - mean) / N``, ``d/dlogvar = g_var exp(logvar) / N``.

    Example::

        >>> mu, logvar = encoder(x).chunk(2, dim=-1)
        >>> mean, var = fastvae.variance_law(mu, logvar)   # two (D,) tensors
    """
    op = "variance_law"
    check_float_tensor(op, "mu", mu)
    check_float_tensor(op, "logvar", logvar)
    check_same_layout(op, ("mu", "logvar"), mu, logvar)
    check_finite(op, mu=mu, logvar=logvar)
    if dim is None:
        return VARIANCE_LAW(mu, logvar)
    dims = check_dims(op, dim, mu.dim())
    dims = dims if isinstance(dims, tuple) else (dims,)
    mu_rows, kept_shape = reduced_first(mu, dims)
    logvar_rows, _ = reduced_first(logvar, dims)
    F = math.prod(kept_shape)
    mean, var = VARIANCE_LAW(mu_rows.reshape(-1, F), logvar_rows.reshape(-1, F))
    return mean.view(kept_shape), var.view(kept_shape)

"""Per-dimension mean and variance over a dim: ``moments``, the op ``fastvae::moments``.

The kernels see the input as an ``(A, N, C)`` view (``_layout.slab``), ``N`` the reduced dim: a tensor whose
dims before and after ``dim`` each flatten without a copy is read in place. Saved for backward: ``z`` and the
mean, nothing else of the input's size.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from . import engine
from ._op import Op

try:
    from ..kernels import moments as kernels_moments
except Exception as error:  # noqa: BLE001 - no Triton, or one the kernels cannot use: the engine runs the op
    kernels_moments = backend.kernels_unavailable(error)
from ._checks import check_correction, check_dims, check_finite, check_float_tensor
from ._layout import reduced_first, slab, stat_shape

__all__ = ["moments"]


# ------------------------------------------------------------------------------------ declaration
def stat_like(t: Tensor, dim: Optional[int]) -> Tensor:
    """An empty per-dimension statistic of ``t`` over ``dim``, in the accumulation dtype."""
    return t.new_empty(stat_shape(t, dim), dtype=reference.accumulation_dtype(t.dtype))


def flat(stat: Optional[Tensor]) -> Optional[Tensor]:
    return stat.reshape(-1) if stat is not None else None


def _engine(z: Tensor, dim: int, correction: int) -> tuple[Tensor, Tensor]:
    return engine.moments(z, dim=dim, correction=correction)


def _kernel(z, dim, correction):
    mean, var, _ = kernels_moments.moments(slab(z, dim), correction=correction)
    shape = stat_shape(z, dim)
    return mean.view(shape), var.view(shape)


def _fake(z, dim, correction):
    return stat_like(z, dim), stat_like(z, dim)


def _engine_backward(grad_mean, grad_var, z, mean, dim, correction, needs):
    """``d/dz = g_mean / N + g_var 2 (z - mean) / (N - correction)``, contiguous as the kernel's (and the fake's)."""
    return engine.moments_backward(grad_mean, grad_var, z, mean, dim, correction).contiguous()


def _kernel_backward(grad_mean, grad_var, z, mean, dim, correction, needs):
    grad_z, _ = kernels_moments.moments_backward(flat(grad_mean), flat(grad_var), slab(z, dim), mean.reshape(-1),
                                                 correction=correction)
    return grad_z.view(z.shape)


def _backward_fake(grad_mean, grad_var, z, mean, dim, correction, needs):
    return z.new_empty(z.shape)


def _examples(n: int, d: int, device: torch.device) -> list[tuple]:
    z = (3.0 + 2.0 * torch.randn(n, d, device=device)).requires_grad_()
    z4 = torch.randn(5, 3, 4, 2, device=device).requires_grad_()
    return [(z, 0, 0), (z4, 1, 1), (z4.transpose(0, 2), 2, 1)]


MOMENTS = Op("moments", _engine, _fake, _engine_backward, outputs=("mean", "var"), saves=("z", "mean"),
             differentiable=("z",), kernel=_kernel, kernel_backward=_kernel_backward, backward_fake=_backward_fake,
             examples=_examples, bench=("bench.cases.moments",), aot="bench.aot.moments")


# ------------------------------------------------------------------------------------- public API
def moments(z: Tensor, dim: int | tuple[int, ...] = 0, correction: int = 0) -> tuple[Tensor, Tensor]:
    r"""Per-dimension mean and variance of ``z`` over ``dim`` (the batch), in one pass.

    .. math::
        \text{mean} = \frac{1}{N} \sum_n z_n, \qquad
        \text{var} = \frac{1}{N - \text{correction}} \sum_n (z_n - \text{mean})^2

    Accumulated in float32 (float64 for float64 inputs) with Welford per tile and Chan's combine, in a
    fixed order (the same bits at every call), on data shifted by its first row: stable when
    ``|mean| >> std``. At most 2 kernel launches.

    Args:
        z: ``(*, N, *)`` of float16, bfloat16, float32 or float64; any strides.
        dim: the dim reduced over (N samples), or a tuple of dims reduced together (as ``torch.var_mean``):
            per-channel statistics of a ``(B, C, H, W)`` latent are ``dim=(0, 2, 3)``.
        correction: ``var`` divides by ``N - correction``; the default 0 is the population variance (the
            ``Var(mu)`` of the stationary condition), unlike ``torch.var``'s default 1 (unbiased): pass
            ``correction=1`` for torch.var's numbers. Must leave ``N - correction > 0``.

    Returns:
        ``(mean, var)``: tensors of ``z``'s shape without ``dim``, in the accumulation dtype.
        Differentiable: ``d mean/dz = 1/N``, ``d var/dz = 2 (z - mean) / (N - correction)``.

    Example::

        >>> mean, var = fastvae.moments(z)                 # z: (N, D) -> two (D,) tensors
        >>> mean, var = fastvae.moments(latents, dim=(0, 2, 3))   # (B, C, H, W) -> two (C,) tensors
    """
    op = "moments"
    check_float_tensor(op, "z", z)
    dim = check_dims(op, dim, z.dim())
    if isinstance(dim, tuple):
        rows, kept_shape = reduced_first(z, dim)
        correction = check_correction(op, correction, rows.shape[0])
        check_finite(op, z=z)
        mean, var = MOMENTS(rows, 0, correction)
        return mean.view(kept_shape), var.view(kept_shape)
    correction = check_correction(op, correction, z.shape[dim])
    if z.shape[dim] == 1:
        warnings.warn(f"{op}: z has one sample along dim {dim}, so every variance is 0", stacklevel=2)
    check_finite(op, z=z)
    return MOMENTS(z, dim, correction)



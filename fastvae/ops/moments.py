"""Per-dimension moments and renormalization: ``moments``, ``renormalize``, ``variance_law``.

Registered as the custom ops ``fastvae::moments``, ``fastvae::variance_law`` (one backward op,
``fastvae::moments_backward``, serves both) and ``fastvae::renormalize`` with
``fastvae::renormalize_backward``. The kernels see every input as an ``(A, N, C)`` view, ``N`` the
reduced dim: a tensor whose dims before and after ``dim`` each flatten without a copy is read in
place. Saved for backward: the inputs and per-dimension statistics, nothing else of the input's size.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from . import _cpu, _eager
from ._checks import (
    check_choice, check_correction, check_dim, check_finite, check_float_tensor, check_per_dim, check_positive,
    check_same_layout,
)
from ._layout import as_rows

try:
    from ..kernels import moments as kernels_moments
except Exception as error:  # noqa: BLE001 - no Triton, or one the kernels cannot use: the CPU engine runs the op
    kernels_moments = backend.kernels_unavailable(error)


# ------------------------------------------------------------------------------------------ layout
def _slab(t: Tensor, dim: Optional[int]) -> Tensor:
    """``t`` as ``(A, N, C)``: ``N`` the size of ``dim``, ``A`` and ``C`` the dims before and after it
    flattened. ``dim=None``: all leading dims of ``(..., D)`` are reduced, ``(1, numel // D, D)``."""
    if dim is None:
        return as_rows(t, t.shape[-1]).unsqueeze(0)
    dim = dim % t.dim()
    n_after = math.prod(t.shape[dim + 1:])
    return as_rows(t, n_after).view(math.prod(t.shape[:dim]), t.shape[dim], n_after)


def _stat_shape(t: Tensor, dim: Optional[int]) -> torch.Size:
    """The shape of a per-dimension statistic: ``t``'s without ``dim`` (``(D,)`` for ``dim=None``)."""
    if dim is None:
        return t.shape[-1:]
    dim = dim % t.dim()
    return t.shape[:dim] + t.shape[dim + 1:]


def _stat_like(t: Tensor, dim: Optional[int]) -> Tensor:
    return t.new_empty(_stat_shape(t, dim), dtype=reference.accumulation_dtype(t.dtype))


def _flat(stat: Optional[Tensor]) -> Optional[Tensor]:
    return stat.reshape(-1) if stat is not None else None


def _target(tensor: Optional[Tensor], value: float) -> Tensor | float:
    return tensor if tensor is not None else value


# ------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastvae::moments", mutates_args=())
def _moments_op(z: Tensor, dim: int, correction: int) -> tuple[Tensor, Tensor]:
    if backend.decide(z) == "torch":
        return _cpu.moments(z, dim=dim, correction=correction)
    mean, var, _ = kernels_moments.moments(_slab(z, dim), correction=correction)
    shape = _stat_shape(z, dim)
    return mean.view(shape), var.view(shape)


@torch.library.custom_op("fastvae::variance_law", mutates_args=())
def _variance_law_op(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    if backend.decide(mu) == "torch":
        return _cpu.variance_law(mu, logvar)
    mean, var, _ = kernels_moments.moments(_slab(mu, None), logvar=_slab(logvar, None))
    return mean, var


@torch.library.custom_op("fastvae::moments_backward", mutates_args=())
def _moments_backward_op(
    grad_mean: Optional[Tensor], grad_var: Optional[Tensor], z: Tensor, mean: Tensor, logvar: Optional[Tensor],
    dim: Optional[int], correction: int, backend_name: str,
) -> tuple[Tensor, Tensor]:
    """``(d/dz, d/dlogvar)`` of ``moments`` over ``dim`` or, with ``dim=None``, of ``variance_law``
    (``z`` is ``mu``), on ``backend_name`` (the forward's). Without ``logvar`` the second is an empty tensor."""
    if backend_name == "torch":
        if dim is not None:
            return _cpu.moments_backward(grad_mean, grad_var, z, mean, dim, correction), z.new_empty(0)
        grad_mu, grad_logvar = _cpu.variance_law_backward(grad_mean, grad_var, z, logvar, mean)
        return grad_mu, (grad_logvar if logvar is not None else z.new_empty(0))
    grad_z, grad_lv = kernels_moments.moments_backward(
        _flat(grad_mean), _flat(grad_var), _slab(z, dim), mean.reshape(-1),
        correction=correction, logvar=_slab(logvar, dim) if logvar is not None else None,
    )
    return grad_z.view(z.shape), (grad_lv.view(z.shape) if grad_lv is not None else z.new_empty(0))


@torch.library.custom_op("fastvae::renormalize", mutates_args=())
def _renormalize_op(
    z: Tensor, target_mean: Optional[Tensor], target_var: Optional[Tensor], target_mean_value: float,
    target_var_value: float, dim: int, mode: str, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z', mean, var, scalars)``: the statistics that the backward needs beside ``z``; ``scalars`` is
    ``(factor, mean(sqrt(var + eps)))`` in scalar mode and empty in per_dim mode. A target is the tensor when
    given, else the value."""
    tm, tv = _target(target_mean, target_mean_value), _target(target_var, target_var_value)
    scalar_mode = mode == "scalar"
    if backend.decide(z) == "torch":
        mean, var = _cpu.moments(z, dim=dim)
        out = _cpu.renormalize_from_moments(z, mean, var, tm, tv, dim=dim, mode=mode, eps=eps)
        scalars = _cpu.scalar_renormalization(var, tv, eps) if scalar_mode else var.new_empty(0)
        return out, mean, var, scalars
    out, mean, var, scalars = kernels_moments.renormalize(
        _slab(z, dim), _flat(tm) if target_mean is not None else tm, _flat(tv) if target_var is not None else tv,
        scalar_mode=scalar_mode, eps=eps,
    )
    shape = _stat_shape(z, dim)
    return out.view(z.shape), mean.view(shape), var.view(shape), scalars


@torch.library.custom_op("fastvae::renormalize_backward", mutates_args=())
def _renormalize_backward_op(
    grad: Tensor, z: Tensor, mean: Tensor, var: Tensor, scalars: Tensor, target_var: Optional[Tensor],
    target_var_value: float, dim: int, mode: str, eps: float, backend_name: str,
) -> Tensor:
    """``d/dz`` on ``backend_name`` (the forward's)."""
    tv = _target(target_var, target_var_value)
    if backend_name == "torch":
        return _cpu.renormalize_backward(grad, z, mean, var, tv, dim=dim, mode=mode, eps=eps)
    grad_z = kernels_moments.renormalize_backward(
        _slab(grad, dim), _slab(z, dim), mean.reshape(-1), var.reshape(-1), scalars,
        _flat(tv) if target_var is not None else tv, scalar_mode=mode == "scalar", eps=eps,
    )
    return grad_z.view(z.shape)


@_moments_op.register_fake
def _(z, dim, correction):
    return _stat_like(z, dim), _stat_like(z, dim)


@_variance_law_op.register_fake
def _(mu, logvar):
    return _stat_like(mu, None), _stat_like(mu, None)


@_moments_backward_op.register_fake
def _(grad_mean, grad_var, z, mean, logvar, dim, correction, backend_name):
    return z.new_empty(z.shape), (logvar.new_empty(logvar.shape) if logvar is not None else z.new_empty(0))


@_renormalize_op.register_fake
def _(z, target_mean, target_var, target_mean_value, target_var_value, dim, mode, eps):
    scalars = z.new_empty(2 if mode == "scalar" else 0, dtype=reference.accumulation_dtype(z.dtype))
    return z.new_empty(z.shape), _stat_like(z, dim), _stat_like(z, dim), scalars


@_renormalize_backward_op.register_fake
def _(grad, z, mean, var, scalars, target_var, target_var_value, dim, mode, eps, backend_name):
    return z.new_empty(z.shape)


def _setup_moments(ctx, inputs, output):
    z, dim, correction = inputs
    ctx.save_for_backward(z, output[0])
    ctx.dim, ctx.correction = dim, correction
    ctx.backend = backend.decide(z)  # runs right after the forward, in its backend state


def _moments_grad(ctx, grad_mean, grad_var):
    z, mean = ctx.saved_tensors
    grad_z, _ = _moments_backward_op(grad_mean, grad_var, z, mean, None, ctx.dim, ctx.correction, ctx.backend)
    return grad_z, None, None


def _setup_variance_law(ctx, inputs, output):
    mu, logvar = inputs
    ctx.save_for_backward(mu, logvar, output[0])
    ctx.backend = backend.decide(mu)


def _variance_law_grad(ctx, grad_mean, grad_var):
    mu, logvar, mean = ctx.saved_tensors
    need_logvar = ctx.needs_input_grad[1]
    grad_mu, grad_logvar = _moments_backward_op(grad_mean, grad_var, mu, mean, logvar if need_logvar else None, None, 0,
                                                ctx.backend)
    return grad_mu, (grad_logvar if need_logvar else None)


def _setup_renormalize(ctx, inputs, output):
    z, _, target_var, _, target_var_value, dim, mode, eps = inputs
    _, mean, var, scalars = output
    ctx.save_for_backward(z, mean, var, scalars, target_var)
    ctx.mark_non_differentiable(mean, var, scalars)
    ctx.target_var_value, ctx.dim, ctx.mode, ctx.eps = target_var_value, dim, mode, eps
    ctx.backend = backend.decide(z)


def _renormalize_grad(ctx, grad, _grad_mean, _grad_var, _grad_scalars):
    z, mean, var, scalars, target_var = ctx.saved_tensors
    grad_z = _renormalize_backward_op(grad, z, mean, var, scalars, target_var, ctx.target_var_value, ctx.dim, ctx.mode,
                                      ctx.eps, ctx.backend)
    return grad_z, None, None, None, None, None, None, None


_moments_op.register_autograd(_moments_grad, setup_context=_setup_moments)
_variance_law_op.register_autograd(_variance_law_grad, setup_context=_setup_variance_law)
_renormalize_op.register_autograd(_renormalize_grad, setup_context=_setup_renormalize)


# ------------------------------------------------------------------------------------- public API
def _reduced_first(t: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, torch.Size]:
    """``t`` with the reduced ``dims`` moved to the front and flattened into one: ``(N, *kept)``, and the
    kept shape. A view when one exists, a copy otherwise (such as dim=(0, 2, 3) of a ``(B, C, H, W)``)."""
    kept = [d for d in range(t.dim()) if d not in dims]
    moved = t.permute(*dims, *kept)
    kept_shape = torch.Size(t.shape[d] for d in kept)
    return moved.reshape(math.prod(t.shape[d] for d in dims), *kept_shape), kept_shape


def _check_dims(op: str, dim: object, ndim: int) -> int | tuple[int, ...]:
    """An int dim, or a tuple of distinct dims (as ``torch.var_mean``), normalized to ``[0, ndim)``;
    a one-element tuple is its int."""
    if not isinstance(dim, (tuple, list)):
        return check_dim(op, dim, ndim)
    dims = tuple(check_dim(op, d, ndim) for d in dim)
    if not dims:
        raise ValueError(f"{op}: dim must name at least one dim, got {tuple(dim)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{op}: dim must not repeat a dim, got {tuple(dim)}")
    return dims[0] if len(dims) == 1 else dims


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
        correction: ``var`` divides by ``N - correction`` (0: population, 1: unbiased); must leave
            ``N - correction > 0``.

    Returns:
        ``(mean, var)``: tensors of ``z``'s shape without ``dim``, in the accumulation dtype.
        Differentiable: ``d mean/dz = 1/N``, ``d var/dz = 2 (z - mean) / (N - correction)``.

    Example::

        >>> mean, var = fastvae.moments(z)                 # z: (N, D) -> two (D,) tensors
        >>> mean, var = fastvae.moments(latents, dim=(0, 2, 3))   # (B, C, H, W) -> two (C,) tensors
    """
    op = "moments"
    check_float_tensor(op, "z", z)
    dim = _check_dims(op, dim, z.dim())
    if isinstance(dim, tuple):
        rows, kept_shape = _reduced_first(z, dim)
        correction = check_correction(op, correction, rows.shape[0])
        check_finite(op, z=z)
        mean, var = (_eager.route("moments", z) or torch.ops.fastvae.moments)(rows, 0, correction)
        return mean.view(kept_shape), var.view(kept_shape)
    correction = check_correction(op, correction, z.shape[dim])
    if z.shape[dim] == 1:
        import warnings

        warnings.warn(f"{op}: z has one sample along dim {dim}, so every variance is 0", stacklevel=2)
    check_finite(op, z=z)
    return (_eager.route("moments", z) or torch.ops.fastvae.moments)(z, dim, correction)


def renormalize(
    z: Tensor,
    target_mean: Tensor | float = 0.0,
    target_var: Tensor | float = 1.0,
    *,
    dim: int = 0,
    mode: str = "per_dim",
    eps: float = 1e-6,
) -> Tensor:
    r"""Rescale ``z`` so that its per-dimension moments over ``dim`` match the targets.

    .. math::
        \texttt{per\_dim}: \quad
        z' = \frac{z - \text{mean}}{\sqrt{\text{var} + \epsilon}} \sqrt{\text{target\_var}} + \text{target\_mean}
        \qquad \texttt{scalar}: \quad
        z' = z \, \frac{\sqrt{\overline{\text{target\_var}}}}{\overline{\sqrt{\text{var} + \epsilon}}}

    with ``mean`` and ``var`` (population) over ``dim`` and the bars means over the dimensions. ``scalar``
    (the authors' code) applies one factor to all dimensions and does not shift: ``target_mean`` is
    not used there. At most 3 kernel launches forward (moments, then the rescaling), at most 3 backward.

    Args:
        z: ``(*, N, *)`` of float16, bfloat16, float32 or float64; any strides.
        target_mean, target_var: numbers, 0-d tensors or tensors of the per-dimension shape (``z``'s
            without ``dim``) on ``z``'s device, such as the output of ``variance_law``. They are constants:
            no gradient flows to them, and a target that requires grad is an error (pass ``.detach()``).
        dim: the dim whose moments are matched (the batch).
        mode: ``per_dim`` or ``scalar``.
        eps: added to ``var`` in both modes (a constant dimension stays finite); must be positive.

    Returns:
        ``z'`` of ``z``'s shape and dtype, differentiable in ``z`` (batch norm's backward in ``per_dim``).
        Saved for backward: ``z``, the per-dimension moments and ``target_var``.

    Example::

        >>> mean, var = fastvae.variance_law(mu, logvar)   # aggregate posterior of the first stage
        >>> z = fastvae.renormalize(second_stage_samples, mean, var)
    """
    op = "renormalize"
    check_float_tensor(op, "z", z)
    dim = check_dim(op, dim, z.dim())
    check_choice(op, "mode", mode, reference.RENORMALIZE_MODES)
    eps = check_positive(op, "eps", eps)
    shape = _stat_shape(z, dim)
    target_mean = check_per_dim(op, "target_mean", target_mean, shape, z.device)
    target_var = check_per_dim(op, "target_var", target_var, shape, z.device, min_value=0.0)
    targets = {name: t for name, t in (("target_mean", target_mean), ("target_var", target_var))
               if isinstance(t, Tensor)}
    for name, t in targets.items():
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: {name} requires grad, but the targets are constants (gradients flow to z only); "
                             f"pass {name}.detach()")
    check_finite(op, z=z, **targets)
    tm_tensor, tv_tensor = targets.get("target_mean"), targets.get("target_var")
    return (_eager.route("renormalize", z) or torch.ops.fastvae.renormalize)(
        z, tm_tensor, tv_tensor, 0.0 if tm_tensor is not None else target_mean,
        0.0 if tv_tensor is not None else target_var,
        dim, mode, eps,
    )[0]


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
        return (_eager.route("variance_law", mu, logvar) or torch.ops.fastvae.variance_law)(mu, logvar)
    dims = _check_dims(op, dim, mu.dim())
    dims = dims if isinstance(dims, tuple) else (dims,)
    mu_rows, kept_shape = _reduced_first(mu, dims)
    logvar_rows, _ = _reduced_first(logvar, dims)
    F = math.prod(kept_shape)
    mean, var = (_eager.route("variance_law", mu, logvar) or torch.ops.fastvae.variance_law)(
        mu_rows.reshape(-1, F), logvar_rows.reshape(-1, F))
    return mean.view(kept_shape), var.view(kept_shape)

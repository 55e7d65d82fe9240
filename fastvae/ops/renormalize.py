"""Renormalization to target moments: ``renormalize``, the op ``fastvae::renormalize``, on the moments kernels.

The op returns ``(z', mean, var, scalars)``: the statistics that the backward needs beside ``z``. Saved for
backward: ``z``, the per-dimension moments, ``scalars`` and ``target_var``.
"""
from __future__ import annotations

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
from ._checks import check_choice, check_dim, check_finite, check_float_tensor, check_per_dim, check_positive
from ._layout import slab, stat_shape
from .moments import flat, stat_like

__all__ = ["renormalize"]


# ------------------------------------------------------------------------------------ declaration
def _target(tensor: Optional[Tensor], value: float) -> Tensor | float:
    return tensor if tensor is not None else value


def _engine(z: Tensor, target_mean: Optional[Tensor], target_var: Optional[Tensor], target_mean_value: float,
            target_var_value: float, dim: int, mode: str, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z', mean, var, scalars)``; ``scalars`` is ``(factor, mean(sqrt(var + eps)))`` in scalar mode and
    empty in per_dim mode. A target is the tensor when given, else the value."""
    tm, tv = _target(target_mean, target_mean_value), _target(target_var, target_var_value)
    mean, var = engine.moments(z, dim=dim)
    out = engine.renormalize_from_moments(z, mean, var, tm, tv, dim=dim, mode=mode, eps=eps)
    scalars = engine.scalar_renormalization(var, tv, eps) if mode == "scalar" else var.new_empty(0)
    return out, mean, var, scalars


def _kernel(z, target_mean, target_var, target_mean_value, target_var_value, dim, mode, eps):
    tm, tv = _target(target_mean, target_mean_value), _target(target_var, target_var_value)
    out, mean, var, scalars = kernels_moments.renormalize(
        slab(z, dim), flat(tm) if target_mean is not None else tm, flat(tv) if target_var is not None else tv,
        scalar_mode=mode == "scalar", eps=eps,
    )
    shape = stat_shape(z, dim)
    return out.view(z.shape), mean.view(shape), var.view(shape), scalars


def _fake(z, target_mean, target_var, target_mean_value, target_var_value, dim, mode, eps):
    scalars = z.new_empty(2 if mode == "scalar" else 0, dtype=reference.accumulation_dtype(z.dtype))
    return z.new_empty(z.shape), stat_like(z, dim), stat_like(z, dim), scalars


def _engine_backward(grad, _grad_mean, _grad_var, _grad_scalars, z, mean, var, scalars, target_var,
                     target_mean_value, target_var_value, dim, mode, eps, needs):
    tv = _target(target_var, target_var_value)
    return engine.renormalize_backward(grad, z, mean, var, tv, dim=dim, mode=mode, eps=eps)


def _kernel_backward(grad, _grad_mean, _grad_var, _grad_scalars, z, mean, var, scalars, target_var,
                     target_mean_value, target_var_value, dim, mode, eps, needs):
    tv = _target(target_var, target_var_value)
    grad_z = kernels_moments.renormalize_backward(
        slab(grad, dim), slab(z, dim), mean.reshape(-1), var.reshape(-1), scalars,
        flat(tv) if target_var is not None else tv, scalar_mode=mode == "scalar", eps=eps,
    )
    return grad_z.view(z.shape)


def _backward_fake(grad, _grad_mean, _grad_var, _grad_scalars, z, *params_and_needs):
    return z.new_empty(z.shape)


def _examples(n: int, d: int, device: torch.device) -> list[tuple]:
    z = (1.0 + 2.0 * torch.randn(n, d, device=device)).requires_grad_()
    z4 = torch.randn(5, 3, 4, 2, device=device).requires_grad_()
    target = torch.rand(5, 4, 2, device=device) + 0.5
    return [(z, None, None, 0.1, 2.0, 0, "per_dim", 1e-2), (z, None, None, 0.1, 2.0, 0, "scalar", 1e-2),
            (z4, target * 0.3, target, 0.0, 0.0, 1, "per_dim", 3e-3), (z4, None, target, 0.5, 0.0, 1, "scalar", 3e-3)]


RENORMALIZE = Op("renormalize", _engine, _fake, _engine_backward, outputs=("out", "mean", "var", "scalars"),
                 saves=("z", "mean", "var", "scalars", "target_var"), differentiable=("z",),
                 non_differentiable=("mean", "var", "scalars"), kernel=_kernel, kernel_backward=_kernel_backward,
                 backward_fake=_backward_fake, examples=_examples, bench=("bench.cases.renormalize",),
                 aot="bench.aot.moments")


# ------------------------------------------------------------------------------------- public API
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
    shape = stat_shape(z, dim)
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
    if (tv_tensor is not None and tv_tensor.device.type != "meta" and not torch.compiler.is_compiling()
            and bool((tv_tensor < 0).any())):  # one read of the (per-dimension, small) target
        raise ValueError(f"{op}: target_var must be >= 0 (a variance), got a negative entry "
                         f"{float(tv_tensor.min())}; its square root would be NaN")
    return RENORMALIZE(z, tm_tensor, tv_tensor, 0.0 if tm_tensor is not None else target_mean,
                       0.0 if tv_tensor is not None else target_var, dim, mode, eps)[0]



"""The engine's plain PyTorch: what the ops run on tensors that do not go to the Triton kernels, on any device.

Each function returns the values of its spec in ``fastvae.reference`` (the tests compare them), computed with
as few passes over memory and ATen dispatches as plain PyTorch allows: in-place chains, ``addcmul``, statistics
folded into per-dimension scale and shift, the noise from ``philox`` (the Philox stream of the kernels). On
CPU tensors with float32 accumulation ``reparameterize_kl`` runs ``loops``' one pass instead. The backward
recomputes the noise from the seed, unless the forward kept it (``keep_noise``, which the op asks for on the CPU).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ...reference.balanced_mse import HALF_LOG_2PI, sample_dims
from ...reference.reduce import accumulation_dtype, expand_reduced_grad, reduce_loss
from ...reference.reparameterize import clamp_logvar, clamp_logvar_grad
from .._layout import channels_last_format, channels_last_latents, in_format, pixel_strides
from . import philox


# ----------------------------------------------------------------------------- reparameterize_kl
def _noise(seed: Tensor, mu: Tensor, acc: torch.dtype) -> Tensor:
    eps = philox.philox_randn(seed, mu.shape, mu.device)
    return eps if acc == torch.float32 else eps.to(acc)


def _kl_terms(mu: Tensor, logvar: Tensor, var: Tensor) -> Tensor:
    """``mu^2 + var - logvar - 1`` (twice the KL per element) in ``var``'s memory, with ``var = exp(logvar)``;
    the ``- 1`` per element, so that a small KL keeps its digits."""
    return var.sub_(logvar).sub_(1).addcmul_(mu, mu)


def _reduce_kl(terms: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return terms.mul_(0.5).to(dtype)
    return reduce_loss(terms, reduction, (-1,), dtype).mul_(0.5)


def reparameterize_kl_rows(mu: Tensor, logvar: Tensor, seed: Tensor | None, reduction: str | None,
                           eps: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(z, kl)`` of ``reference.reparameterize_kl``, either None when not asked for (no seed, no
    reduction): ``std = exp(logvar / 2)`` once, ``z = addcmul(mu, std, eps)``, ``exp(logvar) = std^2``;
    ``eps`` the seed's float32 noise when the caller drew it already, else drawn here."""
    acc = accumulation_dtype(mu.dtype)
    mu_acc, logvar_acc = mu.to(acc), logvar.to(acc)
    std = logvar_acc.mul(0.5).exp_()
    if seed is None:  # exp(logvar) as std^2 here too, so the KL alone has the bits of the KL beside z
        return None, _reduce_kl(_kl_terms(mu_acc, logvar_acc, std.mul_(std)), reduction, mu.dtype)
    z = torch.addcmul(mu_acc, std, _noise(seed, mu, acc) if eps is None else eps.to(acc)).to(mu.dtype)
    if reduction is None:
        return z, None
    return z, _reduce_kl(_kl_terms(mu_acc, logvar_acc, std.mul_(std)), reduction, mu.dtype)


def reparameterize_kl_rows_backward(
    grad_z: Tensor | None, grad_kl: Tensor | None, mu: Tensor, logvar: Tensor, seed: Tensor | None, reduction: str,
    eps: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``d/dmu = g_z + g_kl mu``, ``d/dlogvar = g_z eps std / 2 + g_kl (std^2 - 1) / 2`` with
    ``std = exp(logvar / 2)`` computed once and ``eps`` the forward's float32 noise (given) or drawn again from the
    seed (None)."""
    acc = accumulation_dtype(mu.dtype)
    mu_acc, logvar_acc = mu.to(acc), logvar.to(acc)
    if grad_z is None and grad_kl is None:
        return torch.zeros_like(mu), torch.zeros_like(mu)
    std = logvar_acc.mul(0.5).exp_()
    grad_mu = grad_logvar = None
    if grad_kl is not None:
        g_kl = expand_reduced_grad(grad_kl.to(acc), reduction, mu.shape, (-1,))
        grad_mu = torch.mul(mu_acc, g_kl)
        grad_logvar = torch.mul(std, std).sub_(1).mul_(g_kl).mul_(0.5)
    if grad_z is not None:
        g_z = grad_z.to(acc)
        eps_std = (_noise(seed, mu, acc) if eps is None else eps.to(acc, copy=True)).mul_(std)
        grad_mu = g_z.clone() if grad_mu is None else grad_mu.add_(g_z)
        grad_logvar = (eps_std.mul_(g_z).mul_(0.5) if grad_logvar is None
                       else grad_logvar.addcmul_(g_z, eps_std, value=0.5))
    return grad_mu.to(mu.dtype), grad_logvar.to(mu.dtype)


# ---------------------------------------------------------------------------------- balanced_mse
def balanced_mse_forward(x_hat: Tensor, x: Tensor, running_mse: Tensor, *, reduction: str = "batchmean",
                         full: bool = False) -> tuple[Tensor, Tensor]:
    """``(loss, sum((x_hat - x)^2))``, the error computed once. For ``batchmean`` and ``sum`` the loss
    comes from the sum of squared errors ``S`` in closed form, ``S / (2 gamma^2) + M (log(gamma^2) +
    [log(2 pi)]) / 2`` over the ``M`` elements (divided by N for ``batchmean``): one pass over the data."""
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    gamma2 = running_mse.detach().to(acc).reshape(())
    log_term = torch.log(gamma2) / 2 + (HALF_LOG_2PI if full else 0.0)
    err = x_hat.to(acc) - x.to(acc)
    flat = err.reshape(-1)
    sse = torch.dot(flat, flat)
    if reduction in ("batchmean", "sum"):
        total = sse / (2 * gamma2) + x_hat.numel() * log_term
        loss = total / x_hat.shape[0] if reduction == "batchmean" else total
    else:
        loss = reduce_loss(err * err / (2 * gamma2) + log_term, reduction, sample_dims(x_hat), x_hat.dtype)
    return loss, sse.detach()


def balanced_mse_backward(grad: Tensor, x_hat: Tensor, x: Tensor, running_mse: Tensor, reduction: str, *,
                          need_x: bool = True) -> tuple[Tensor, Tensor | None]:
    """``d/dx_hat = g (x_hat - x) / gamma^2`` in one pass after the difference; ``d/dx = -d/dx_hat``."""
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    gamma2 = running_mse.detach().to(acc).reshape(())
    g = expand_reduced_grad(grad.to(acc), reduction, x_hat.shape, sample_dims(x_hat))
    grad_x_hat = (x_hat.to(acc) - x.to(acc)).mul_(g / gamma2)
    return grad_x_hat.to(x_hat.dtype), ((-grad_x_hat).to(x.dtype) if need_x else None)


# ------------------------------------------------------------------ moments, renormalize, variance_law
def moments(z: Tensor, dim: int = 0, correction: int = 0) -> tuple[Tensor, Tensor]:
    """``torch.var_mean`` in the accumulation dtype: ATen's one-pass Welford, stable when ``|mean| >> std``; on CPU
    tensors with float32 accumulation ``loops.column_moments``' two float64 passes (ATen's reduction over a dim
    that is not the last runs at a few nanoseconds an element, the loop's at a fraction of one)."""
    loops = _loops_for(z)
    if loops is not None and isinstance(dim, int):
        return _column_moments(loops, z, None, dim % z.dim(), correction)
    var, mean = torch.var_mean(z.to(accumulation_dtype(z.dtype)), dim=dim, correction=correction)
    return mean, var


def _column_moments(loops, z: Tensor, logvar: Tensor | None, dim: int, correction: int) -> tuple[Tensor, Tensor]:
    """``(mean, var)`` over ``dim`` from ``loops.column_moments`` (``var`` plus ``E[exp(logvar)]`` with a
    ``logvar``), float32, of ``z``'s shape without ``dim``."""
    A, N = math.prod(z.shape[:dim]), z.shape[dim]
    C = z.numel() // (A * N)
    slabs = _float32_rows(z, C).reshape(A, N, C)
    mean, var = np.empty((A, C), np.float32), np.empty((A, C), np.float32)
    spread = slabs if logvar is None else _float32_rows(logvar, C).reshape(A, N, C)
    loops.column_moments(slabs, correction, spread, logvar is not None, mean, var)
    shape = [*z.shape[:dim], *z.shape[dim + 1:]]
    return torch.from_numpy(mean).view(shape), torch.from_numpy(var).view(shape)


def variance_law(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """``(E[mu], Var(mu) + E[exp(logvar)])`` over the rows of ``(..., D)``."""
    acc = accumulation_dtype(mu.dtype)
    D = mu.shape[-1]
    loops = _loops_for(mu)
    if loops is not None:
        return _column_moments(loops, mu.reshape(-1, D), logvar.reshape(-1, D), 0, 0)
    var_mu, mean = torch.var_mean(mu.reshape(-1, D).to(acc), dim=0, correction=0)
    return mean, var_mu.add_(logvar.reshape(-1, D).to(acc).exp().mean(dim=0))


def moments_backward(grad_mean: Tensor | None, grad_var: Tensor | None, z: Tensor, mean: Tensor, dim: int = 0,
                     correction: int = 0) -> Tensor:
    """``d/dz = g_mean / N + g_var 2 (z - mean) / (N - correction)``: a subtraction and an ``addcmul``."""
    acc = accumulation_dtype(z.dtype)
    n = z.shape[dim]
    shift = (grad_mean.to(acc) / n).unsqueeze(dim) if grad_mean is not None else None
    if grad_var is None:
        return shift.expand(z.shape).to(z.dtype, copy=True) if shift is not None else torch.zeros_like(z)
    centered = z.to(acc) - mean.to(acc).unsqueeze(dim)
    scale = (grad_var.to(acc) * (2 / (n - correction))).unsqueeze(dim)
    out = torch.addcmul(shift, centered, scale) if shift is not None else centered.mul_(scale)
    return out.to(z.dtype)


def variance_law_backward(grad_mean: Tensor | None, grad_var: Tensor | None, mu: Tensor, logvar: Tensor,
                          mean: Tensor) -> tuple[Tensor, Tensor]:
    """``d/dmu = g_mean / N + g_var 2 (mu - mean) / N``, ``d/dlogvar = g_var exp(logvar) / N``; on CPU tensors with
    float32 accumulation in one numba loop (``loops.rows_variance_law_backward``) instead of six ATen passes."""
    D = mu.shape[-1]
    loops = _loops_for(mu)
    if loops is not None and grad_var is not None:
        return _rows_variance_law_backward(loops, grad_mean, grad_var, mu, logvar, mean)
    grad_mu = moments_backward(grad_mean, grad_var, mu.reshape(-1, D), mean, dim=0).reshape(mu.shape)
    if grad_var is None:
        return grad_mu, torch.zeros_like(logvar)
    acc = accumulation_dtype(logvar.dtype)
    grad_logvar = logvar.to(acc).exp().mul_(grad_var.to(acc) / (logvar.numel() // D))
    return grad_mu, grad_logvar.to(logvar.dtype)


def _rows_variance_law_backward(loops, grad_mean: Tensor | None, grad_var: Tensor, mu: Tensor, logvar: Tensor,
                                mean: Tensor) -> tuple[Tensor, Tensor]:
    """``variance_law_backward`` from ``loops.rows_variance_law_backward`` on ``(rows, D)`` views (copies where
    needed), in the inputs' dtypes and shapes."""
    D = mu.shape[-1]
    zeros = np.zeros(D, np.float32)
    g_mean = zeros if grad_mean is None else _float32_rows(grad_mean, D).reshape(D)
    g_var = _float32_rows(grad_var, D).reshape(D)
    mu_rows = _float32_rows(mu, D)
    grad_mu, grad_logvar = np.empty(mu_rows.shape, np.float32), np.empty(mu_rows.shape, np.float32)
    loops.rows_variance_law_backward(g_mean, g_var, mu_rows, _float32_rows(mean, D).reshape(D),
                                     _float32_rows(logvar, D), grad_mu, grad_logvar)
    return (_as_dtype(torch.from_numpy(grad_mu), mu.dtype).view(*mu.shape),
            _as_dtype(torch.from_numpy(grad_logvar), logvar.dtype).view(*logvar.shape))


def scalar_renormalization(var: Tensor, target_var: Tensor | float, eps: float = 1e-6) -> Tensor:
    """``(factor, S)`` of the ``scalar`` mode, ``S = mean(sqrt(var + eps))``, ``factor = sqrt(mean(target_var)) / S``:
    a ``(2,)`` tensor in ``var``'s dtype."""
    target_var = torch.as_tensor(target_var, dtype=var.dtype, device=var.device)
    mean_sd = torch.sqrt(var + eps).mean()
    return torch.stack([torch.sqrt(target_var.mean()) / mean_sd, mean_sd])


def _per_dim(value: Tensor | float, acc: torch.dtype, device: torch.device, dim: int) -> Tensor:
    value = torch.as_tensor(value, dtype=acc, device=device)
    return value.unsqueeze(dim) if value.dim() > 0 else value


def renormalize_from_moments(z: Tensor, mean: Tensor, var: Tensor, target_mean: Tensor | float = 0.0,
                             target_var: Tensor | float = 1.0, *, dim: int = 0, mode: str = "per_dim",
                             eps: float = 1e-6) -> Tensor:
    """``per_dim``: ``z' = (z - mean) scale + target_mean`` with the per-dimension
    ``scale = sqrt(target_var) / sqrt(var + eps)``, two passes; ``scalar``: ``z' = z factor``."""
    acc = accumulation_dtype(z.dtype)
    mean, var = mean.to(acc).unsqueeze(dim), var.to(acc).unsqueeze(dim)
    if mode == "scalar":
        return z.to(acc).mul(scalar_renormalization(var, target_var, eps)[0]).to(z.dtype)
    scale = torch.sqrt(_per_dim(target_var, acc, z.device, dim)) / torch.sqrt(var + eps)
    return torch.addcmul(_per_dim(target_mean, acc, z.device, dim), z.to(acc) - mean, scale).to(z.dtype)


def renormalize_backward(grad: Tensor, z: Tensor, mean: Tensor, var: Tensor, target_var: Tensor | float = 1.0, *,
                         dim: int = 0, mode: str = "per_dim", eps: float = 1e-6) -> Tensor:
    """``per_dim``: with ``r = 1 / sqrt(var + eps)``, ``s = r sqrt(target_var)`` and ``c = z - mean``,
    ``d/dz = s g - s mean(g) - s r^2 mean(g c) c`` (means over ``dim``); ``scalar``:
    ``d/dz = factor g - factor sum(g z) / (S F N) (z - mean) / sqrt(var + eps)``, ``S = mean(sqrt(var + eps))``."""
    acc = accumulation_dtype(z.dtype)
    g, z_acc = grad.to(acc), z.to(acc)
    mean, var = mean.to(acc).unsqueeze(dim), var.to(acc).unsqueeze(dim)
    centered = z_acc - mean
    if mode == "scalar":
        factor, mean_sd = scalar_renormalization(var, target_var, eps)
        coef = -factor * (g * z_acc).sum() / (mean_sd * z.numel()) / torch.sqrt(var + eps)
        return torch.addcmul(g * factor, centered, coef).to(z.dtype)
    rstd = torch.rsqrt(var + eps)
    scale = rstd * torch.sqrt(_per_dim(target_var, acc, z.device, dim))
    mean_g = g.mean(dim=dim, keepdim=True)
    mean_gc = (g * centered).mean(dim=dim, keepdim=True)
    out = torch.addcmul(-scale * mean_g, g, scale)
    return out.addcmul_(centered, -scale * rstd * rstd * mean_gc).to(z.dtype)


def update_running_mse(running_mse: Tensor, batch_mse: Tensor, *, momentum: float, rule: str) -> Tensor:
    """``reference.update_running_mse`` in place (``ema``: ``r = m r + (1 - m) batch_mse``; ``min-ema``:
    ``r = min(r, ema)``), except that a non-finite ``batch_mse`` (the loss reports it) leaves ``r`` as it was
    instead of poisoning every later step."""
    with torch.no_grad():
        batch_mse = batch_mse.to(running_mse.dtype).reshape(running_mse.shape)
        ema = running_mse * momentum + batch_mse * (1 - momentum)
        if rule == "min-ema":
            ema = torch.minimum(running_mse, ema)
        running_mse.copy_(torch.where(torch.isfinite(batch_mse), ema, running_mse))
    return running_mse


def reparameterize_kl(mu: Tensor, logvar: Tensor, seed: Tensor | None, reduction: str | None, logvar_clamp,
                      event_dims: int, keep_noise: bool = False) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``reparameterize_kl`` on latents whose last ``event_dims`` dims form one sample, ``logvar`` clamped
    first: ``z`` and the elementwise KL in mu's memory format, a ``per_sample`` KL of shape
    ``mu.shape[:-event_dims]``, and with ``keep_noise`` (and a seed) the float32 noise drawn, of mu's shape
    (contiguous; channels_last for ``channels_last_latents``, which run in memory order), for the backward to read
    instead of drawing it again. Float32 accumulation with numba: ``loops``'s one
    pass; otherwise the engine above on ``(samples, event elements)`` rows (a copy where no view exists)."""
    E = math.prod(mu.shape[mu.dim() - event_dims:])
    keep_noise = keep_noise and seed is not None
    loops = _loops_for(mu)
    pixels = channels_last_latents(mu, event_dims)
    in_memory_order = loops is not None and pixels  # z, the elementwise KL and eps written channels_last
    if in_memory_order:
        z, kl, eps = _pixel_forward(loops, mu, logvar, seed, reduction, logvar_clamp, keep_noise)
    elif loops is not None:  # z, the elementwise KL and eps already of mu's shape, contiguous
        z, kl, eps = _fused_forward(loops, mu, logvar, seed, reduction, logvar_clamp, E, keep_noise)
    else:
        eps = philox.philox_randn(seed, (mu.numel() // E, E), mu.device) if keep_noise else None
        z, kl = reparameterize_kl_rows(mu.reshape(-1, E), clamp_logvar(logvar.reshape(-1, E), logvar_clamp), seed,
                                       reduction, eps)
        # (a shape as ints: a torch.Size argument costs the view a microsecond more)
        eps = None if eps is None else eps.view(*mu.shape)
        z = None if z is None else z.view(*mu.shape)
        kl = kl.view(*mu.shape) if kl is not None and reduction == "none" else kl
    if not in_memory_order:  # into mu's memory format (the noise too, as the fake states, for channels_last latents)
        eps = in_format(eps, mu) if pixels and eps is not None else eps
        z = None if z is None else in_format(z, mu)
        kl = in_format(kl, mu) if kl is not None and reduction == "none" else kl
    if kl is not None and reduction == "per_sample":
        kl = kl.view([*mu.shape[: mu.dim() - event_dims]])
    elif kl is not None and reduction != "none" and kl.dim():
        kl = kl.view(())
    return z, kl, eps


def reparameterize_kl_backward(grad_z: Tensor | None, grad_kl: Tensor | None, mu: Tensor, logvar: Tensor,
                               seed: Tensor | None, reduction: str, logvar_clamp, event_dims: int,
                               eps: Tensor | None = None):
    """The gradients of ``reparameterize_kl`` with torch.clamp's rule, in mu's memory format; ``eps`` the noise the
    forward kept (``keep_noise``), else None and the noise is drawn again from the seed."""
    E = math.prod(mu.shape[mu.dim() - event_dims:])
    eps = None if eps is None or grad_z is None else eps
    loops = _loops_for(mu)
    if loops is not None and channels_last_latents(mu, event_dims):  # channels_last, in memory order
        return _pixel_backward(loops, grad_z, grad_kl, mu, logvar, seed, reduction, logvar_clamp, eps)
    if loops is not None:  # contiguous, of mu's shape
        grad_mu, grad_logvar = _fused_backward(loops, grad_z, grad_kl, mu, logvar, seed, reduction, logvar_clamp, E,
                                               eps)
        return in_format(grad_mu, mu), in_format(grad_logvar, mu)
    g_kl = None if grad_kl is None else grad_kl.reshape(-1, E) if reduction == "none" else grad_kl.reshape(-1)
    lv = logvar.reshape(-1, E)
    grad_mu, grad_logvar = reparameterize_kl_rows_backward(
        None if grad_z is None else grad_z.reshape(-1, E), g_kl, mu.reshape(-1, E), clamp_logvar(lv, logvar_clamp),
        seed, reduction, None if eps is None else eps.reshape(-1, E),
    )
    grad_logvar = clamp_logvar_grad(grad_logvar, lv, logvar_clamp)
    return in_format(grad_mu.view(*mu.shape), mu), in_format(grad_logvar.view(*mu.shape), mu)


# ------------------------------------------------------------- reparameterize_kl through loops
_NONE = np.empty((1, 0), np.float32)  # an output the loop is told to skip (one empty row: its row 0 is in bounds)
_ZERO_GRAD = np.zeros((1, 1), np.float32)  # a gradient that does not flow in, read as 0 (never written)


def _loops_for(mu: Tensor):
    """``loops`` when its loops serve these latents (non-empty, on the CPU, float32 accumulation), else None."""
    if mu.device.type != "cpu" or accumulation_dtype(mu.dtype) != torch.float32 or mu.numel() == 0:
        return None
    return philox.compiled()


def _float32_rows(t: Tensor, E: int) -> np.ndarray:
    """``t`` as a C-contiguous float32 ``(rows, E)`` array (a copy only where needed)."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t.detach().numpy().reshape(-1, E)
    return t.detach().reshape(-1, E).to(torch.float32).contiguous().numpy()


def _float32_rows_at(t: Tensor, E: int) -> tuple[int, int, Tensor]:
    """``(address, row stride, owner)`` of ``t`` as float32 rows of ``E`` contiguous elements, for the loops that read
    memory in place: ``t``'s own where it is float32 and holds such rows at one stride (contiguous, or the halves of
    ``h.chunk(2, dim=1)``), else a contiguous float32 copy's (``owner``: what must live while the loop reads it)."""
    if t.dtype == torch.float32:
        if t.is_contiguous():
            return t.data_ptr(), E, t
        try:
            rows = t.view(-1, E)
        except RuntimeError:  # no view: a copy below
            rows = None
        if rows is not None and (rows.stride(1) == 1 or E == 1):
            return rows.data_ptr(), rows.stride(0), t
    copy = t.detach().reshape(-1, E).to(torch.float32).contiguous()
    return copy.data_ptr(), E, copy


_IN_PLACE_MIN = 256
"""Rows shorter than this are copied into contiguous ones when they are not (the loops then merge them): a loop pays
tens of nanoseconds a row."""

_NO_CLAMP = (False, np.float32(0), np.float32(0))


def _clamp_args(logvar_clamp) -> tuple[bool, np.float32, np.float32]:
    if logvar_clamp is None:
        return _NO_CLAMP
    return True, np.float32(logvar_clamp[0]), np.float32(logvar_clamp[1])


_ROW_WIDTH = 1024
"""The loops' rows are merged up to this many elements where no reduction needs the samples' rows: a loop
pays tens of nanoseconds a row around its vectorized body, as much as 16 elements cost."""


def _loop_width(samples: int, E: int, per_row: bool) -> int:
    """The row length the loops run on: ``E`` when ``per_row`` (a per-sample KL or its gradient), else ``k E``
    for the largest ``k`` that divides ``samples`` with ``k E <= _ROW_WIDTH`` (row ``r`` of width ``k E`` holds
    flat elements ``r k E ...``, so the noise's counters, and every value, stay those of the samples' rows)."""
    if per_row or E >= _ROW_WIDTH:
        return E
    return E * math.gcd(samples, 1 << (_ROW_WIDTH // E).bit_length() - 1)


def _fused_forward(loops, mu: Tensor, logvar: Tensor, seed: Tensor | None, reduction: str | None, logvar_clamp,
                   E: int, keep_noise: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(z, kl, eps)`` of ``reparameterize_kl_rows``: ``z``, an elementwise KL and ``eps`` contiguous of mu's shape
    (the loops write them as ``(rows, E)`` views), a reduced KL of ``(rows,)`` or ``()``. Rows split over threads
    (each row's KL is summed whole, and the rows' sums added in order after, so the split changes no bit); a single
    long sample is cut into parts first (``_row_parts``), so that it splits too."""
    samples = mu.numel() // E
    dense = mu.is_contiguous() and logvar.is_contiguous()
    if not dense and E < _IN_PLACE_MIN:  # short rows merge into long ones: copies cost less than a loop per row
        mu, logvar, dense = mu.contiguous(), logvar.contiguous(), True
    if dense:
        E = _loop_width(samples, E, reduction == "per_sample")
    whole = mu.numel() // E  # rows, before a single long one is cut into parts
    mu_at, mu_stride, mu_owner = _float32_rows_at(mu, E)
    logvar_at, logvar_stride, logvar_owner = _float32_rows_at(logvar, E)
    parts = _row_parts(whole, E)
    rows, E = whole * parts, E // parts
    # Straight-line on purpose: at (128, 16) the Python around the loop costs as much as the loop.
    shape = tuple(mu.shape)
    z = z_np = terms = terms_np = eps = eps_np = _NONE
    if seed is not None:
        z = np.empty(shape, np.float32)
        z_np = z.reshape(rows, E)
    if reduction == "none":
        terms = np.empty(shape, np.float32)
        terms_np = terms.reshape(rows, E)
    if keep_noise:
        eps = np.empty(shape, np.float32)
        eps_np = eps.reshape(rows, E)
    want_sums = reduction is not None and reduction != "none"
    sums = np.empty(rows if want_sums else 0)
    total = np.empty((), np.float32)
    total_np = total.reshape(1)
    want_total = reduction == "batchmean" or reduction == "sum"
    scale = 1.0 / samples if reduction == "batchmean" else 1.0
    seed_value = 0 if seed is None else seed.item()
    clamp, lo, hi = _clamp_args(logvar_clamp)
    want_z, want_terms, want_eps = z is not _NONE, terms is not _NONE, eps is not _NONE
    # the call that runs every row (no split) adds the rows' sums too; a split adds them after, in the same order
    def run(a: int, b: int) -> None:
        loops.reparameterize_kl_rows(mu_at, mu_stride, logvar_at, logvar_stride, E, parts, seed_value, a, b, clamp,
                                     lo, hi, want_z, z_np, want_terms, terms_np, want_sums, sums, want_eps, eps_np,
                                     want_total and a == 0 and b == rows, scale, total_np)

    if philox.split(run, rows, rows * E, draws=want_z) and want_total:
        loops.scaled_total(sums, scale, total_np)
    del mu_owner, logvar_owner  # (the copies, where any, lived through the loop)
    z = torch.from_numpy(z) if want_z else None
    eps = torch.from_numpy(eps) if want_eps else None
    if mu.dtype != torch.float32 and want_z:
        z = z.to(mu.dtype)
    if reduction is None:
        return z, None, eps
    if want_total:
        return z, torch.from_numpy(total), eps
    if want_terms:
        return z, _as_dtype(torch.from_numpy(terms), mu.dtype), eps
    if parts > 1:  # each sample's parts, added in order
        sums = sums.reshape(whole, parts).sum(axis=1)
    return z, torch.from_numpy(sums).to(torch.float32), eps


def _row_parts(rows: int, E: int) -> int:
    """Into how many parts the forward loop cuts each row: 1, or for a single sample long enough that a second thread
    pays (``philox.DRAWING_PARALLEL_MIN`` elements a part), up to 8 equal parts. From the shape only, never the
    threads, so that the KL's bits do not depend on them (its parts' sums are added in order)."""
    parts = 1
    if rows == 1:
        while parts < 8 and E % (2 * parts) == 0 and E // (2 * parts) >= philox.DRAWING_PARALLEL_MIN:
            parts *= 2
    return parts


def _as_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t.to(dtype)``, without the call (a microsecond) where it is a float32 tensor already."""
    return t if t is None or dtype == torch.float32 else t.to(dtype)


def _fused_backward(loops, grad_z: Tensor | None, grad_kl: Tensor | None, mu: Tensor, logvar: Tensor,
                    seed: Tensor | None, reduction: str, logvar_clamp, E: int,
                    eps: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(d mu, d logvar)``, contiguous of mu's shape, from ``reparameterize_kl_rows_backward`` on ``(rows, E)``
    rows read in place (copies where no such rows exist, or short strided ones), reading the noise from ``eps``
    (float32, contiguous) when given."""
    samples = mu.numel() // E
    elementwise = grad_kl is not None and reduction == "none"
    streams = [t for t in (mu, logvar, grad_z, eps, grad_kl if elementwise else None) if t is not None]
    dense = all(t.is_contiguous() for t in streams)
    if not dense and E < _IN_PLACE_MIN:  # short rows merge into long ones: copies cost less than a loop per row
        mu, logvar = mu.contiguous(), logvar.contiguous()
        grad_z = None if grad_z is None else grad_z.contiguous()
        grad_kl = grad_kl.contiguous() if elementwise else grad_kl
        dense = True
    if dense:
        E = _loop_width(samples, E, reduction == "per_sample")
    rows = mu.numel() // E
    mu_at, mu_stride, mu_owner = _float32_rows_at(mu, E)
    logvar_at, logvar_stride, logvar_owner = _float32_rows_at(logvar, E)
    g_z_at, g_z_stride, g_z_owner = (0, 0, None) if grad_z is None else _float32_rows_at(grad_z, E)
    eps_at, eps_stride, eps_owner = (0, 0, None) if eps is None else _float32_rows_at(eps, E)
    if grad_kl is None:
        g_kl = _ZERO_GRAD  # d mu = g_z + 0 mu: the loop's one formula
    elif reduction == "none":
        g_kl = _float32_rows(grad_kl, E)
    elif reduction == "per_sample":
        g_kl = _float32_rows(grad_kl, 1)
    else:  # one gradient for every element: a number, divided here for batchmean
        g_kl = np.array([[float(grad_kl) / (samples if reduction == "batchmean" else 1)]], np.float32)
    shape = tuple(mu.shape)
    grad_mu_np, grad_logvar_np = np.empty(shape, np.float32), np.empty(shape, np.float32)
    seed_value = 0 if grad_z is None or eps is not None else seed.item()
    clamp, lo, hi = _clamp_args(logvar_clamp)
    has_grad_z, has_grad_kl, saved_eps = grad_z is not None, grad_kl is not None, eps is not None
    grad_mu_rows, grad_logvar_rows = grad_mu_np.reshape(rows, E), grad_logvar_np.reshape(rows, E)
    philox.split(lambda a, b: loops.reparameterize_kl_rows_backward(
        g_z_at, g_z_stride, g_kl, mu_at, mu_stride, logvar_at, logvar_stride, E, seed_value, a, b, clamp, lo, hi,
        has_grad_z, has_grad_kl, grad_mu_rows, grad_logvar_rows, saved_eps, eps_at, eps_stride), rows, rows * E,
        has_grad_z and not saved_eps)
    del mu_owner, logvar_owner, g_z_owner, eps_owner  # (the copies, where any, lived through the loop)
    return _as_dtype(torch.from_numpy(grad_mu_np), mu.dtype), _as_dtype(torch.from_numpy(grad_logvar_np), mu.dtype)


# ------------------------------------------------- reparameterize_kl on channels_last latents, in memory order
def _pixels_at(t: Tensor) -> tuple[int, int, int, Tensor]:
    """``(address, sample stride, pixel stride, owner)`` of ``t`` (``(B, C, *spatial)``) as the pixel loops read it:
    ``t``'s own memory where it is float32 in ``pixel_strides``' layout (a channels_last tensor, a half of
    ``chunk(2, dim=1)`` of one), else a channels_last float32 copy's (``owner``: what must live while a loop reads)."""
    if t.dtype == torch.float32:
        strides = pixel_strides(t)
        if strides is not None:
            return t.data_ptr(), strides[0], strides[1], t
    copy = t.detach().to(torch.float32, memory_format=channels_last_format(t))
    sample, pixel = pixel_strides(copy)
    return copy.data_ptr(), sample, pixel, copy


def _channels_last(rows: np.ndarray, like: Tensor) -> Tensor:
    """A C-contiguous ``(B P, C)`` array of pixels as the channels_last tensor of ``like``'s shape it holds."""
    n = like.dim()
    pixels = torch.from_numpy(rows).view(like.shape[0], *like.shape[2:], like.shape[1])
    return pixels.permute(0, n - 1, *range(1, n - 1))


def _pixel_parts(B: int, P: int, C: int) -> int:
    """Into how many parts of pixels the forward cuts each sample: up to 8 units of work in all where a part keeps
    ``philox.DRAWING_PARALLEL_MIN`` elements (so that a batch of one splits over threads); from the shape only."""
    parts = 1
    while B * parts < 8 and P % (2 * parts) == 0 and P * C // (2 * parts) >= philox.DRAWING_PARALLEL_MIN:
        parts *= 2
    return parts


def _pixel_forward(loops, mu: Tensor, logvar: Tensor, seed: Tensor | None, reduction: str | None, logvar_clamp,
                   keep_noise: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(z, kl, eps)`` of ``_fused_forward`` for ``channels_last_latents``: ``loops.reparameterize_kl_pixels`` reads
    ``mu`` and ``logvar`` in place and writes ``z``, an elementwise KL and ``eps`` channels_last, so that no copy
    of the latents is made in either direction; the noise is that of the logical flat index, bit for bit."""
    B, C = mu.shape[0], mu.shape[1]
    P = mu.numel() // (B * C)
    mu_at, mu_sample, mu_pixel, mu_owner = _pixels_at(mu)
    logvar_at, logvar_sample, logvar_pixel, logvar_owner = _pixels_at(logvar)
    parts = _pixel_parts(B, P, C)
    units = B * parts
    z = terms = eps = _NONE
    if seed is not None:
        z = np.empty((B * P, C), np.float32)
    if reduction == "none":
        terms = np.empty((B * P, C), np.float32)
    if keep_noise and seed is not None:
        eps = np.empty((B * P, C), np.float32)
    want_z, want_terms, want_eps = z is not _NONE, terms is not _NONE, eps is not _NONE
    want_sums = reduction is not None and reduction != "none"
    want_total = reduction == "batchmean" or reduction == "sum"
    sums = np.empty(units if want_sums else 0)
    total = np.empty((), np.float32)
    total_np = total.reshape(1)
    scale = 1.0 / B if reduction == "batchmean" else 1.0
    seed_value = 0 if seed is None else seed.item()
    clamp, lo, hi = _clamp_args(logvar_clamp)

    def run(a: int, b: int) -> None:
        loops.reparameterize_kl_pixels(mu_at, mu_sample, mu_pixel, logvar_at, logvar_sample, logvar_pixel, C, P,
                                       parts, seed_value, a, b, clamp, lo, hi, want_z, z, want_terms, terms,
                                       want_sums, sums, want_eps, eps, want_total and a == 0 and b == units, scale,
                                       total_np)

    if philox.split(run, units, B * P * C, draws=want_z) and want_total:
        loops.scaled_total(sums, scale, total_np)
    del mu_owner, logvar_owner  # (the copies, where any, lived through the loop)
    z = _as_dtype(_channels_last(z, mu), mu.dtype) if want_z else None
    eps = _channels_last(eps, mu) if want_eps else None
    if reduction is None:
        return z, None, eps
    if want_total:
        return z, torch.from_numpy(total), eps
    if want_terms:
        return z, _as_dtype(_channels_last(terms, mu), mu.dtype), eps
    if parts > 1:  # each sample's parts, added in order
        sums = sums.reshape(B, parts).sum(axis=1)
    return z, torch.from_numpy(sums).to(torch.float32), eps


def _pixel_backward(loops, grad_z: Tensor | None, grad_kl: Tensor | None, mu: Tensor, logvar: Tensor,
                    seed: Tensor | None, reduction: str, logvar_clamp, eps: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(d mu, d logvar)`` of ``_fused_backward`` for ``channels_last_latents``, channels_last, from
    ``loops.reparameterize_kl_pixels_backward``: the latents, ``grad_z``, the kept ``eps`` and an elementwise
    ``grad_kl`` read in place where they are channels_last (channels_last copies otherwise)."""
    B, C = mu.shape[0], mu.shape[1]
    P = mu.numel() // (B * C)
    mu_at, mu_sample, mu_pixel, mu_owner = _pixels_at(mu)
    logvar_at, logvar_sample, logvar_pixel, logvar_owner = _pixels_at(logvar)
    g_z_at, g_z_sample, g_z_pixel, g_z_owner = (0, 0, 0, None) if grad_z is None else _pixels_at(grad_z)
    eps_at, eps_sample, eps_pixel, eps_owner = (0, 0, 0, None) if eps is None else _pixels_at(eps)
    elementwise = grad_kl is not None and reduction == "none"
    g_kl_at, g_kl_sample, g_kl_pixel, g_kl_owner = _pixels_at(grad_kl) if elementwise else (0, 0, 0, None)
    if grad_kl is None or elementwise:
        g_values = _ZERO_GRAD[0]
    elif reduction == "per_sample":
        g_values = _float32_rows(grad_kl, 1).reshape(B)
    else:  # one gradient for every element: a number, divided here for batchmean
        g_values = np.array([float(grad_kl) / (B if reduction == "batchmean" else 1)], np.float32)
    grad_mu, grad_logvar = np.empty((B * P, C), np.float32), np.empty((B * P, C), np.float32)
    seed_value = 0 if grad_z is None or eps is not None else seed.item()
    clamp, lo, hi = _clamp_args(logvar_clamp)
    has_grad_z, has_grad_kl, saved_eps = grad_z is not None, grad_kl is not None, eps is not None
    philox.split(lambda a, b: loops.reparameterize_kl_pixels_backward(
        g_z_at, g_z_sample, g_z_pixel, g_kl_at, g_kl_sample, g_kl_pixel, g_values, mu_at, mu_sample, mu_pixel,
        logvar_at, logvar_sample, logvar_pixel, C, P, seed_value, a, b, clamp, lo, hi, has_grad_z, has_grad_kl,
        elementwise, grad_mu, grad_logvar, saved_eps, eps_at, eps_sample, eps_pixel), B * P, B * P * C,
        has_grad_z and not saved_eps)
    del mu_owner, logvar_owner, g_z_owner, eps_owner, g_kl_owner  # (the copies lived through the loop)
    return (_as_dtype(_channels_last(grad_mu, mu), mu.dtype), _as_dtype(_channels_last(grad_logvar, mu), mu.dtype))

"""Plain-PyTorch implementations of every fused op: the spec that the Triton kernels are tested against.

Each function has the signature of its public op in ``fastvae`` and is differentiable through
ordinary autograd. The ``*_backward`` functions spell out the gradient formulas that the backward
kernels implement; the tests check them against autograd of the forward.

Accumulation is in float32 (float64 for float64 inputs). Elementwise results keep the input dtype;
reduced losses come back in the accumulation dtype (float32 for half-precision inputs).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Philox 4x32-10, as Triton's tl.randn draws it
# --------------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
_INT32_TO_UNIFORM = 4.6566127342e-10  # the largest scale with (2**31 - 1) * scale < 1 in float32


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and uint32 values in int64 ``b``.

    The 64-bit product does not fit in int64, so ``b`` is split into 16-bit halves.
    """
    p_lo = a * (b & 0xFFFF)  # < 2**48
    p_hi = a * (b >> 16)  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox_uint32(seed: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox 4x32-10 of counter ``(offset_lo, offset_hi, 0, 0)`` and key ``(seed_lo, seed_hi)``.

    ``seed``: one-element int64 tensor; ``offsets``: int64 tensor of counters (>= 0). Returns four
    int64 tensors of uint32 values, the words of Triton's ``randint4x(seed, offsets)``.
    """
    seed = seed.reshape(()).to(torch.int64)
    k0 = (seed & _M32).to(offsets.device)
    k1 = ((seed >> 32) & _M32).to(offsets.device)
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _uint32_to_uniform(x: Tensor) -> Tensor:
    """Triton's ``uint_to_uniform_float``: bitcast to int32, fold negatives with ``~x``, scale to [0, 1)."""
    folded = torch.where(x >= 2**31, _M32 - x, x)  # ~int32(x) for the upper half
    return folded.to(torch.float32) * torch.tensor(_INT32_TO_UNIFORM, dtype=torch.float32)


def philox_randn(seed: Tensor | int, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Standard normal float32 noise of ``shape``: element ``i`` (flat, row-major) is ``tl.randn(seed, i)``.

    Box-Muller on the first two Philox words, in float32, exactly as Triton computes it, so a seed
    gives the same noise on the CPU reference and in the kernels (to float rounding of log/cos).
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    numel = math.prod(shape)
    offsets = torch.arange(numel, device=device, dtype=torch.int64)
    i1, i2, _, _ = philox_uint32(seed, offsets)
    u1 = torch.clamp_min(_uint32_to_uniform(i1), 1.0e-7)
    u2 = _uint32_to_uniform(i2)
    theta = torch.tensor(2 * math.pi, dtype=torch.float32) * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return (radius * torch.cos(theta)).reshape(shape)


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------
def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_loss(values: Tensor, reduction: str, sample_dims: tuple[int, ...], out_dtype: torch.dtype) -> Tensor:
    """Reduce elementwise ``values`` (in the accumulation dtype).

    ``none``: as they are, cast to ``out_dtype``; ``per_sample``: summed over ``sample_dims``;
    ``batchmean``: the total over the number of samples (``numel / prod(sizes of sample_dims)``);
    ``sum``: the total.
    """
    if reduction == "none":
        return values.to(out_dtype)
    if reduction == "per_sample":
        return values.sum(dim=sample_dims) if sample_dims else values.clone()
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        per_sample = math.prod(values.shape[d] for d in sample_dims)
        return total / (values.numel() // per_sample)
    raise ValueError(f"unknown reduction {reduction!r}")


def expand_reduced_grad(grad: Tensor, reduction: str, shape: torch.Size, sample_dims: tuple[int, ...]) -> Tensor:
    """The gradient of a reduced loss, broadcast back to the elementwise ``shape``."""
    if reduction == "none":
        return grad
    if reduction == "per_sample":
        for dim in sorted(d % len(shape) for d in sample_dims):
            grad = grad.unsqueeze(dim)
        return grad
    if reduction == "batchmean":
        per_sample = math.prod(shape[d] for d in sample_dims)
        return grad / (math.prod(shape) // per_sample)
    return grad  # sum


# --------------------------------------------------------------------------------------------------
# Reparameterization and KL divergence
# --------------------------------------------------------------------------------------------------
_LATENT_DIMS = (-1,)


def reparameterize(mu: Tensor, logvar: Tensor, *, seed: Tensor | int) -> Tensor:
    """``z = mu + exp(logvar / 2) * eps`` with ``eps = philox_randn(seed, mu.shape)``; shape and dtype of mu."""
    acc = accumulation_dtype(mu.dtype)
    eps = philox_randn(seed, mu.shape, mu.device).to(acc)
    return (mu.to(acc) + torch.exp(logvar.to(acc) / 2) * eps).to(mu.dtype)


def kl_divergence(mu: Tensor, logvar: Tensor, *, reduction: str = "batchmean") -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, 1)) = 0.5 * (mu^2 + exp(logvar) - logvar - 1)`` per element of ``(..., D)``.

    Reductions: ``none`` (shape of mu), ``per_sample`` (sum over D: shape ``(...)``), ``batchmean``
    (total / number of samples ``numel / D``), ``sum``.
    """
    acc = accumulation_dtype(mu.dtype)
    mu_acc, logvar_acc = mu.to(acc), logvar.to(acc)
    kl = 0.5 * (mu_acc * mu_acc + torch.exp(logvar_acc) - logvar_acc - 1)
    return reduce_loss(kl, reduction, _LATENT_DIMS, mu.dtype)


def reparameterize_kl(mu: Tensor, logvar: Tensor, *, seed: Tensor | int, reduction: str = "batchmean") -> tuple[Tensor, Tensor]:
    """``(reparameterize(mu, logvar, seed=seed), kl_divergence(mu, logvar, reduction=reduction))``."""
    return reparameterize(mu, logvar, seed=seed), kl_divergence(mu, logvar, reduction=reduction)


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
        g_kl = expand_reduced_grad(grad_kl.to(acc), reduction, mu.shape, _LATENT_DIMS)
        grad_mu = grad_mu + g_kl * mu_acc
        grad_logvar = grad_logvar + g_kl * (torch.exp(logvar_acc) - 1) / 2
    return grad_mu.to(mu.dtype), grad_logvar.to(mu.dtype)


# --------------------------------------------------------------------------------------------------
# Balanced reconstruction loss
# --------------------------------------------------------------------------------------------------
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
UPDATE_RULES = ("min-ema", "ema")


def _sample_dims(x: Tensor) -> tuple[int, ...]:
    """All dims but the batch dim 0 (none for a 1-D batch of scalars)."""
    return tuple(range(1, x.dim()))


def balanced_mse_loss(x_hat: Tensor, x: Tensor, running_mse: Tensor, *, reduction: str = "batchmean", full: bool = False) -> Tensor:
    """The Gaussian NLL with variance ``gamma^2 = running_mse`` (no gradient through it), per element

    ``(x_hat - x)^2 / (2 gamma^2) + log(gamma^2) / 2`` (``+ log(2 pi) / 2`` when ``full``),
    for ``x_hat``, ``x`` of shape ``(N, *)``. Reductions: ``none`` (shape of x), ``per_sample``
    (sum over all but dim 0: shape ``(N,)``), ``batchmean`` (total / N), ``sum``.
    """
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    gamma2 = running_mse.detach().to(acc).reshape(())
    err = x_hat.to(acc) - x.to(acc)
    values = err * err / (2 * gamma2) + torch.log(gamma2) / 2
    if full:
        values = values + _HALF_LOG_2PI
    return reduce_loss(values, reduction, _sample_dims(x_hat), x_hat.dtype)


def squared_error_sum(x_hat: Tensor, x: Tensor) -> Tensor:
    """``sum((x_hat - x)^2)`` in the accumulation dtype, without gradient: the statistic of the update."""
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    with torch.no_grad():
        err = x_hat.to(acc) - x.to(acc)
        return (err * err).sum()


def update_running_mse(running_mse: Tensor, batch_mse: Tensor, *, momentum: float = 0.99, rule: str = "min-ema") -> Tensor:
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
    loss = balanced_mse_loss(x_hat, x, running_mse, reduction=reduction, full=full)
    if update:
        update_running_mse(running_mse, squared_error_sum(x_hat, x) / x_hat.numel(), momentum=momentum, rule=rule)
    return loss


def balanced_mse_backward(grad: Tensor, x_hat: Tensor, x: Tensor, running_mse: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """``d/dx_hat = g * (x_hat - x) / gamma^2`` and ``d/dx = -d/dx_hat``, with ``g`` broadcast back over the reduction."""
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    gamma2 = running_mse.detach().to(acc).reshape(())
    g = expand_reduced_grad(grad.to(acc), reduction, x_hat.shape, _sample_dims(x_hat))
    grad_x_hat = g * (x_hat.to(acc) - x.to(acc)) / gamma2
    return grad_x_hat.to(x_hat.dtype), (-grad_x_hat).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Moments and renormalization
# --------------------------------------------------------------------------------------------------
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
    ``z' = z * sqrt(mean(target_var)) / mean(sqrt(var))``, one factor for all dimensions, no shift.
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
        out = z_acc * scalar_renormalization(var, target_var)[0]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return out.to(z.dtype)


def scalar_renormalization(var: Tensor, target_var: Tensor | float) -> Tensor:
    """``(factor, mean(sqrt(var)))`` of the ``scalar`` mode, ``factor = sqrt(mean(target_var)) / mean(sqrt(var))``:
    a ``(2,)`` tensor in ``var``'s dtype."""
    target_var = torch.as_tensor(target_var, dtype=var.dtype, device=var.device)
    mean_sd = torch.sqrt(var).mean()
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
    ``scalar``: with ``S = mean(sqrt(var))`` over the dimensions (``F`` of them), ``c = sqrt(mean(target_var)) / S``,
    ``d/dz = c g - c sum(g z) / (S F N) (z - mean) / sqrt(var)``, the sum over all elements.
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
        sd = torch.sqrt(var)
        factor, mean_sd = scalar_renormalization(var, target_var)
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

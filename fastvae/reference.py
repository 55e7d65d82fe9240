"""Plain-PyTorch implementations of every fused op: the spec that the Triton kernels are tested against.

Each function has the signature of its public op in ``fastvae`` and is differentiable through
ordinary autograd. The ``*_backward`` functions spell out the gradient formulas that the backward
kernels implement; the tests check them against autograd of the forward.

Accumulation is in float32 (float64 for float64 inputs). Elementwise results keep the input dtype;
reduced losses come back in the accumulation dtype (float32 for half-precision inputs).
"""
from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Philox 4x32-10, as Triton's tl.randn draws it
# --------------------------------------------------------------------------------------------------
# Written for few ATen ops, as each costs microseconds of dispatch, which dominates on small
# tensors: the four 32-bit lanes travel as two stacked (2, N) tensors, so one op serves two lanes, and
# a round is 4 ops. Words are uint32 bit patterns, in int64 (zero-extended) or in int32 (as they are).
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
_INT32_TO_UNIFORM = 4.6566127342e-10  # the largest scale with (2**31 - 1) * scale < 1 in float32
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)  # where the halves of an int64 lie in memory


def _make_philox_constants(device: torch.device) -> tuple[Tensor, Tensor]:
    """The round multipliers ``[[A], [B]]`` (2, 1) and the key bumps ``[r KEY_A, r KEY_B]`` of round
    ``r`` (rounds, 2), int64, made by ops on ``device`` (no host-to-device copy to wait on)."""
    lane = torch.arange(2, dtype=torch.int64, device=device)
    multipliers = torch.where(lane == 0, _PHILOX_ROUND_A, _PHILOX_ROUND_B).unsqueeze(1)
    rounds = torch.arange(_PHILOX_ROUNDS, dtype=torch.int64, device=device).unsqueeze(1)
    return multipliers, rounds * torch.where(lane == 0, _PHILOX_KEY_A, _PHILOX_KEY_B)


_PHILOX_CPU_CONSTANTS = _make_philox_constants(torch.device("cpu"))


def _words(t: Tensor) -> tuple[Tensor, Tensor]:
    """The low and high 32-bit words of the int64 ``t`` (last dim contiguous), as int32 views."""
    w = t.view(torch.int32)
    return w[..., _LO::2], w[..., _HI::2]


def _philox_rounds(seed: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """The 10 rounds of Philox 4x32 on counters ``(offset_lo, offset_hi, 0, 0)``, key ``(seed_lo, seed_hi)``.

    A round maps ``(c0, c1, c2, c3)`` with key ``(k0, k1)`` to
    ``(hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0))``, where ``hi`` and ``lo`` are the
    upper and lower 32 bits of the 64-bit product; then the key grows by ``(KEY_A, KEY_B)`` mod 2**32.

    Returns two int64 ``(2, N)`` tensors, ``N = offsets.numel()``: ``x``, rows ``(c0, c2)`` as uint32
    values, and the last products, whose low 32-bit words are ``(c3, c1)`` (the upper ones are not).
    """
    device = offsets.device
    multipliers, bumps = _PHILOX_CPU_CONSTANTS if device.type == "cpu" else _make_philox_constants(device)
    # The keys of all rounds, (seed_lo + r KEY_A, seed_hi + r KEY_B) mod 2**32: the low words of the sums.
    seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    keys = _words(bumps + torch.stack((seed & _M32, seed >> 32)))[0]  # (rounds, 2) int32
    k0s, k1s = (k.unbind(0) for k in keys.unbind(1))

    offsets = offsets.reshape(-1)
    n = offsets.numel()
    x = torch.zeros((2, n), dtype=torch.int64, device=device)  # (c0, c2); only low words are written
    torch.bitwise_and(offsets, _M32, out=x[0])
    x0, x2 = _words(x)[0]
    # Two product buffers alternate: a round reads the low words of the last one, (c3, c1), which
    # before the first round are (0, offset_hi).
    prods = torch.empty((2, 2, n), dtype=torch.int64, device=device).unbind(0)
    lo_words, hi_words = zip(*(_words(q) for q in prods))
    prods[1][0].zero_()
    torch.bitwise_right_shift(offsets, 32, out=prods[1][1])  # < 2**31 for offsets >= 0
    t = torch.empty((2, n), dtype=torch.int32, device=device)
    t0, t1 = t
    for r in range(_PHILOX_ROUNDS):
        now, last = r % 2, 1 - r % 2
        # x and the multipliers are < 2**32, so their products are < 2**64; int64 multiplication wraps
        # modulo 2**64 (two's complement, on CPU and CUDA alike), so it holds their exact 64 bits.
        torch.mul(x, multipliers, out=prods[now])  # (A c0, B c2)
        torch.bitwise_xor(hi_words[now], lo_words[last], out=t)  # (hi(A c0) ^ c3, hi(B c2) ^ c1)
        torch.bitwise_xor(t1, k0s[r], out=x0)  # the new c0
        torch.bitwise_xor(t0, k1s[r], out=x2)  # the new c2
    return x, prods[now]


def philox_uint32(seed: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox 4x32-10 of counter ``(offset_lo, offset_hi, 0, 0)`` and key ``(seed_lo, seed_hi)``.

    ``seed``: one-element int64 tensor; ``offsets``: int64 tensor of counters (>= 0). Returns four
    int64 tensors of uint32 values, of the shape of ``offsets``, the words of Triton's
    ``randint4x(seed, offsets)``.
    """
    x, p = _philox_rounds(seed, offsets)
    c3_c1 = p & _M32
    shape = offsets.shape
    return x[0].view(shape), c3_c1[1].view(shape), x[1].view(shape), c3_c1[0].view(shape)


def philox_randn(seed: Tensor | int, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Standard normal float32 noise of ``shape``: element ``i`` (flat, row-major) is ``tl.randn(seed, i)``.

    Box-Muller on the first two Philox words ``(c0, c1)``, in float32, exactly as Triton computes it:
    ``u = fold(c) * 4.6566127342e-10`` with ``fold(c) = ~c`` for ``c >= 2**31`` (negative as int32)
    and ``c`` otherwise, then ``sqrt(-2 log(max(u0, 1e-7))) * cos(2 pi u1)``, every step and constant
    in float32. So a seed gives the same noise on the CPU reference and in the kernels (to float
    rounding of log/cos).
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    offsets = torch.arange(math.prod(shape), device=device, dtype=torch.int64)
    x, p = _philox_rounds(seed, offsets)
    c = torch.stack((_words(x)[0][0], _words(p)[0][1]))  # (c0, c1) as int32
    c ^= c >> 31  # the fold: ~c where c < 0, c elsewhere
    u = c.to(torch.float32).mul_(_INT32_TO_UNIFORM)
    radius = u[0].clamp_min_(1.0e-7).log_().mul_(-2.0).sqrt_()
    return torch.mul(radius, u[1].mul_(2 * math.pi).cos_()).reshape(shape)


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


def _log_gamma_term(gamma2: Tensor, full: bool) -> Tensor:
    """The per-element constant of the Gaussian NLL: ``log(gamma^2) / 2`` (``+ log(2 pi) / 2`` when ``full``)."""
    return torch.log(gamma2) / 2 + (_HALF_LOG_2PI if full else 0.0)


def balanced_mse_loss(x_hat: Tensor, x: Tensor, running_mse: Tensor, *, reduction: str = "batchmean", full: bool = False) -> Tensor:
    """The Gaussian NLL with variance ``gamma^2 = running_mse`` (no gradient through it), per element

    ``(x_hat - x)^2 / (2 gamma^2) + log(gamma^2) / 2`` (``+ log(2 pi) / 2`` when ``full``),
    for ``x_hat``, ``x`` of shape ``(N, *)``. Reductions: ``none`` (shape of x), ``per_sample``
    (sum over all but dim 0: shape ``(N,)``), ``batchmean`` (total / N), ``sum``.
    """
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    gamma2 = running_mse.detach().to(acc).reshape(())
    err = x_hat.to(acc) - x.to(acc)
    values = err * err / (2 * gamma2) + _log_gamma_term(gamma2, full)
    return reduce_loss(values, reduction, _sample_dims(x_hat), x_hat.dtype)


def balanced_mse_forward(x_hat: Tensor, x: Tensor, running_mse: Tensor, *, reduction: str = "batchmean",
                         full: bool = False) -> tuple[Tensor, Tensor]:
    """``(balanced_mse_loss(...), sum((x_hat - x)^2))``, the error computed once; the sum (the statistic
    of the running-MSE update, in the accumulation dtype) carries no gradient.

    For ``batchmean`` and ``sum`` the loss comes from the sum of squared errors ``S`` in closed form,
    ``S / (2 gamma^2) + M (log(gamma^2) + [log(2 pi)]) / 2`` over the ``M`` elements (divided by N for
    ``batchmean``): one pass over the data instead of one per elementwise op, which is what the CPU
    implementation of the custom op runs.
    """
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    gamma2 = running_mse.detach().to(acc).reshape(())
    err = x_hat.to(acc) - x.to(acc)
    flat = err.reshape(-1)
    sse = torch.dot(flat, flat)
    if reduction in ("batchmean", "sum"):
        total = sse / (2 * gamma2) + x_hat.numel() * _log_gamma_term(gamma2, full)
        loss = total / x_hat.shape[0] if reduction == "batchmean" else total
    else:
        loss = reduce_loss(err * err / (2 * gamma2) + _log_gamma_term(gamma2, full), reduction, _sample_dims(x_hat), x_hat.dtype)
    return loss, sse.detach()


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
    loss, sse = balanced_mse_forward(x_hat, x, running_mse, reduction=reduction, full=full)
    if update:
        update_running_mse(running_mse, sse / x_hat.numel(), momentum=momentum, rule=rule)
    return loss


def balanced_mse_backward(grad: Tensor, x_hat: Tensor, x: Tensor, running_mse: Tensor, reduction: str, *,
                          need_x: bool = True) -> tuple[Tensor, Tensor | None]:
    """``d/dx_hat = g * (x_hat - x) / gamma^2`` and ``d/dx = -d/dx_hat`` (None unless ``need_x``), with ``g``
    broadcast back over the reduction."""
    acc = accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    gamma2 = running_mse.detach().to(acc).reshape(())
    g = expand_reduced_grad(grad.to(acc), reduction, x_hat.shape, _sample_dims(x_hat))
    grad_x_hat = (x_hat.to(acc) - x.to(acc)).mul_(g / gamma2)
    return grad_x_hat.to(x_hat.dtype), ((-grad_x_hat).to(x.dtype) if need_x else None)


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


# --------------------------------------------------------------------------------------------------
# Latent-diffusion arguments: event_dims and logvar_clamp
# --------------------------------------------------------------------------------------------------
def clamp_logvar(logvar: Tensor, logvar_clamp: tuple[float, float] | None) -> Tensor:
    """``torch.clamp(logvar, lo, hi)`` for ``logvar_clamp = (lo, hi)``; ``logvar`` itself for None."""
    return logvar if logvar_clamp is None else torch.clamp(logvar, logvar_clamp[0], logvar_clamp[1])


def clamp_logvar_grad(grad_logvar: Tensor, logvar: Tensor, logvar_clamp: tuple[float, float] | None) -> Tensor:
    """torch.clamp's gradient: ``grad_logvar`` where ``lo <= logvar <= hi``, zero elsewhere."""
    if logvar_clamp is None:
        return grad_logvar
    inside = (logvar >= logvar_clamp[0]) & (logvar <= logvar_clamp[1])
    return torch.where(inside, grad_logvar, torch.zeros_like(grad_logvar))


def event_reparameterize_kl(
    mu: Tensor, logvar: Tensor, *, seed: Tensor | int, reduction: str = "batchmean", event_dims: int = 1,
    logvar_clamp: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """``reparameterize_kl`` with the last ``event_dims`` dims forming one sample (torch.distributions'
    ``Independent`` convention) and ``logvar`` clamped first (``torch.clamp``, its gradient included):

    ``z = mu + exp(lv / 2) * philox_randn(seed, mu.shape)``, ``kl = 0.5 * (mu^2 + exp(lv) - lv - 1)``
    with ``lv = clamp(logvar)``; ``per_sample`` sums over the event dims (shape ``mu.shape[:-event_dims]``),
    ``batchmean`` divides the total by ``prod(mu.shape[:-event_dims])``. Differentiable by autograd.
    """
    logvar = clamp_logvar(logvar, logvar_clamp)
    acc = accumulation_dtype(mu.dtype)
    mu_acc, logvar_acc = mu.to(acc), logvar.to(acc)
    eps = philox_randn(seed, mu.shape, mu.device).to(acc)
    z = (mu_acc + torch.exp(logvar_acc / 2) * eps).to(mu.dtype)
    kl = 0.5 * (mu_acc * mu_acc + torch.exp(logvar_acc) - logvar_acc - 1)
    return z, reduce_loss(kl, reduction, tuple(range(-event_dims, 0)), mu.dtype)


def balanced_loss(rec: Tensor, running_loss: Tensor, *, reduction: str = "batchmean") -> Tensor:
    """taming's ``rec / exp(logvar) + logvar`` with ``exp(logvar) = r = running_loss`` (no gradient through
    it), per element of a per-element reconstruction loss ``rec`` of shape ``(N, *)``: ``rec / r + log(r)``.
    Reductions as ``balanced_mse_loss``. For ``rec = (x_hat - x)^2`` it is twice ``balanced_mse_loss``."""
    acc = accumulation_dtype(rec.dtype)
    r = running_loss.detach().to(acc).reshape(())
    return reduce_loss(rec.to(acc) / r + torch.log(r), reduction, _sample_dims(rec), rec.dtype)

"""Reparameterized sampling and closed-form KL in one pass, and its backward.

Inputs are ``(n_rows, D)`` views with any strides (the two halves of an encoder output are read in
place). Program ``p`` owns rows ``[p * BLOCK_R, (p + 1) * BLOCK_R)`` and walks D in ``BLOCK_D``
chunks. The noise of element ``(r, c)`` is ``tl.randn(seed, r * D + c)`` with int64 counters, so the
stream is unique past 2**32 elements and the backward recomputes it instead of storing it.

CLAMP: logvar is clamped to ``[LOGVAR_MIN, LOGVAR_MAX]`` after loading; the backward zeroes the
logvar gradient outside that range (torch.clamp's rule, bounds included).

KL_MODE: 0 no KL, 1 elementwise (``none``), 2 one value per row (``per_sample``), 3 one total
(``batchmean``/``sum``, divided by the integer ``kl_divisor``), written by a one-launch ticket reduction
on a per-call zeroed workspace. Counts travel as integers and are divided in the accumulation dtype:
a Python float argument would reach the GPU as fp32, whatever the tensors' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import accumulation_type, float32_pair, launch, partial_block, row_tile, store_total, workspace

KL_NONE, KL_ELEMENTWISE, KL_PER_ROW, KL_TOTAL = 0, 1, 2, 3
_KL_MODES = {"none": KL_ELEMENTWISE, "per_sample": KL_PER_ROW, "batchmean": KL_TOTAL, "sum": KL_TOTAL}


@triton.jit(do_not_specialize=["n_rows", "kl_divisor"])  # the batch size must not pick a compiled kernel
def reparameterize_kl_fwd_kernel(
    mu_ptr, logvar_ptr, seed_ptr, z_ptr, kl_ptr, partial_ptr, ticket_ptr,
    n_rows, D,
    stride_mu_r, stride_mu_c, stride_lv_r, stride_lv_c,
    kl_divisor,
    HAS_Z: tl.constexpr, KL_MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    CLAMP: tl.constexpr = False, LOGVAR_MIN: tl.constexpr = 0.0, LOGVAR_MAX: tl.constexpr = 0.0,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    if HAS_Z:
        seed = tl.load(seed_ptr)
    row_kl = tl.zeros([BLOCK_R], dtype=ACC)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)  # times a column stride that may pass 2**31
        mask = row_mask[:, None] & (cols < D)[None, :]
        mu = tl.load(mu_ptr + rows[:, None] * stride_mu_r + cols[None, :] * stride_mu_c, mask=mask, other=0.0).to(ACC)
        logvar = tl.load(logvar_ptr + rows[:, None] * stride_lv_r + cols[None, :] * stride_lv_c, mask=mask, other=0.0).to(ACC)
        if CLAMP:  # bounds built in ACC: a bare float constexpr would be an fp32 constant on the GPU
            logvar = tl.minimum(tl.maximum(logvar, tl.full([BLOCK_R, BLOCK_D], LOGVAR_MIN, ACC)),
                                tl.full([BLOCK_R, BLOCK_D], LOGVAR_MAX, ACC))
        flat = rows[:, None] * D + cols[None, :]
        if HAS_Z:
            eps = tl.randn(seed, flat).to(ACC)
            z = mu + tl.exp(logvar * 0.5) * eps
            tl.store(z_ptr + flat, z.to(z_ptr.dtype.element_ty), mask=mask)
        if KL_MODE != 0:
            kl = 0.5 * (mu * mu + tl.exp(logvar) - logvar - 1.0)
            if KL_MODE == 1:
                tl.store(kl_ptr + flat, kl.to(kl_ptr.dtype.element_ty), mask=mask)
            else:
                row_kl += tl.sum(tl.where(mask, kl, 0.0), axis=1)
    if KL_MODE == 2:
        tl.store(kl_ptr + rows, row_kl, mask=row_mask)
    if KL_MODE == 3:
        store_total(partial_ptr, ticket_ptr, kl_ptr, tl.sum(row_kl, axis=0), kl_divisor, BLOCK_P)


@triton.jit(do_not_specialize=["n_rows"])
def reparameterize_kl_bwd_kernel(
    grad_z_ptr, grad_kl_ptr, mu_ptr, logvar_ptr, seed_ptr, grad_mu_ptr, grad_lv_ptr,
    n_rows, D,
    stride_mu_r, stride_mu_c, stride_lv_r, stride_lv_c,
    stride_gz_r, stride_gz_c, stride_gkl_r, stride_gkl_c,
    kl_scale_hi, kl_scale_lo,
    HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    CLAMP: tl.constexpr = False, LOGVAR_MIN: tl.constexpr = 0.0, LOGVAR_MAX: tl.constexpr = 0.0,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    if HAS_GRAD_Z:
        seed = tl.load(seed_ptr)
    # 1 / n_rows as a float32 pair (about 48 bits) for float64; float32 needs hi alone (a division
    # here, or the pair, cost ptxas 8 B of spill on sm_120)
    kl_scale = tl.cast(kl_scale_hi, ACC)
    if ACC == tl.float64:
        kl_scale += tl.cast(kl_scale_lo, ACC)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)  # times a column stride that may pass 2**31
        mask = row_mask[:, None] & (cols < D)[None, :]
        mu = tl.load(mu_ptr + rows[:, None] * stride_mu_r + cols[None, :] * stride_mu_c, mask=mask, other=0.0).to(ACC)
        logvar = tl.load(logvar_ptr + rows[:, None] * stride_lv_r + cols[None, :] * stride_lv_c, mask=mask, other=0.0).to(ACC)
        half = 0.5
        if CLAMP:
            clamped = tl.minimum(tl.maximum(logvar, tl.full([BLOCK_R, BLOCK_D], LOGVAR_MIN, ACC)),
                                 tl.full([BLOCK_R, BLOCK_D], LOGVAR_MAX, ACC))
            # torch.clamp's gradient: d clamped / d logvar is 1 inside [lo, hi] (bounds included), 0 outside and for NaN
            half = tl.where(clamped == logvar, 0.5, 0.0)
            logvar = clamped
        flat = rows[:, None] * D + cols[None, :]
        grad_mu = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        grad_lv = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        if HAS_GRAD_Z:
            g_z = tl.load(grad_z_ptr + rows[:, None] * stride_gz_r + cols[None, :] * stride_gz_c, mask=mask, other=0.0).to(ACC)
            eps = tl.randn(seed, flat).to(ACC)
            grad_mu += g_z
            grad_lv += g_z * eps * tl.exp(logvar * 0.5) * half
        if HAS_GRAD_KL:
            # the reduced gradient broadcasts through zero strides: (r, 0) per row, (0, 0) for a total
            g_kl = tl.load(grad_kl_ptr + rows[:, None] * stride_gkl_r + cols[None, :] * stride_gkl_c, mask=mask, other=0.0).to(ACC)
            g_kl = g_kl * kl_scale
            grad_mu += g_kl * mu
            grad_lv += g_kl * (tl.exp(logvar) - 1.0) * half
        tl.store(grad_mu_ptr + flat, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_lv_ptr + flat, grad_lv.to(grad_lv_ptr.dtype.element_ty), mask=mask)


def _philox_tile(n_rows: int, D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``row_tile`` with 4 warps and one 128-bit access per tensor and thread (8 half-precision, 4 fp32
    or 2 fp64 elements): every element runs a 10-round Philox, and 16 elements a thread spilled."""
    elements_per_thread = 16 // torch.empty((), dtype=dtype).element_size()
    return row_tile(D, max_tile=4 * 32 * elements_per_thread)


def _kl_output(mu: torch.Tensor, reduction: str) -> tuple[torch.Tensor, int]:
    """The KL output and the integer its total is divided by (``n_rows`` for batchmean, else 1)."""
    n_rows, _ = mu.shape
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    if reduction == "none":
        return torch.empty(mu.shape, dtype=mu.dtype, device=mu.device), 1
    if reduction == "per_sample":
        return torch.empty(n_rows, dtype=acc, device=mu.device), 1
    return torch.empty(1, dtype=acc, device=mu.device), (n_rows if reduction == "batchmean" else 1)


def _clamp_flags(logvar_clamp) -> dict:
    """The CLAMP constexprs for ``logvar_clamp = (lo, hi)`` or None."""
    if logvar_clamp is None:
        return {}
    return {"CLAMP": True, "LOGVAR_MIN": float(logvar_clamp[0]), "LOGVAR_MAX": float(logvar_clamp[1])}


def forward(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor | None, reduction: str | None, logvar_clamp=None):
    """``(z, kl)`` for ``(n_rows, D)`` views ``mu`` and ``logvar``; ``z`` is None without ``seed``,
    ``kl`` None without ``reduction``; ``logvar`` clamped to ``logvar_clamp = (lo, hi)`` unless None. ``z`` is contiguous ``(n_rows, D)``; ``kl`` is ``(n_rows, D)``,
    ``(n_rows,)`` or a one-element tensor, by reduction."""
    n_rows, D = mu.shape
    block_r, block_d, num_warps = _philox_tile(n_rows, D, mu.dtype)
    grid = (triton.cdiv(n_rows, block_r),)
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device) if seed is not None else None
    kl, kl_divisor = _kl_output(mu, reduction) if reduction is not None else (None, 1)
    kl_mode = _KL_MODES[reduction] if reduction is not None else KL_NONE
    partials, counter = workspace(grid[0], kl.dtype, mu.device) if kl_mode == KL_TOTAL else (None, None)
    launch(
        reparameterize_kl_fwd_kernel, grid,
        mu, logvar, seed, z, kl, partials, counter,
        n_rows, D, mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1), kl_divisor,
        HAS_Z=z is not None, KL_MODE=kl_mode, ACC=accumulation_type(mu.dtype),
        BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_P=partial_block(),
        num_warps=num_warps, **_clamp_flags(logvar_clamp),
    )
    return z, kl


def backward(grad_z, grad_kl, mu, logvar, seed, reduction, logvar_clamp=None):
    """``(grad_mu, grad_logvar)``, contiguous ``(n_rows, D)``. ``grad_z``: ``(n_rows, D)`` with any strides
    or None; ``grad_kl``: the gradient of the reduced KL (``(n_rows, D)``, ``(n_rows,)`` or one element) or None."""
    n_rows, D = mu.shape
    block_r, block_d, num_warps = _philox_tile(n_rows, D, mu.dtype)
    grad_mu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    grad_lv = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    gz_strides = (grad_z.stride(0), grad_z.stride(1)) if grad_z is not None else (0, 0)
    kl_scale = 1.0
    gkl_strides = (0, 0)
    if grad_kl is not None:
        if reduction == "none":
            gkl_strides = (grad_kl.stride(0), grad_kl.stride(1))
        elif reduction == "per_sample":
            gkl_strides = (grad_kl.stride(0), 0)
        elif reduction == "batchmean":
            kl_scale = 1.0 / n_rows
    launch(
        reparameterize_kl_bwd_kernel, (triton.cdiv(n_rows, block_r),),
        grad_z, grad_kl, mu, logvar, seed, grad_mu, grad_lv,
        n_rows, D, mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1),
        *gz_strides, *gkl_strides, *float32_pair(kl_scale),
        HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None, ACC=accumulation_type(mu.dtype),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps, **_clamp_flags(logvar_clamp),
    )
    return grad_mu, grad_lv

"""The balanced reconstruction loss in one pass, with the running-MSE update, and its backward.

Inputs are ``(N, M)`` views (a batch of N samples of M elements each) tiled by ``BLOCK_R x BLOCK_D``
tiles; program ``p`` owns tile ``(p // n_col_blocks, p % n_col_blocks)``. Everything the forward
returns follows from squared errors: per element ``err^2 / (2 gamma^2) + c`` with
``c = log(gamma^2) / 2 (+ log(2 pi) / 2)``, so a row's loss is ``row_sse / (2 gamma^2) + M c`` and the
total is ``sse / (2 gamma^2) + N M c``. Each program writes its tile's partial sums; the last program
to arrive (ticket, on a per-call zeroed workspace) adds them up in a fixed order, writes the sum of
squared errors, the ``gamma^2`` it used (saved for the backward) and, for the reduced modes, the loss,
and then, with ``RULE``, updates the running estimate in place:
``ema = m r + (1 - m) sse / (N M)``, ``r = ema`` (``ema``) or ``min(r, ema)`` (``min-ema``).
One launch (after the workspace's memset), deterministic.

Scalars that float64 needs exactly travel as integers (counts, divided in the accumulation dtype) or
as float32 ``hi + lo`` pairs (the momentum); ``log(2 pi) / 2`` is an in-kernel ``hi + lo`` literal.
A Python float argument reaches the GPU as fp32.

LOSS_MODE: 1 elementwise (``none``), 2 one value per row (``per_sample``), 3 one total (``batchmean``/``sum``).
RULE: 0 no update, 1 ``ema``, 2 ``min-ema``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import (
    accumulation_dtype, accumulation_type, float32_pair, last_to_arrive, launch, PARTIAL_BLOCK, row_tile, sum_partials,
    workspace,
)

LOSS_ELEMENTWISE, LOSS_PER_ROW, LOSS_TOTAL = 1, 2, 3
_LOSS_MODES = {"none": LOSS_ELEMENTWISE, "per_sample": LOSS_PER_ROW, "batchmean": LOSS_TOTAL, "sum": LOSS_TOTAL}
RULE_NONE, RULE_EMA, RULE_MIN_EMA = 0, 1, 2
_RULES = {None: RULE_NONE, "ema": RULE_EMA, "min-ema": RULE_MIN_EMA}


_HALF_LOG_2PI_HI: tl.constexpr = tl.constexpr(float32_pair(0.5 * math.log(2 * math.pi))[0])
_HALF_LOG_2PI_LO: tl.constexpr = tl.constexpr(float32_pair(0.5 * math.log(2 * math.pi))[1])


@triton.jit(do_not_specialize=["N", "loss_divisor"])  # the batch size must not pick a compiled kernel
def balanced_mse_fwd_kernel(
    x_hat_ptr, x_ptr, gamma2_ptr, loss_ptr, sse_ptr, gamma2_out_ptr, partial_ptr, row_partial_ptr, ticket_ptr,
    N, M, n_col_blocks,
    stride_xh_r, stride_xh_c, stride_x_r, stride_x_c,
    loss_divisor, momentum_hi, momentum_lo,
    LOSS_MODE: tl.constexpr, FULL: tl.constexpr, RULE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    row_block = pid // n_col_blocks
    col_block = pid % n_col_blocks
    rows = row_block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = col_block.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < M)[None, :]
    x_hat = tl.load(x_hat_ptr + rows[:, None] * stride_xh_r + cols[None, :] * stride_xh_c, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + rows[:, None] * stride_x_r + cols[None, :] * stride_x_c, mask=mask, other=0.0).to(ACC)
    gamma2_in = tl.load(gamma2_ptr)
    gamma2 = gamma2_in.to(ACC)
    half_inv_gamma2 = 0.5 / gamma2
    const = 0.5 * tl.log(gamma2)
    if FULL:
        const += tl.cast(_HALF_LOG_2PI_HI, ACC) + tl.cast(_HALF_LOG_2PI_LO, ACC)
    err = x_hat - x
    sq = err * err  # zero where masked
    if LOSS_MODE == 1:
        loss = sq * half_inv_gamma2 + const
        tl.store(loss_ptr + rows[:, None] * M + cols[None, :], loss.to(loss_ptr.dtype.element_ty), mask=mask)
    row_sse = tl.sum(sq, axis=1)
    if LOSS_MODE == 2:
        tl.store(row_partial_ptr + col_block.to(tl.int64) * N + rows, row_sse, mask=row_mask)
    if last_to_arrive(partial_ptr, ticket_ptr, tl.sum(row_sse, axis=0)):
        sse = sum_partials(partial_ptr, tl.num_programs(0), BLOCK_P)
        n_elements = N.to(tl.int64) * M
        tl.store(sse_ptr, sse)
        tl.store(gamma2_out_ptr, gamma2_in)
        if LOSS_MODE == 3:
            total = sse * half_inv_gamma2 + n_elements.to(ACC) * const
            tl.store(loss_ptr, total / loss_divisor)
        if LOSS_MODE == 2:
            for start in range(0, N, BLOCK_P):
                out_rows = start + tl.arange(0, BLOCK_P)
                out_mask = out_rows < N
                acc = tl.zeros([BLOCK_P], dtype=ACC)
                for block in range(0, n_col_blocks):
                    acc += tl.load(row_partial_ptr + block * N + out_rows, mask=out_mask, other=0.0, volatile=True)
                tl.store(loss_ptr + out_rows, acc * half_inv_gamma2 + M * const, mask=out_mask)
        if RULE != 0:
            # in the running estimate's dtype, as torch would do it (r * m + mse * (1 - m))
            r = gamma2_in
            m = tl.cast(momentum_hi, ACC) + tl.cast(momentum_lo, ACC)
            batch_mse = (sse / n_elements.to(ACC)).to(r.dtype)
            ema = r * m.to(r.dtype) + batch_mse * (1.0 - m).to(r.dtype)
            if RULE == 2:
                ema = tl.minimum(r, ema)
            # a non-finite batch (the loss reports it) leaves the running estimate as it was
            finite = (batch_mse == batch_mse) & (tl.abs(batch_mse) < float("inf"))
            tl.store(gamma2_ptr, tl.where(finite, ema, r))


@triton.jit(do_not_specialize=["N", "grad_divisor"])
def balanced_mse_bwd_kernel(
    grad_ptr, x_hat_ptr, x_ptr, gamma2_ptr, grad_x_hat_ptr, grad_x_ptr,
    N, M, n_col_blocks,
    stride_xh_r, stride_xh_c, stride_x_r, stride_x_c, stride_g_r, stride_g_c,
    grad_divisor,
    NEED_X_HAT: tl.constexpr, NEED_X: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid // n_col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < M)[None, :]
    x_hat = tl.load(x_hat_ptr + rows[:, None] * stride_xh_r + cols[None, :] * stride_xh_c, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + rows[:, None] * stride_x_r + cols[None, :] * stride_x_c, mask=mask, other=0.0).to(ACC)
    # the reduced gradient broadcasts through zero strides: (r, 0) per row, (0, 0) for a total
    g = tl.load(grad_ptr + rows[:, None] * stride_g_r + cols[None, :] * stride_g_c, mask=mask, other=0.0).to(ACC)
    scale = 1.0 / (tl.load(gamma2_ptr).to(ACC) * grad_divisor)  # once per program: no division per element
    grad_x_hat = g * (x_hat - x) * scale
    flat = rows[:, None] * M + cols[None, :]
    if NEED_X_HAT:
        tl.store(grad_x_hat_ptr + flat, grad_x_hat.to(grad_x_hat_ptr.dtype.element_ty), mask=mask)
    if NEED_X:
        tl.store(grad_x_ptr + flat, (-grad_x_hat).to(grad_x_ptr.dtype.element_ty), mask=mask)


def _tiles(N: int, M: int) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps, n_col_blocks)``: tiles of at most 4096 elements across both dims."""
    block_r, block_d, num_warps = row_tile(M)
    return block_r, block_d, num_warps, triton.cdiv(M, block_d)


def _acc_dtype(x_hat: torch.Tensor, x: torch.Tensor) -> torch.dtype:
    return accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))


def forward(x_hat: torch.Tensor, x: torch.Tensor, gamma2: torch.Tensor, reduction: str, full: bool,
            rule: str | None = None, momentum: float = 0.0):
    """``(loss, sse, gamma2_used)`` for ``(N, M)`` views: ``loss`` contiguous ``(N, M)`` (dtype of x_hat),
    ``(N,)`` or one element (accumulation dtype) by reduction; ``sse`` the one-element sum of squared
    errors; ``gamma2_used`` a one-element copy of ``gamma2`` as the loss used it. With ``rule``
    (``ema`` or ``min-ema``), ``gamma2`` is updated in place by the last program."""
    N, M = x_hat.shape
    block_r, block_d, num_warps, n_col_blocks = _tiles(N, M)
    n_programs = triton.cdiv(N, block_r) * n_col_blocks
    acc = _acc_dtype(x_hat, x)
    mode = _LOSS_MODES[reduction]
    device = x_hat.device
    if mode == LOSS_ELEMENTWISE:
        loss = torch.empty((N, M), dtype=x_hat.dtype, device=device)
    else:
        loss = torch.empty(N if mode == LOSS_PER_ROW else 1, dtype=acc, device=device)
    sse = torch.empty(1, dtype=acc, device=device)
    gamma2_used = torch.empty(1, dtype=gamma2.dtype, device=device)
    partials, counter = workspace(n_programs, acc, device)
    row_partials = torch.empty((n_col_blocks, N), dtype=acc, device=device) if mode == LOSS_PER_ROW else None
    launch(
        balanced_mse_fwd_kernel, (n_programs,),
        x_hat, x, gamma2, loss, sse, gamma2_used, partials, row_partials, counter,
        N, M, n_col_blocks, x_hat.stride(0), x_hat.stride(1), x.stride(0), x.stride(1),
        N if reduction == "batchmean" else 1, *float32_pair(momentum),
        LOSS_MODE=mode, FULL=full, RULE=_RULES[rule], ACC=accumulation_type(acc),
        BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_P=PARTIAL_BLOCK,
        num_warps=num_warps,
    )
    return loss, sse, gamma2_used


def backward(grad: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor, gamma2: torch.Tensor, reduction: str,
             need_x_hat: bool, need_x: bool):
    """``(grad_x_hat, grad_x)`` as contiguous ``(N, M)`` tensors (None where not needed). ``grad``: the
    gradient of the loss: ``(N, M)`` with any strides, ``(N,)`` or one element, by reduction."""
    N, M = x_hat.shape
    block_r, block_d, num_warps, n_col_blocks = _tiles(N, M)
    if reduction == "none":
        grad_strides = (grad.stride(0), grad.stride(1))
    elif reduction == "per_sample":
        grad_strides = (grad.stride(0), 0)
    else:
        grad_strides = (0, 0)
    grad_x_hat = torch.empty((N, M), dtype=x_hat.dtype, device=x_hat.device) if need_x_hat else None
    grad_x = torch.empty((N, M), dtype=x.dtype, device=x.device) if need_x else None
    launch(
        balanced_mse_bwd_kernel, (triton.cdiv(N, block_r) * n_col_blocks,),
        grad, x_hat, x, gamma2, grad_x_hat, grad_x,
        N, M, n_col_blocks, x_hat.stride(0), x_hat.stride(1), x.stride(0), x.stride(1), *grad_strides,
        N if reduction == "batchmean" else 1,
        NEED_X_HAT=need_x_hat, NEED_X=need_x, ACC=accumulation_type(_acc_dtype(x_hat, x)),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
    return grad_x_hat, grad_x

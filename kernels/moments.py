"""Per-dimension moments, renormalization and the variance law, with their backwards.

Layout: every input is an ``(A, N, C)`` view with any strides. ``N`` is the reduced dim (the batch);
the ``F = A * C`` columns are the dimensions that get a statistic each, column ``f = a * C + c``. So
``(N, F)`` rows are ``(1, N, F)``, and a middle dim of a contiguous tensor is read in place. Outputs
of the input's size are contiguous ``(A, N, C)``; statistics are contiguous ``(F,)``.

Column reductions (the moments, the backward's column sums) take at most two launches. The rows are
cut into chunks of whole ``BLOCK_R`` tiles; program ``(chunk, column block)`` reduces its chunk and
writes a partial per column, and a finish kernel combines the chunks of a column in a fixed order:
``BLOCK_C`` chunks at a time by a tree over a ``(BLOCK_C, BLOCK_D)`` tile (not one chunk after another:
with ~4 chunks per multiprocessor that serial loop was the finish kernel's whole cost).
When one chunk covers all rows the first launch writes the result itself (``FINAL``) and the finish
kernel is not launched. No float atomics: the result is the same bits at every call.

Moments are Welford per tile (the tile's mean, then the squared deviations from it) merged with
Chan's parallel combine, tile after tile and then chunk after chunk. All of it runs on the data
shifted by the first row, so a mean much larger than the spread costs no precision.

One value across all columns (``renormalize``'s scalar factor, the total of its backward) is reduced
by the programs that finish columns with the ticket of ``_launch`` (a per-call zeroed workspace):
the last to arrive adds the partials up in program order.

Python floats reach a kernel as float32; the targets and ``eps`` are passed as a float32 pair
``hi + lo`` so that float64 inputs get them to about 48 bits.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import (
    accumulation_dtype, accumulation_type, float32_pair, last_to_arrive, launch, PARTIAL_BLOCK, row_tile, store_total,
    sum_partials, workspace,
)

_MAX_COLS = 256  # column blocks of at most 256 columns: wide inputs still spread over programs
_CPU_PROGRAMS = 4  # the interpreter runs programs one after another: a few chunks are enough there


# -------------------------------------------------------------------------------- jitted helpers
@triton.jit
def _column_offsets(cols, C, stride_a, stride_c):
    """Memory offsets of columns ``cols`` (``f = a * C + c``) of an ``(A, N, C)`` view, row 0."""
    a = cols // C
    return a * stride_a + (cols - a * C) * stride_c


@triton.jit
def _contiguous_offsets(rows, cols, N, C):
    """Offsets of the ``(rows, cols)`` tile of a contiguous ``(A, N, C)`` tensor (int64 throughout)."""
    a = cols // C
    return (a[None, :] * N + rows[:, None]) * C + (cols - a * C)[None, :]


@triton.jit
def _chan_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.: the mean and sum of squared deviations of two disjoint sets of ``n_a`` and ``n_b`` rows."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@triton.jit
def _pair(hi, lo, ACC: tl.constexpr):
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _per_column(ptr, cols, stride, hi, lo, col_mask, IS_TENSOR: tl.constexpr, ACC: tl.constexpr):
    """A target per column: read from a tensor (stride 0 for a one-element tensor) or the scalar ``hi + lo``."""
    if IS_TENSOR:
        value = tl.load(ptr + cols * stride, mask=col_mask, other=0.0).to(ACC)
    else:
        value = tl.zeros(cols.shape, ACC) + _pair(hi, lo, ACC)
    return value


@triton.jit
def _store_moments(
    mean_shifted, m2, exp_sum, shift, cols, col_mask, mean_ptr, var_ptr, N, denominator,
    scalars_ptr, partial_ptr, ticket_ptr, tv_ptr, stride_tv, tv_hi, tv_lo, eps_hi, eps_lo, F,
    HAS_LOGVAR: tl.constexpr, SCALE: tl.constexpr, TV_TENSOR: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Write ``mean`` and ``var`` of the columns (``+ E[exp(logvar)]`` for the variance law) and, with
    SCALE, take part in the reduction of ``renormalize``'s scalar factor
    ``scalars = (sqrt(mean(target_var)) / S, S)``, ``S = mean(sqrt(var + eps))``."""
    mean = shift + mean_shifted
    var = m2 / denominator
    if HAS_LOGVAR:
        var += exp_sum / N
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(var_ptr + cols, var, mask=col_mask)
    if SCALE:
        n_programs = tl.num_programs(0)
        if TV_TENSOR:
            tv = tl.load(tv_ptr + cols * stride_tv, mask=col_mask, other=0.0).to(ACC)
            tl.store(partial_ptr + n_programs + tl.program_id(0), tl.sum(tv, axis=0))
        sd = tl.sqrt(var + _pair(eps_hi, eps_lo, ACC))
        if last_to_arrive(partial_ptr, ticket_ptr, tl.sum(tl.where(col_mask, sd, 0.0), axis=0)):
            mean_sd = sum_partials(partial_ptr, n_programs, BLOCK_P) / F
            if TV_TENSOR:
                mean_tv = sum_partials(partial_ptr + n_programs, n_programs, BLOCK_P) / F
            else:
                mean_tv = _pair(tv_hi, tv_lo, ACC)
            tl.store(scalars_ptr, tl.sqrt(mean_tv) / mean_sd)
            tl.store(scalars_ptr + 1, mean_sd)


# ----------------------------------------------------------------------------------- moments
@triton.jit(do_not_specialize=["N", "rows_per_chunk", "denominator"])  # the batch must not pick a compiled kernel
def moments_partial_kernel(
    z_ptr, logvar_ptr, work_ptr, mean_ptr, var_ptr, scalars_ptr, partial_ptr, ticket_ptr, tv_ptr,
    N, F, C, rows_per_chunk, n_col_blocks, denominator,
    stride_za, stride_zn, stride_zc, stride_la, stride_ln, stride_lc, stride_tv,
    tv_hi, tv_lo, eps_hi, eps_lo,
    FINAL: tl.constexpr, HAS_LOGVAR: tl.constexpr, SCALE: tl.constexpr, TV_TENSOR: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    chunk = pid // n_col_blocks
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < F
    z_cols = _column_offsets(cols, C, stride_za, stride_zc)
    shift = tl.load(z_ptr + z_cols, mask=col_mask, other=0.0).to(ACC)
    if HAS_LOGVAR:
        lv_cols = _column_offsets(cols, C, stride_la, stride_lc)
    row_begin = chunk.to(tl.int64) * rows_per_chunk
    row_end = tl.minimum(row_begin + rows_per_chunk, N)
    mean = tl.zeros([BLOCK_D], dtype=ACC)
    m2 = tl.zeros([BLOCK_D], dtype=ACC)
    exp_sum = tl.zeros([BLOCK_D], dtype=ACC)
    for start in range(row_begin, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_zn + z_cols[None, :], mask=mask, other=0.0).to(ACC)
        shifted = tl.where(mask, z - shift[None, :], 0.0)
        n_tile = tl.minimum(row_end - start, BLOCK_R).to(ACC)
        tile_mean = tl.sum(shifted, axis=0) / n_tile
        deviation = tl.where(mask, shifted - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)
        mean, m2 = _chan_combine(mean, m2, (start - row_begin).to(ACC), tile_mean, tile_m2, n_tile)
        if HAS_LOGVAR:
            logvar = tl.load(logvar_ptr + rows[:, None] * stride_ln + lv_cols[None, :], mask=mask, other=0.0).to(ACC)
            exp_sum += tl.sum(tl.where(mask, tl.exp(logvar), 0.0), axis=0)
    if FINAL:
        _store_moments(
            mean, m2, exp_sum, shift, cols, col_mask, mean_ptr, var_ptr, N, denominator,
            scalars_ptr, partial_ptr, ticket_ptr, tv_ptr, stride_tv, tv_hi, tv_lo, eps_hi, eps_lo, F,
            HAS_LOGVAR, SCALE, TV_TENSOR, ACC, BLOCK_P,
        )
    else:
        if SCALE:
            if pid == 0:  # the finish kernel's ticket counter, which this call allocated unzeroed
                tl.store(ticket_ptr, 0)
        out = work_ptr + chunk.to(tl.int64) * 3 * F + cols
        tl.store(out, mean, mask=col_mask)
        tl.store(out + F, m2, mask=col_mask)
        if HAS_LOGVAR:
            tl.store(out + F + F, exp_sum, mask=col_mask)  # not 2 * F: a 32-bit product on an address path


@triton.jit(do_not_specialize=["N", "rows_per_chunk", "n_chunks", "denominator"])
def moments_finish_kernel(
    z_ptr, work_ptr, mean_ptr, var_ptr, scalars_ptr, partial_ptr, ticket_ptr, tv_ptr,
    N, F, C, rows_per_chunk, n_chunks, denominator,
    stride_za, stride_zc, stride_tv,
    tv_hi, tv_lo, eps_hi, eps_lo,
    HAS_LOGVAR: tl.constexpr, SCALE: tl.constexpr, TV_TENSOR: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Combine the chunks of ``BLOCK_D`` columns, ``BLOCK_C`` chunks at a time: a ``(BLOCK_C, BLOCK_D)``
    tile is merged by a fixed-order tree (``tl.sum``: the pooled mean, then
    ``M2 = sum(M2_c + n_c (mean_c - mean)^2)``), and tiles by Chan's combine."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < F
    shift = tl.load(z_ptr + _column_offsets(cols, C, stride_za, stride_zc), mask=col_mask, other=0.0).to(ACC)
    mean = tl.zeros([BLOCK_D], dtype=ACC)
    m2 = tl.zeros([BLOCK_D], dtype=ACC)
    exp_sum = tl.zeros([BLOCK_D], dtype=ACC)
    for first in range(0, n_chunks, BLOCK_C):
        chunks = tl.cast(first, tl.int64) + tl.arange(0, BLOCK_C)
        chunk_mask = chunks < n_chunks
        n_chunk = tl.where(chunk_mask, tl.minimum(N - chunks * rows_per_chunk, rows_per_chunk), 0).to(ACC)
        mask = chunk_mask[:, None] & col_mask[None, :]
        part = work_ptr + chunks[:, None] * 3 * F + cols[None, :]
        chunk_mean = tl.load(part, mask=mask, other=0.0)
        chunk_m2 = tl.load(part + F, mask=mask, other=0.0)
        n_tile = tl.sum(n_chunk, axis=0)
        tile_mean = tl.sum(n_chunk[:, None] * chunk_mean, axis=0) / n_tile
        deviation = tl.where(mask, chunk_mean - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(chunk_m2 + n_chunk[:, None] * deviation * deviation, axis=0)
        n_before = (tl.cast(first, tl.int64) * rows_per_chunk).to(ACC)
        mean, m2 = _chan_combine(mean, m2, n_before, tile_mean, tile_m2, n_tile)
        if HAS_LOGVAR:
            exp_sum += tl.sum(tl.load(part + F + F, mask=mask, other=0.0), axis=0)  # not 2 * F (32 bits)
    _store_moments(
        mean, m2, exp_sum, shift, cols, col_mask, mean_ptr, var_ptr, N, denominator,
        scalars_ptr, partial_ptr, ticket_ptr, tv_ptr, stride_tv, tv_hi, tv_lo, eps_hi, eps_lo, F,
        HAS_LOGVAR, SCALE, TV_TENSOR, ACC, BLOCK_P,
    )


@triton.jit(do_not_specialize=["N", "denominator"])
def moments_bwd_kernel(
    grad_mean_ptr, grad_var_ptr, z_ptr, mean_ptr, logvar_ptr, grad_z_ptr, grad_lv_ptr,
    N, F, C, n_col_blocks, denominator,
    stride_za, stride_zn, stride_zc, stride_la, stride_ln, stride_lc, stride_gm, stride_gv,
    HAS_GRAD_MEAN: tl.constexpr, HAS_GRAD_VAR: tl.constexpr, HAS_LOGVAR: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``d/dz = g_mean / N + g_var * 2 (z - mean) / denominator`` and, for the variance law,
    ``d/dlogvar = g_var * exp(logvar) / N``."""
    pid = tl.program_id(0)
    rows = (pid // n_col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < F
    mask = (rows < N)[:, None] & col_mask[None, :]
    out = _contiguous_offsets(rows, cols, N, C)
    grad_z = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    if HAS_GRAD_MEAN:
        g_mean = tl.load(grad_mean_ptr + cols * stride_gm, mask=col_mask, other=0.0).to(ACC)
        grad_z += (g_mean / N)[None, :]
    if HAS_GRAD_VAR:
        g_var = tl.load(grad_var_ptr + cols * stride_gv, mask=col_mask, other=0.0).to(ACC)
        z = tl.load(z_ptr + rows[:, None] * stride_zn + _column_offsets(cols, C, stride_za, stride_zc)[None, :],
                    mask=mask, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
        grad_z += (2.0 * g_var / denominator)[None, :] * (z - mean[None, :])
    tl.store(grad_z_ptr + out, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)
    if HAS_LOGVAR:
        grad_lv = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
        if HAS_GRAD_VAR:
            logvar = tl.load(
                logvar_ptr + rows[:, None] * stride_ln + _column_offsets(cols, C, stride_la, stride_lc)[None, :],
                mask=mask, other=0.0,
            ).to(ACC)
            grad_lv = (g_var / N)[None, :] * tl.exp(logvar)
        tl.store(grad_lv_ptr + out, grad_lv.to(grad_lv_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------- renormalize
@triton.jit(do_not_specialize=["N"])
def renormalize_fwd_kernel(
    z_ptr, out_ptr, mean_ptr, var_ptr, scalars_ptr, tm_ptr, tv_ptr,
    N, F, C, n_col_blocks,
    stride_za, stride_zn, stride_zc, stride_tm, stride_tv,
    tm_hi, tm_lo, tv_hi, tv_lo, eps_hi, eps_lo,
    SCALAR_MODE: tl.constexpr, TM_TENSOR: tl.constexpr, TV_TENSOR: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``per_dim``: ``(z - mean) * sqrt(target_var) / sqrt(var + eps) + target_mean``;
    ``scalar``: ``z * scalars[0]``."""
    pid = tl.program_id(0)
    rows = (pid // n_col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < F
    mask = (rows < N)[:, None] & col_mask[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_zn + _column_offsets(cols, C, stride_za, stride_zc)[None, :],
                mask=mask, other=0.0).to(ACC)
    if SCALAR_MODE:
        out = z * tl.load(scalars_ptr)
    else:
        mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
        var = tl.load(var_ptr + cols, mask=col_mask, other=1.0)
        tm = _per_column(tm_ptr, cols, stride_tm, tm_hi, tm_lo, col_mask, TM_TENSOR, ACC)
        tv = _per_column(tv_ptr, cols, stride_tv, tv_hi, tv_lo, col_mask, TV_TENSOR, ACC)
        scale = tl.sqrt(tv) / tl.sqrt(var + _pair(eps_hi, eps_lo, ACC))
        out = (z - mean[None, :]) * scale[None, :] + tm[None, :]
    out_offsets = _contiguous_offsets(rows, cols, N, C)
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_column_sums(
    sum_g, sum_gy, cols, col_mask, sum_g_ptr, sum_gy_ptr, partial_ptr, ticket_ptr, total_ptr,
    SCALAR_MODE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``per_dim``: write the column sums; ``scalar``: take part in the total of ``sum_gy``, which holds
    ``sum(g z)``."""
    if SCALAR_MODE:
        store_total(partial_ptr, ticket_ptr, total_ptr, tl.sum(sum_gy, axis=0), 1, BLOCK_P)
    else:
        tl.store(sum_g_ptr + cols, sum_g, mask=col_mask)
        tl.store(sum_gy_ptr + cols, sum_gy, mask=col_mask)


@triton.jit(do_not_specialize=["N", "rows_per_chunk"])
def renormalize_bwd_partial_kernel(
    grad_ptr, z_ptr, mean_ptr, var_ptr, work_ptr, sum_g_ptr, sum_gy_ptr, partial_ptr, ticket_ptr, total_ptr,
    N, F, C, rows_per_chunk, n_col_blocks,
    stride_ga, stride_gn, stride_gc, stride_za, stride_zn, stride_zc,
    eps_hi, eps_lo,
    FINAL: tl.constexpr, SCALAR_MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Column sums of ``g`` and ``g * zhat``, ``zhat = (z - mean) / sqrt(var + eps)`` (``per_dim``),
    or of ``g * z`` (``scalar``), over a chunk of rows."""
    pid = tl.program_id(0)
    chunk = pid // n_col_blocks
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < F
    g_cols = _column_offsets(cols, C, stride_ga, stride_gc)
    z_cols = _column_offsets(cols, C, stride_za, stride_zc)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + cols, mask=col_mask, other=1.0) + _pair(eps_hi, eps_lo, ACC))
    row_begin = chunk.to(tl.int64) * rows_per_chunk
    row_end = tl.minimum(row_begin + rows_per_chunk, N)
    sum_g = tl.zeros([BLOCK_D], dtype=ACC)
    sum_gy = tl.zeros([BLOCK_D], dtype=ACC)
    for start in range(row_begin, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        g = tl.load(grad_ptr + rows[:, None] * stride_gn + g_cols[None, :], mask=mask, other=0.0).to(ACC)
        z = tl.load(z_ptr + rows[:, None] * stride_zn + z_cols[None, :], mask=mask, other=0.0).to(ACC)
        if SCALAR_MODE:
            sum_gy += tl.sum(g * z, axis=0)
        else:
            sum_g += tl.sum(g, axis=0)
            sum_gy += tl.sum(g * ((z - mean[None, :]) * rstd[None, :]), axis=0)
    if FINAL:
        _store_column_sums(sum_g, sum_gy, cols, col_mask, sum_g_ptr, sum_gy_ptr, partial_ptr, ticket_ptr, total_ptr,
                           SCALAR_MODE, BLOCK_P)
    else:
        if SCALAR_MODE:
            if pid == 0:  # the finish kernel's ticket counter, which this call allocated unzeroed
                tl.store(ticket_ptr, 0)
        out = work_ptr + chunk.to(tl.int64) * 2 * F + cols
        tl.store(out, sum_g, mask=col_mask)
        tl.store(out + F, sum_gy, mask=col_mask)


@triton.jit(do_not_specialize=["n_chunks"])
def renormalize_bwd_finish_kernel(
    work_ptr, sum_g_ptr, sum_gy_ptr, partial_ptr, ticket_ptr, total_ptr, F, n_chunks,
    SCALAR_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Add up the chunks' column sums, ``BLOCK_C`` chunks at a time by a fixed-order tree."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < F
    sum_g = tl.zeros([BLOCK_D], dtype=ACC)
    sum_gy = tl.zeros([BLOCK_D], dtype=ACC)
    for first in range(0, n_chunks, BLOCK_C):
        chunks = tl.cast(first, tl.int64) + tl.arange(0, BLOCK_C)
        mask = (chunks < n_chunks)[:, None] & col_mask[None, :]
        part = work_ptr + chunks[:, None] * 2 * F + cols[None, :]
        sum_g += tl.sum(tl.load(part, mask=mask, other=0.0), axis=0)
        sum_gy += tl.sum(tl.load(part + F, mask=mask, other=0.0), axis=0)
    _store_column_sums(sum_g, sum_gy, cols, col_mask, sum_g_ptr, sum_gy_ptr, partial_ptr, ticket_ptr, total_ptr,
                       SCALAR_MODE, BLOCK_P)


@triton.jit(do_not_specialize=["N"])
def renormalize_bwd_kernel(
    grad_ptr, z_ptr, mean_ptr, var_ptr, scalars_ptr, tv_ptr, sum_g_ptr, sum_gy_ptr, total_ptr, grad_z_ptr,
    N, F, C, n_col_blocks,
    stride_ga, stride_gn, stride_gc, stride_za, stride_zn, stride_zc, stride_tv,
    tv_hi, tv_lo, eps_hi, eps_lo,
    SCALAR_MODE: tl.constexpr, TV_TENSOR: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``per_dim``: ``d/dz = rstd * sqrt(target_var) * (g - sum(g) / N - zhat * sum(g zhat) / N)``;
    ``scalar``: ``d/dz = c g - c sum(g z) / (S F N) * (z - mean) / sqrt(var + eps)`` with ``c, S = scalars``."""
    pid = tl.program_id(0)
    rows = (pid // n_col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < F
    mask = (rows < N)[:, None] & col_mask[None, :]
    g = tl.load(grad_ptr + rows[:, None] * stride_gn + _column_offsets(cols, C, stride_ga, stride_gc)[None, :],
                mask=mask, other=0.0).to(ACC)
    z = tl.load(z_ptr + rows[:, None] * stride_zn + _column_offsets(cols, C, stride_za, stride_zc)[None, :],
                mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0)
    rstd = 1.0 / tl.sqrt(var + _pair(eps_hi, eps_lo, ACC))
    if SCALAR_MODE:
        factor = tl.load(scalars_ptr)
        mean_sd = tl.load(scalars_ptr + 1)
        coef = factor * tl.load(total_ptr) / (mean_sd * F * N)
        centered = tl.where(mask, z - mean[None, :], 0.0)  # masked lanes: 0, not a -mean coef rstd that overflows fp16
        grad_z = factor * g - (coef * rstd)[None, :] * centered
    else:
        tv = _per_column(tv_ptr, cols, stride_tv, tv_hi, tv_lo, col_mask, TV_TENSOR, ACC)
        mean_g = tl.load(sum_g_ptr + cols, mask=col_mask, other=0.0) / N
        mean_gy = tl.load(sum_gy_ptr + cols, mask=col_mask, other=0.0) / N
        zhat = (z - mean[None, :]) * rstd[None, :]
        grad_z = (rstd * tl.sqrt(tv))[None, :] * (g - mean_g[None, :] - zhat * mean_gy[None, :])
    out = _contiguous_offsets(rows, cols, N, C)
    tl.store(grad_z_ptr + out, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------- launchers
class _Plan(NamedTuple):
    block_r: int
    block_d: int
    num_warps: int
    n_col_blocks: int
    rows_per_chunk: int
    n_chunks: int

    @property
    def finish_chunks(self) -> int:
        """``BLOCK_C``: chunks that a finish kernel combines at once, in tiles of 1024 elements (a
        constant per column count, never per batch)."""
        return max(1, 1024 // self.block_d)

    @property
    def finish_warps(self) -> int:
        """Warps of the finish kernels' ``(BLOCK_C, BLOCK_D)`` tiles of 1024 elements: 4 (8 elements a
        thread; ptxas spilled the fp64 variance-law finish on sm_120 with 8 warps on 64 columns)."""
        return 4


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """Programs a column reduction should spread over: a few per multiprocessor on a GPU."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_PROGRAMS


def _plan(shape: torch.Size, device: torch.device) -> _Plan:
    """Tiles and row chunks for an ``(A, N, C)`` problem."""
    _, N, C = shape
    F = shape[0] * C
    block_r, block_d, num_warps = row_tile(F, max_cols=_MAX_COLS)
    n_col_blocks = triton.cdiv(F, block_d)
    n_row_tiles = triton.cdiv(N, block_r)
    wanted_chunks = max(1, _target_programs(device) // n_col_blocks)
    rows_per_chunk = triton.cdiv(n_row_tiles, min(n_row_tiles, wanted_chunks)) * block_r
    return _Plan(block_r, block_d, num_warps, n_col_blocks, rows_per_chunk, triton.cdiv(N, rows_per_chunk))


def _grid_tiles(plan: _Plan, N: int) -> tuple[int]:
    """Programs of the elementwise kernels: one per ``BLOCK_R x BLOCK_D`` tile."""
    return (triton.cdiv(N, plan.block_r) * plan.n_col_blocks,)


def _target(target) -> tuple[torch.Tensor | None, int, float, float]:
    """``(tensor, stride, hi, lo)`` of a target: a tensor of ``F`` (or one) elements, or a Python float."""
    if isinstance(target, torch.Tensor):
        flat = target.reshape(-1)
        return flat, (flat.stride(0) if flat.numel() > 1 else 0), 0.0, 0.0
    return None, 0, *float32_pair(float(target))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """``(stride_a, stride_n, stride_c)`` of an ``(A, N, C)`` view."""
    return t.stride(0), t.stride(1), t.stride(2)


def moments(z: torch.Tensor, *, correction: int = 0, logvar: torch.Tensor | None = None, target_var=None,
            eps: float = 1e-6):
    """``(mean, var, scalars)`` over dim 1 of an ``(A, N, C)`` view ``z``: ``(A * C,)`` tensors in the
    accumulation dtype, ``var = sum((z - mean)^2) / (N - correction)``.

    ``logvar`` (same shape, any strides): add ``mean(exp(logvar))`` to ``var`` (the variance law).
    ``target_var`` (a float or a tensor of ``A * C`` or one element): also compute ``renormalize``'s
    scalar-mode ``scalars = (sqrt(mean(target_var)) / S, S)`` with ``S = mean(sqrt(var + eps))``; else None.
    One launch when the rows fit one chunk, two otherwise.
    """
    A, N, C = z.shape
    F = A * C
    plan = _plan(z.shape, z.device)
    acc = accumulation_dtype(z.dtype)
    mean = torch.empty(F, dtype=acc, device=z.device)
    var = torch.empty(F, dtype=acc, device=z.device)
    scale = target_var is not None
    scalars = torch.empty(2, dtype=acc, device=z.device) if scale else None
    final = plan.n_chunks == 1
    partials, counter = workspace(2 * plan.n_col_blocks, acc, z.device, zeroed=final) if scale else (None, None)
    tv, stride_tv, tv_hi, tv_lo = _target(target_var) if scale else (None, 0, 0.0, 0.0)
    eps_pair = float32_pair(eps) if scale else (0.0, 0.0)
    # per chunk and column: the mean and M2 of the shifted data and the sum of exp(logvar)
    work = None if final else torch.empty((plan.n_chunks, 3, F), dtype=acc, device=z.device)
    lv_strides = _strides(logvar) if logvar is not None else (0, 0, 0)
    flags = dict(HAS_LOGVAR=logvar is not None, SCALE=scale, TV_TENSOR=tv is not None, ACC=accumulation_type(z.dtype))
    launch(
        moments_partial_kernel, (plan.n_chunks * plan.n_col_blocks,),
        z, logvar, work, mean, var, scalars, partials, counter, tv,
        N, F, C, plan.rows_per_chunk, plan.n_col_blocks, N - correction,
        *_strides(z), *lv_strides, stride_tv, tv_hi, tv_lo, *eps_pair,
        FINAL=final, **flags, BLOCK_R=plan.block_r, BLOCK_D=plan.block_d, BLOCK_P=PARTIAL_BLOCK,
        # 16-bit inputs with 8 warps: Triton 3.8 held ptxas to 64 registers and spilled 8 B on sm_120
        num_warps=4 if z.element_size() == 2 else plan.num_warps,
    )
    if not final:
        launch(
            moments_finish_kernel, (plan.n_col_blocks,),
            z, work, mean, var, scalars, partials, counter, tv,
            N, F, C, plan.rows_per_chunk, plan.n_chunks, N - correction,
            z.stride(0), z.stride(2), stride_tv, tv_hi, tv_lo, *eps_pair,
            **flags, BLOCK_D=plan.block_d, BLOCK_C=plan.finish_chunks, BLOCK_P=PARTIAL_BLOCK,
            num_warps=plan.finish_warps,
        )
    return mean, var, scalars


def moments_backward(grad_mean, grad_var, z, mean, *, correction: int = 0, logvar=None):
    """``(grad_z, grad_logvar)`` as contiguous ``(A, N, C)`` tensors (``grad_logvar`` None without ``logvar``).
    ``grad_mean``, ``grad_var``: ``(A * C,)`` with any stride, or None. One launch."""
    A, N, C = z.shape
    plan = _plan(z.shape, z.device)
    grad_z = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    grad_lv = torch.empty(z.shape, dtype=logvar.dtype, device=z.device) if logvar is not None else None
    launch(
        moments_bwd_kernel, _grid_tiles(plan, N),
        grad_mean, grad_var, z, mean, logvar, grad_z, grad_lv,
        N, A * C, C, plan.n_col_blocks, N - correction,
        *_strides(z), *(_strides(logvar) if logvar is not None else (0, 0, 0)),
        grad_mean.stride(0) if grad_mean is not None else 0, grad_var.stride(0) if grad_var is not None else 0,
        HAS_GRAD_MEAN=grad_mean is not None, HAS_GRAD_VAR=grad_var is not None, HAS_LOGVAR=logvar is not None,
        ACC=accumulation_type(z.dtype), BLOCK_R=plan.block_r, BLOCK_D=plan.block_d, num_warps=plan.num_warps,
    )
    return grad_z, grad_lv


def renormalize(z, target_mean, target_var, *, scalar_mode: bool, eps: float):
    """``(out, mean, var, scalars)`` for an ``(A, N, C)`` view ``z``: ``out`` contiguous ``(A, N, C)`` in
    z's dtype, the moments over dim 1 as ``(A * C,)`` and, in scalar mode, ``scalars = (factor, mean(sqrt(var + eps)))``
    (an empty tensor otherwise). Targets: floats or tensors of ``A * C`` (or one) elements. At most 3 launches."""
    A, N, C = z.shape
    mean, var, scalars = moments(z, target_var=target_var if scalar_mode else None, eps=eps)
    if scalars is None:
        scalars = mean.new_empty(0)
    plan = _plan(z.shape, z.device)
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    tm, stride_tm, tm_hi, tm_lo = _target(target_mean)
    tv, stride_tv, tv_hi, tv_lo = _target(target_var)
    launch(
        renormalize_fwd_kernel, _grid_tiles(plan, N),
        z, out, mean, var, scalars, tm, tv,
        N, A * C, C, plan.n_col_blocks, *_strides(z), stride_tm, stride_tv,
        tm_hi, tm_lo, tv_hi, tv_lo, *float32_pair(eps),
        SCALAR_MODE=scalar_mode, TM_TENSOR=tm is not None, TV_TENSOR=tv is not None, ACC=accumulation_type(z.dtype),
        BLOCK_R=plan.block_r, BLOCK_D=plan.block_d, num_warps=plan.num_warps,
    )
    return out, mean, var, scalars


def renormalize_backward(grad, z, mean, var, scalars, target_var, *, scalar_mode: bool, eps: float):
    """``grad_z`` as a contiguous ``(A, N, C)`` tensor; ``grad`` and ``z`` are ``(A, N, C)`` views.
    Column sums (one launch, or partials and finish), then the gradient (one launch)."""
    A, N, C = z.shape
    F = A * C
    plan = _plan(z.shape, z.device)
    acc = accumulation_dtype(z.dtype)
    final = plan.n_chunks == 1
    # per chunk and column: sum(g) and sum(g * zhat) (per_dim) or sum(g * z) (scalar)
    work = None if final else torch.empty((plan.n_chunks, 2, F), dtype=acc, device=z.device)
    if scalar_mode:
        sum_g = sum_gy = None
        total = torch.empty(1, dtype=acc, device=z.device)
        partials, counter = workspace(plan.n_col_blocks, acc, z.device, zeroed=final)
    else:
        sum_g = torch.empty(F, dtype=acc, device=z.device)
        sum_gy = torch.empty(F, dtype=acc, device=z.device)
        total = partials = counter = None
    eps_pair = float32_pair(eps)
    block_p = PARTIAL_BLOCK
    acc_type = accumulation_type(z.dtype)
    launch(
        renormalize_bwd_partial_kernel, (plan.n_chunks * plan.n_col_blocks,),
        grad, z, mean, var, work, sum_g, sum_gy, partials, counter, total,
        N, F, C, plan.rows_per_chunk, plan.n_col_blocks, *_strides(grad), *_strides(z), *eps_pair,
        FINAL=final, SCALAR_MODE=scalar_mode, ACC=acc_type,
        BLOCK_R=plan.block_r, BLOCK_D=plan.block_d, BLOCK_P=block_p, num_warps=plan.num_warps,
    )
    if not final:
        launch(
            renormalize_bwd_finish_kernel, (plan.n_col_blocks,),
            work, sum_g, sum_gy, partials, counter, total, F, plan.n_chunks,
            SCALAR_MODE=scalar_mode, ACC=acc_type, BLOCK_D=plan.block_d, BLOCK_C=plan.finish_chunks, BLOCK_P=block_p,
            num_warps=plan.finish_warps,
        )
    grad_z = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    tv, stride_tv, tv_hi, tv_lo = _target(target_var)
    launch(
        renormalize_bwd_kernel, _grid_tiles(plan, N),
        grad, z, mean, var, scalars, tv, sum_g, sum_gy, total, grad_z,
        N, F, C, plan.n_col_blocks, *_strides(grad), *_strides(z), stride_tv, tv_hi, tv_lo, *eps_pair,
        SCALAR_MODE=scalar_mode, TV_TENSOR=tv is not None, ACC=acc_type,
        BLOCK_R=plan.block_r, BLOCK_D=plan.block_d, num_warps=plan.num_warps,
    )
    return grad_z

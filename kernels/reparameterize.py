"""Reparameterized sampling and closed-form KL in one pass, and its backward, tiled over elements.

Each operand is described as ``(samples, event elements)`` by ``_launch.event_layout``: up
to three sample dims and two event dims (after merging), each tensor read through its own strides, so
the halves of ``chunk(2, dim=1)`` of a contiguous or channels_last ``(B, 2C, H, W)`` or
``(B, 2C, T, H, W)`` encoder output are read in place. The grid is ``row tiles x column blocks``:
program ``p`` owns ``BLOCK_R`` samples and ``BLOCK_D`` event elements of them, so one long sample
spreads over ``cdiv(E, BLOCK_D)`` programs and many short ones share a program. Rows are walked in
the order of the sample dims and columns in the memory order of the event dims (``mu``'s strides);
the outputs (``z``, the elementwise KL, the gradients) are written in ``mu``'s memory format (``out``
strides). The noise of an element is ``tl.randn(seed, i)`` with ``i`` its logical (row-major) flat
index in int64 (``idx`` strides), so a seed gives the same ``z`` in every layout and tiling.

CLAMP: logvar is clamped to ``[LOGVAR_MIN, LOGVAR_MAX]`` after loading; the backward zeroes the
logvar gradient outside that range (torch.clamp's rule, bounds included).

KL_MODE: 0 no KL, 1 elementwise (``none``), 2 one value per sample (``per_sample``), 3 one total
(``batchmean``/``sum``, divided by the integer ``kl_divisor``). When a sample spans several column
blocks (SPLIT), each program stores its partial sum; the last program of a sample to take that
sample's ticket sums its partials in column order (``per_sample``), and for a total the last sample
to finish sums the samples' sums in sample order: deterministic, one launch on a per-call zeroed
workspace. Without SPLIT a program holds whole samples (per-sample sums are direct, a total is
``store_total``'s ticket over programs). Counts travel as integers and are divided in the
accumulation dtype: a Python float argument would reach the GPU as fp32, whatever the tensors' dtype.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import (
    accumulation_type, event_layout, float32_pair, launch, logical_strides, PARTIAL_BLOCK, store_total, sum_partials,
    workspace,
)

KL_NONE, KL_ELEMENTWISE, KL_PER_ROW, KL_TOTAL = 0, 1, 2, 3
_KL_MODES = {"none": KL_ELEMENTWISE, "per_sample": KL_PER_ROW, "batchmean": KL_TOTAL, "sum": KL_TOTAL}


@triton.jit
def _split_rows(rows, ns1, ns2, SAMPLE_RANK: tl.constexpr):
    """The sample index ``rows`` as ``(r0, r1, r2)`` over sample dims of sizes ``(*, ns1, ns2)``."""
    r0 = rows * 0
    r1 = rows * 0
    r2 = rows
    if SAMPLE_RANK > 1:
        r2 = rows % ns2
        r1 = rows // ns2
        if SAMPLE_RANK > 2:
            r0 = r1 // ns1
            r1 = r1 % ns1
    return r0, r1, r2


@triton.jit
def _split_cols(cols, ne1, EVENT_RANK: tl.constexpr):
    """The event element index ``cols`` as ``(c0, c1)`` over event dims of sizes ``(*, ne1)``."""
    c0 = cols * 0
    c1 = cols
    if EVENT_RANK > 1:
        c0 = cols // ne1
        c1 = cols % ne1
    return c0, c1


@triton.jit
def _row_offset(r0, r1, r2, s0, s1, s2, SAMPLE_RANK: tl.constexpr):
    """``(BLOCK_R,)`` offsets of the sample dims of strides ``(s0, s1, s2)`` (int64)."""
    row = r2 * s2
    if SAMPLE_RANK > 1:
        row += r1 * s1
    if SAMPLE_RANK > 2:
        row += r0 * s0
    return row


@triton.jit
def _col_offset(c0, c1, e0, e1, EVENT_RANK: tl.constexpr):
    """``(BLOCK_D,)`` offsets of the event dims of strides ``(e0, e1)`` (int64)."""
    col = c1 * e1
    if EVENT_RANK > 1:
        col += c0 * e0
    return col


@triton.jit
def _offsets(r0, r1, r2, c0, c1, s0, s1, s2, e0, e1, SAMPLE_RANK: tl.constexpr, EVENT_RANK: tl.constexpr):
    """``(BLOCK_R, BLOCK_D)`` element offsets of one tensor of strides ``(s0, s1, s2 | e0, e1)`` (int64)."""
    row = _row_offset(r0, r1, r2, s0, s1, s2, SAMPLE_RANK)
    return row[:, None] + _col_offset(c0, c1, e0, e1, EVENT_RANK)[None, :]


@triton.jit
def _tile(E, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr):
    """This program's ``(rows, cols, row tile, column block, column blocks per row)`` (int64)."""
    pid = tl.program_id(0).to(tl.int64)
    n_col_blocks = tl.cdiv(E, BLOCK_D)
    if SPLIT:
        row_tile = pid // n_col_blocks
        col_block = pid % n_col_blocks
    else:
        row_tile = pid
        col_block = pid * 0
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    return rows, cols, row_tile, col_block, n_col_blocks


@triton.jit(do_not_specialize=["n_rows", "ns1", "ns2", "kl_divisor"])  # the batch size must not pick a compiled kernel
def reparameterize_kl_fwd_kernel(
    mu_ptr, logvar_ptr, seed_ptr, z_ptr, kl_ptr, partial_ptr, ticket_ptr, row_ticket_ptr,
    n_rows, ns1, ns2, E, ne1,
    mu_s0, mu_s1, mu_s2, mu_e0, mu_e1,
    lv_s0, lv_s1, lv_s2, lv_e0, lv_e1,
    out_s0, out_s1, out_s2, out_e0, out_e1,
    idx_s0, idx_s1, idx_s2, idx_e0, idx_e1,
    kl_divisor,
    HAS_Z: tl.constexpr, KL_MODE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    SAMPLE_RANK: tl.constexpr = 1, EVENT_RANK: tl.constexpr = 1, SPLIT: tl.constexpr = False,
    CLAMP: tl.constexpr = False, LOGVAR_MIN: tl.constexpr = 0.0, LOGVAR_MAX: tl.constexpr = 0.0,
):
    rows, cols, row_tile, col_block, n_col_blocks = _tile(E, BLOCK_R, BLOCK_D, SPLIT)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < E)[None, :]
    r0, r1, r2 = _split_rows(rows, ns1, ns2, SAMPLE_RANK)
    c0, c1 = _split_cols(cols, ne1, EVENT_RANK)
    mu_off = _offsets(r0, r1, r2, c0, c1, mu_s0, mu_s1, mu_s2, mu_e0, mu_e1, SAMPLE_RANK, EVENT_RANK)
    lv_off = _offsets(r0, r1, r2, c0, c1, lv_s0, lv_s1, lv_s2, lv_e0, lv_e1, SAMPLE_RANK, EVENT_RANK)
    out_off = _offsets(r0, r1, r2, c0, c1, out_s0, out_s1, out_s2, out_e0, out_e1, SAMPLE_RANK, EVENT_RANK)
    mu = tl.load(mu_ptr + mu_off, mask=mask, other=0.0).to(ACC)
    logvar = tl.load(logvar_ptr + lv_off, mask=mask, other=0.0).to(ACC)
    if CLAMP:  # bounds built in ACC: a bare float constexpr would be an fp32 constant on the GPU
        logvar = tl.minimum(tl.maximum(logvar, tl.full([BLOCK_R, BLOCK_D], LOGVAR_MIN, ACC)),
                            tl.full([BLOCK_R, BLOCK_D], LOGVAR_MAX, ACC))
    # the sample's logical index (idx sample strides count samples) and the element's logical flat index
    sample = _row_offset(r0, r1, r2, idx_s0, idx_s1, idx_s2, SAMPLE_RANK)
    if HAS_Z:
        seed = tl.load(seed_ptr)
        flat = (sample * E)[:, None] + _col_offset(c0, c1, idx_e0, idx_e1, EVENT_RANK)[None, :]
        eps = tl.randn(seed, flat).to(ACC)
        z = mu + tl.exp(logvar * 0.5) * eps
        tl.store(z_ptr + out_off, z.to(z_ptr.dtype.element_ty), mask=mask)
    if KL_MODE != 0:
        kl = 0.5 * (mu * mu + tl.exp(logvar) - logvar - 1.0)
        if KL_MODE == 1:
            tl.store(kl_ptr + out_off, kl.to(kl_ptr.dtype.element_ty), mask=mask)
        else:
            row_kl = tl.sum(tl.where(mask, kl, 0.0), axis=1)
            if SPLIT:  # BLOCK_R == 1: this program holds one column block of one sample
                tl.store(partial_ptr + row_tile * n_col_blocks + col_block, tl.sum(row_kl, axis=0))
                tl.debug_barrier()
                if tl.atomic_add(row_ticket_ptr + row_tile, 1, sem="acq_rel") == n_col_blocks - 1:
                    sample_kl = sum_partials(partial_ptr + row_tile * n_col_blocks, n_col_blocks, BLOCK_P)
                    if KL_MODE == 2:
                        tl.store(kl_ptr + sample, sample_kl + tl.zeros([BLOCK_R], ACC))
                    else:
                        sample_sums = partial_ptr + n_rows * n_col_blocks
                        tl.store(sample_sums + row_tile, sample_kl)
                        tl.debug_barrier()
                        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == n_rows - 1:
                            tl.store(kl_ptr, sum_partials(sample_sums, n_rows, BLOCK_P) / kl_divisor)
            elif KL_MODE == 2:
                tl.store(kl_ptr + sample, row_kl, mask=row_mask)
            else:
                store_total(partial_ptr, ticket_ptr, kl_ptr, tl.sum(row_kl, axis=0), kl_divisor, BLOCK_P)


@triton.jit(do_not_specialize=["n_rows", "ns1", "ns2"])
def reparameterize_kl_bwd_kernel(
    grad_z_ptr, grad_kl_ptr, mu_ptr, logvar_ptr, seed_ptr, grad_mu_ptr, grad_lv_ptr,
    n_rows, ns1, ns2, E, ne1,
    mu_s0, mu_s1, mu_s2, mu_e0, mu_e1,
    lv_s0, lv_s1, lv_s2, lv_e0, lv_e1,
    gz_s0, gz_s1, gz_s2, gz_e0, gz_e1,
    gkl_s0, gkl_s1, gkl_s2, gkl_e0, gkl_e1,
    out_s0, out_s1, out_s2, out_e0, out_e1,
    idx_s0, idx_s1, idx_s2, idx_e0, idx_e1,
    kl_scale_hi, kl_scale_lo,
    HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    SAMPLE_RANK: tl.constexpr = 1, EVENT_RANK: tl.constexpr = 1, SPLIT: tl.constexpr = False,
    CLAMP: tl.constexpr = False, LOGVAR_MIN: tl.constexpr = 0.0, LOGVAR_MAX: tl.constexpr = 0.0,
):
    rows, cols, row_tile, col_block, n_col_blocks = _tile(E, BLOCK_R, BLOCK_D, SPLIT)
    mask = (rows < n_rows)[:, None] & (cols < E)[None, :]
    r0, r1, r2 = _split_rows(rows, ns1, ns2, SAMPLE_RANK)
    c0, c1 = _split_cols(cols, ne1, EVENT_RANK)
    # 1 / n_rows as a float32 pair (about 48 bits) for float64; float32 needs hi alone (a division
    # here, or the pair, cost ptxas 8 B of spill on sm_120)
    kl_scale = tl.cast(kl_scale_hi, ACC)
    if ACC == tl.float64:
        kl_scale += tl.cast(kl_scale_lo, ACC)
    mu_off = _offsets(r0, r1, r2, c0, c1, mu_s0, mu_s1, mu_s2, mu_e0, mu_e1, SAMPLE_RANK, EVENT_RANK)
    lv_off = _offsets(r0, r1, r2, c0, c1, lv_s0, lv_s1, lv_s2, lv_e0, lv_e1, SAMPLE_RANK, EVENT_RANK)
    mu = tl.load(mu_ptr + mu_off, mask=mask, other=0.0).to(ACC)
    logvar = tl.load(logvar_ptr + lv_off, mask=mask, other=0.0).to(ACC)
    half = 0.5
    if CLAMP:
        clamped = tl.minimum(tl.maximum(logvar, tl.full([BLOCK_R, BLOCK_D], LOGVAR_MIN, ACC)),
                             tl.full([BLOCK_R, BLOCK_D], LOGVAR_MAX, ACC))
        # torch.clamp's gradient: d clamped / d logvar is 1 inside [lo, hi] (bounds included), 0 outside and for NaN
        half = tl.where(clamped == logvar, 0.5, 0.0)
        logvar = clamped
    grad_mu = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    grad_lv = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    if HAS_GRAD_Z:
        seed = tl.load(seed_ptr)
        sample = _row_offset(r0, r1, r2, idx_s0, idx_s1, idx_s2, SAMPLE_RANK)
        flat = (sample * E)[:, None] + _col_offset(c0, c1, idx_e0, idx_e1, EVENT_RANK)[None, :]
        gz_off = _offsets(r0, r1, r2, c0, c1, gz_s0, gz_s1, gz_s2, gz_e0, gz_e1, SAMPLE_RANK, EVENT_RANK)
        g_z = tl.load(grad_z_ptr + gz_off, mask=mask, other=0.0).to(ACC)
        eps = tl.randn(seed, flat).to(ACC)
        grad_mu += g_z
        grad_lv += g_z * eps * tl.exp(logvar * 0.5) * half
    if HAS_GRAD_KL:
        # the reduced gradient broadcasts through zero strides: event strides 0 per sample, all 0 for a total
        gkl_off = _offsets(r0, r1, r2, c0, c1, gkl_s0, gkl_s1, gkl_s2, gkl_e0, gkl_e1, SAMPLE_RANK, EVENT_RANK)
        g_kl = tl.load(grad_kl_ptr + gkl_off, mask=mask, other=0.0).to(ACC)
        g_kl = g_kl * kl_scale
        grad_mu += g_kl * mu
        grad_lv += g_kl * (tl.exp(logvar) - 1.0) * half
    out_off = _offsets(r0, r1, r2, c0, c1, out_s0, out_s1, out_s2, out_e0, out_e1, SAMPLE_RANK, EVENT_RANK)
    tl.store(grad_mu_ptr + out_off, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_lv_ptr + out_off, grad_lv.to(grad_lv_ptr.dtype.element_ty), mask=mask)


def _philox_tile(E: int, dtype: torch.dtype, vectorizable: bool = True) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps)``: 4 warps and one 128-bit access per tensor and thread (8
    half-precision, 4 fp32 or 2 fp64 elements; every element runs a 10-round Philox, and 16 elements
    a thread spilled), the tile filled with event elements first, then with samples. Depends on the
    event size and the layout only, never on the batch. Where some tensor's innermost stride is not 1
    (no 128-bit access), at most 4 elements a thread: 8 scattered half-precision elements, each with
    its own 64-bit addresses, spilled 4 B in the clamped backward on sm_90."""
    elements = 16 // torch.empty((), dtype=dtype).element_size()
    tile = 4 * 32 * (elements if vectorizable else min(elements, 4))
    block_d = min(triton.next_power_of_2(E), tile)
    return tile // block_d, block_d, 4


class _Plan:
    """Sizes, strides, tile and grid of one launch over latents of ``shape`` with ``event_dims``."""

    def __init__(self, shape, event_dims: int, layouts: list[tuple[int, ...]], dtype: torch.dtype):
        described = event_layout(tuple(shape), event_dims, layouts)
        if described is None:
            raise ValueError("layout needs more dims than the kernel indexes")
        sample_sizes, event_sizes, self.strides, (self.sample_rank, self.event_rank) = described
        self.n_rows = math.prod(sample_sizes)
        self.ns1, self.ns2 = sample_sizes[1], sample_sizes[2]
        self.E = event_sizes[0] * event_sizes[1]
        self.ne1 = event_sizes[1]
        vectorizable = all(layout[-1] in (0, 1) for layout in self.strides)
        self.block_r, self.block_d, self.num_warps = _philox_tile(self.E, dtype, vectorizable)
        self.n_col_blocks = triton.cdiv(self.E, self.block_d)
        self.split = self.n_col_blocks > 1
        self.grid = (triton.cdiv(self.n_rows, self.block_r) * self.n_col_blocks,)

    def sizes(self) -> tuple[int, ...]:
        return self.n_rows, self.ns1, self.ns2, self.E, self.ne1

    def constexprs(self) -> dict:
        return {"BLOCK_R": self.block_r, "BLOCK_D": self.block_d, "SAMPLE_RANK": self.sample_rank,
                "EVENT_RANK": self.event_rank, "SPLIT": self.split, "num_warps": self.num_warps}


def _sample_shape(shape, event_dims: int):
    return tuple(shape[: len(shape) - event_dims])


def _kl_output(mu: torch.Tensor, reduction: str, event_dims: int) -> tuple[torch.Tensor, int]:
    """The KL output and the integer its total is divided by (the number of samples for batchmean, else 1)."""
    acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
    if reduction == "none":
        return torch.empty_like(mu), 1
    samples = _sample_shape(mu.shape, event_dims)
    if reduction == "per_sample":
        return torch.empty(samples, dtype=acc, device=mu.device), 1
    return torch.empty((), dtype=acc, device=mu.device), (math.prod(samples) if reduction == "batchmean" else 1)


def _clamp_flags(logvar_clamp) -> dict:
    """The CLAMP constexprs for ``logvar_clamp = (lo, hi)`` or None."""
    if logvar_clamp is None:
        return {}
    return {"CLAMP": True, "LOGVAR_MIN": float(logvar_clamp[0]), "LOGVAR_MAX": float(logvar_clamp[1])}


def _split_workspace(plan: _Plan, dtype: torch.dtype, device: torch.device):
    """``(partials, ticket, sample tickets)`` for a SPLIT reduction: a partial per program, then a sum
    per sample; one global and one ticket per sample, all from one zeroed workspace (one memset)."""
    n_values = plan.n_rows * plan.n_col_blocks + plan.n_rows
    ticket_slots = triton.cdiv(plan.n_rows * 4, dtype.itemsize)
    partials, ticket = workspace(n_values + ticket_slots, dtype, device)
    sample_tickets = partials[n_values:].view(torch.int32)[: plan.n_rows]
    return partials[:n_values], ticket, sample_tickets


def forward(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor | None, reduction: str | None, logvar_clamp=None,
            event_dims: int = 1):
    """``(z, kl)`` for latents ``mu``, ``logvar`` of any shape and strides whose last ``event_dims`` dims
    form one sample; ``z`` is None without ``seed``, ``kl`` None without ``reduction``; ``logvar``
    clamped to ``logvar_clamp = (lo, hi)`` unless None. ``z`` and the elementwise KL have ``mu``'s shape
    and memory format (``torch.empty_like``); ``per_sample`` is ``shape[:-event_dims]``, a total 0-d.
    ValueError when the strides need more dims than the kernel indexes (the caller copies then)."""
    z = torch.empty_like(mu) if seed is not None else None
    kl, kl_divisor = _kl_output(mu, reduction, event_dims) if reduction is not None else (None, 1)
    out = z if z is not None else kl if reduction == "none" else mu  # z and the elementwise KL: empty_like(mu)
    layouts = [mu.stride(), logvar.stride(), out.stride(), logical_strides(mu.shape, event_dims)]
    plan = _Plan(mu.shape, event_dims, layouts, mu.dtype)
    kl_mode = _KL_MODES[reduction] if reduction is not None else KL_NONE
    partials = ticket = sample_tickets = None
    if plan.split and kl_mode in (KL_PER_ROW, KL_TOTAL):
        partials, ticket, sample_tickets = _split_workspace(plan, kl.dtype, mu.device)
    elif kl_mode == KL_TOTAL:
        partials, ticket = workspace(plan.grid[0], kl.dtype, mu.device)
    strides = plan.strides
    launch(
        reparameterize_kl_fwd_kernel, plan.grid,
        mu, logvar, seed, z, kl, partials, ticket, sample_tickets,
        *plan.sizes(), *strides[0], *strides[1], *strides[2], *strides[3], kl_divisor,
        HAS_Z=z is not None, KL_MODE=kl_mode, ACC=accumulation_type(mu.dtype), BLOCK_P=PARTIAL_BLOCK,
        **plan.constexprs(), **_clamp_flags(logvar_clamp),
    )
    return z, kl


def _grad_kl_strides(grad_kl: torch.Tensor | None, shape, reduction: str, event_dims: int) -> tuple[int, ...]:
    """Strides of the KL's gradient over the latents' shape: its own (``none``), the sample strides and
    zeros over the event dims (``per_sample``), all zeros (a total)."""
    if grad_kl is None or reduction in ("batchmean", "sum"):
        return (0,) * len(shape)
    if reduction == "none":
        return grad_kl.stride()
    return tuple(grad_kl.stride()) + (0,) * event_dims


def backward(grad_z, grad_kl, mu, logvar, seed, reduction, logvar_clamp=None, event_dims: int = 1):
    """``(grad_mu, grad_logvar)`` in ``mu``'s shape and memory format. ``grad_z``: ``mu``'s shape, any
    strides, or None; ``grad_kl``: the gradient of the reduced KL (``mu``'s shape, ``shape[:-event_dims]``
    or one element) or None."""
    grad_mu, grad_lv = torch.empty_like(mu), torch.empty_like(mu)
    layouts = [
        mu.stride(), logvar.stride(), grad_z.stride() if grad_z is not None else (0,) * mu.dim(),
        _grad_kl_strides(grad_kl, mu.shape, reduction, event_dims), grad_mu.stride(),
        logical_strides(mu.shape, event_dims),
    ]
    plan = _Plan(mu.shape, event_dims, layouts, mu.dtype)
    kl_scale = 1.0
    if grad_kl is not None and reduction == "batchmean":
        kl_scale = 1.0 / math.prod(_sample_shape(mu.shape, event_dims))
    strides = plan.strides
    launch(
        reparameterize_kl_bwd_kernel, plan.grid,
        grad_z, grad_kl, mu, logvar, seed, grad_mu, grad_lv,
        *plan.sizes(), *(s for layout in strides for s in layout), *float32_pair(kl_scale),
        HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None, ACC=accumulation_type(mu.dtype),
        **plan.constexprs(), **_clamp_flags(logvar_clamp),
    )
    return grad_mu, grad_lv


def reads_in_place(event_dims: int, *tensors: torch.Tensor) -> bool:
    """Whether ``event_layout`` describes ``tensors`` (one shape), their ``empty_like`` outputs and the
    logical index within its dims: else the op hands these kernels contiguous copies."""
    shape = tensors[0].shape
    out = torch.empty_like(tensors[0], device="meta").stride()
    layouts = [t.stride() for t in tensors] + [out, logical_strides(shape, event_dims)]
    return event_layout(tuple(shape), event_dims, layouts) is not None

"""What every launcher shares: launch counting, tile and warp choice, and the ticket workspace.

Launch counting: every launch goes through ``launch``, which counts it by kernel name, so tests
assert the launch targets of DESIGN.md (``count_launches``) instead of claiming them.

One-launch reductions: each program writes its partial result to a buffer, then takes a ticket
from an int32 counter; the program that takes the last ticket sums the partials in program order
(deterministic: no float atomics) and puts the counter back to zero for the next launch. The
counter lives in a per-(device, stream) workspace allocated once.
"""
from __future__ import annotations

import collections
import contextlib

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED: bool = bool(knobs.runtime.interpret)
"""True when the kernels were decorated in Triton's interpreter (TRITON_INTERPRET=1 at import)."""

_launches: collections.Counter[str] = collections.Counter()
_tickets: dict[tuple[str, int, int], torch.Tensor] = {}


def _kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` and count it."""
    _launches[_kernel_name(kernel)] += 1
    kernel[grid](*args, **kwargs)


def launch_counts() -> dict[str, int]:
    """Launches per kernel name since the process started."""
    return dict(_launches)


@contextlib.contextmanager
def count_launches():
    """``with count_launches() as counts:`` fills the Counter ``counts`` with the launches of the block."""
    before = collections.Counter(_launches)
    counts: collections.Counter[str] = collections.Counter()
    try:
        yield counts
    finally:
        counts.update(_launches - before)


def ticket(device: torch.device) -> torch.Tensor:
    """The zeroed int32 ticket counter for ``device`` and its current stream (reset by the last program)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index or 0, stream)
    counter = _tickets.get(key)
    if counter is None:
        counter = _tickets[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def row_tile(n_rows: int, n_cols: int, max_tile: int = 4096, max_cols: int = 1024) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps)`` for a ``(n_rows, n_cols)`` problem tiled by whole-row programs.

    Columns are covered in ``BLOCK_D`` chunks (a power of two up to ``max_cols``); rows fill the tile
    up to ``max_tile`` elements; 4 warps up to 2048 elements a tile, 8 above.
    """
    block_d = min(triton.next_power_of_2(n_cols), max_cols)
    block_r = max(1, min(triton.next_power_of_2(n_rows), max_tile // block_d))
    num_warps = 4 if block_r * block_d <= 2048 else 8
    return block_r, block_d, num_warps


def accumulation_type(dtype: torch.dtype):
    """The Triton accumulation type: fp64 for float64 inputs, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def last_to_arrive(partial_ptr, ticket_ptr, value):
    """Store this program's scalar ``value`` at ``partial_ptr[pid]`` and take a ticket: True for the
    program that takes the last one, which may then read every program's partial (``sum_partials``)
    and must call ``release_ticket``."""
    pid = tl.program_id(0)
    tl.store(partial_ptr + pid, value)
    tl.debug_barrier()
    arrived = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    return arrived == tl.num_programs(0) - 1


@triton.jit
def sum_partials(partial_ptr, n, BLOCK_P: tl.constexpr):
    """``sum(partial_ptr[0:n])`` in a fixed order, read past the caches (they were written by other programs)."""
    acc = tl.zeros([BLOCK_P], dtype=partial_ptr.dtype.element_ty)
    for start in range(0, n, BLOCK_P):
        idx = start + tl.arange(0, BLOCK_P)
        acc += tl.load(partial_ptr + idx, mask=idx < n, other=0.0, volatile=True)
    return tl.sum(acc, axis=0)


@triton.jit
def release_ticket(ticket_ptr):
    tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def store_total(partial_ptr, ticket_ptr, out_ptr, value, scale, BLOCK_P: tl.constexpr):
    """Store this program's scalar ``value``; the last program to arrive writes ``sum(values) * scale``."""
    if last_to_arrive(partial_ptr, ticket_ptr, value):
        tl.store(out_ptr, sum_partials(partial_ptr, tl.num_programs(0), BLOCK_P) * scale)
        release_ticket(ticket_ptr)


def partial_block(n_programs: int) -> int:
    """The BLOCK_P that ``sum_partials`` reads ``n_programs`` partials with."""
    return min(triton.next_power_of_2(n_programs), 1024)

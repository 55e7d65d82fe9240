"""What every launcher shares: launch counting, the device guard, tile and warp choice, and the
ticket workspace.

Launch counting: every launch goes through ``launch``, which counts it by kernel name, so tests
assert each op's number of launches per call (``count_launches``) instead of claiming it. ``launch``
also checks that all tensor arguments share one device and runs the kernel with that device
current, as inductor does (a kernel launches on the *current* CUDA device otherwise).

One-launch reductions: each program writes its partial result to a buffer, then takes a ticket
from an int32 counter; the program that takes the last ticket sums the partials in program order
(deterministic: no float atomics). The counter and the partials come from ``workspace``, a fresh
zeroed buffer per call: nothing outlives a launch, so two launches in flight (graphs replayed on
two streams) or a launch that never finished cannot corrupt a later one. The zero fill is a
memset on the GPU, and ``workspace`` counts it as a launch (``ZERO_FILL``).
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

ZERO_FILL = "zero_fill"
"""The launch-count name of the memset that zeroes a reduction's workspace."""


def _kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


def launch_device(args) -> torch.device:
    """The one device of the tensor arguments ``args`` (None skipped); ValueError when they differ."""
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) != 1:
        raise ValueError(f"a fastvae kernel needs all its tensors on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def device_guard(device: torch.device):
    """``device`` made current for the block: a CUDA kernel launches on the current device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` on the device of its tensors, and count it."""
    device = launch_device(list(args) + list(kwargs.values()))
    _launches[_kernel_name(kernel)] += 1
    with device_guard(device):
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


def workspace(n_partials: int, dtype: torch.dtype, device: torch.device, *,
              zeroed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partials, counter)`` of one reduction launch, cut from one fresh buffer: ``n_partials``
    elements of ``dtype`` and an int32 ticket counter, zeroed by a memset (counted as ``ZERO_FILL``).
    ``zeroed=False`` when an earlier launch of the same call zeroes the counter (program 0 of a
    partials kernel, for its finish kernel): no memset then."""
    partial_words = triton.cdiv(n_partials * dtype.itemsize, 4)
    with device_guard(device):
        buffer = (torch.zeros if zeroed else torch.empty)(2 + partial_words, dtype=torch.int32, device=device)
    if zeroed:
        _launches[ZERO_FILL] += 1
    # the partials start 8 bytes in, so that float64 partials are aligned
    return buffer[2:].view(dtype)[:n_partials], buffer[:1]


def row_tile(n_cols: int, max_tile: int = 4096, max_cols: int = 1024) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps)`` for a problem of ``n_cols`` columns tiled by whole-row programs.

    Columns are covered in ``BLOCK_D`` chunks (a power of two up to ``max_cols``); rows fill the tile
    up to ``max_tile`` elements; 4 warps up to 2048 elements a tile, 8 above. The number of rows (the
    batch) does not enter, so the short last batch of an epoch runs the kernel already compiled.
    """
    block_d = min(triton.next_power_of_2(n_cols), max_cols)
    block_r = max(1, max_tile // block_d)
    num_warps = 4 if block_r * block_d <= 2048 else 8
    return block_r, block_d, num_warps


def float32_pair(value: float) -> tuple[float, float]:
    """``value`` as float32 ``hi + lo`` (about 48 bits), both exact float32 numbers: a Python float kernel
    argument reaches the GPU as float32, so a float64 constant travels as this pair."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype: float64 for float64 inputs, float32 otherwise (the rule of the
    spec, ``fastvae.reference.accumulation_dtype``, which the kernels cannot import: they need only Triton)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulation_type(dtype: torch.dtype):
    """The Triton type of ``accumulation_dtype(dtype)``: fp64 for float64 inputs, fp32 otherwise."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def last_to_arrive(partial_ptr, ticket_ptr, value):
    """Store this program's scalar ``value`` at ``partial_ptr[pid]`` and take a ticket: True for the
    program that takes the last one, which may then read every program's partial (``sum_partials``)
    (the counter is the launch's own: nobody resets it)."""
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
def store_total(partial_ptr, ticket_ptr, out_ptr, value, divisor, BLOCK_P: tl.constexpr):
    """Store this program's scalar ``value``; the last program to arrive writes ``sum(values) / divisor``
    (``divisor`` an integer, divided in the accumulation dtype: a float argument would travel as fp32)."""
    if last_to_arrive(partial_ptr, ticket_ptr, value):
        tl.store(out_ptr, sum_partials(partial_ptr, tl.num_programs(0), BLOCK_P) / divisor)


PARTIAL_BLOCK = 256
"""The BLOCK_P that ``sum_partials`` reads the partials with, in a loop: a constant, so that the number
of programs (which follows the batch) never selects a new compiled kernel."""


def partial_block() -> int:
    return PARTIAL_BLOCK

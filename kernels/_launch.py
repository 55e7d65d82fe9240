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



# ---------------------------------------------------------------------------------- stride plans
MAX_SAMPLE_DIMS, MAX_EVENT_DIMS = 3, 2
"""The most sample and event dims (after merging) that ``event_layout`` describes: the kernels index
rows by up to three sample dims and columns by up to two event dims."""


def contiguous_strides(shape) -> tuple[int, ...]:
    """Row-major strides of ``shape`` (in elements)."""
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _merged(group: list[int], shape, layouts: list[tuple[int, ...]]) -> tuple[list[int], list[list[int]]]:
    """``group``'s dims (outer to inner) with neighbours merged where every layout allows it (``stride[a] ==
    stride[b] * size[b]``): ``(sizes, strides per layout)``; dims of size 1 are dropped."""
    sizes: list[int] = []
    strides: list[list[int]] = [[] for _ in layouts]
    for d in group:
        if shape[d] == 1:
            continue
        if sizes and all(s[-1] == layout[d] * shape[d] for s, layout in zip(strides, layouts)):
            sizes[-1] *= shape[d]
            for s, layout in zip(strides, layouts):
                s[-1] = layout[d]
            continue
        sizes.append(shape[d])
        for s, layout in zip(strides, layouts):
            s.append(layout[d])
    return sizes, strides


def event_layout(shape, event_dims: int, layouts: list[tuple[int, ...]], order_by: int = 0):
    r"""The ``(samples, event elements)`` description of tensors of logical ``shape`` whose last
    ``event_dims`` dims form one sample, for kernels that read each tensor through its own strides.

    ``layouts`` are the strides (in elements) of each tensor over ``shape`` (0 for a broadcast dim).
    Within the sample dims and within the event dims, the dims are ordered by the strides of
    ``layouts[order_by]`` (largest first, so a channels_last tensor is walked in memory order) and
    neighbours are merged where every layout allows it. Returns ``(sample_sizes, event_sizes, strides)``:
    ``sample_sizes`` padded in front with 1 to ``MAX_SAMPLE_DIMS``, ``event_sizes`` to ``MAX_EVENT_DIMS``,
    ``strides[i]`` the ``MAX_SAMPLE_DIMS + MAX_EVENT_DIMS`` strides of ``layouts[i]`` (0 where padded),
    and the ranks ``(sample_rank, event_rank)`` (at least 1); None when more dims remain.

    Element ``(sample s, event element e)``, with ``s = sum s_k n_{k+1}...`` and ``e`` the row-major index
    over the ordered event dims, sits at ``sum_k s_k stride_k + sum_k e_k stride_k`` in each tensor."""
    split = len(shape) - event_dims
    key = layouts[order_by]
    groups = []
    for group in (range(split), range(split, len(shape))):
        ordered = sorted(group, key=lambda d: -abs(key[d]))  # stable: ties keep the logical order
        groups.append(_merged(ordered, shape, layouts))
    (sample_sizes, sample_strides), (event_sizes, event_strides) = groups
    if len(sample_sizes) > MAX_SAMPLE_DIMS or len(event_sizes) > MAX_EVENT_DIMS:
        return None
    ranks = (max(1, len(sample_sizes)), max(1, len(event_sizes)))
    pad_s, pad_e = MAX_SAMPLE_DIMS - len(sample_sizes), MAX_EVENT_DIMS - len(event_sizes)
    strides = [tuple([0] * pad_s + s + [0] * pad_e + e) for s, e in zip(sample_strides, event_strides)]
    return (1,) * pad_s + tuple(sample_sizes), (1,) * pad_e + tuple(event_sizes), strides, ranks


def logical_strides(shape, event_dims: int) -> tuple[int, ...]:
    """Strides that give, over the sample dims, the sample's row-major index and, over the event dims,
    the element's row-major index within its sample: the logical flat index of an element is
    ``sample * prod(event shape) + element`` (the kernels' Philox counter)."""
    split = len(shape) - event_dims
    strides = [0] * len(shape)
    for group in (range(split, len(shape)), range(split)):
        step = 1
        for d in reversed(group):
            strides[d], step = step, step * shape[d]
    return tuple(strides)

"""How the ops hand tensors to the kernels: as 2-D ``(rows, cols)`` views, copied only when no view exists."""
from __future__ import annotations

import torch


def as_rows(tensor: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``tensor`` as ``(numel // n_cols, n_cols)``: a view with its own strides when one exists (the
    halves of ``h.chunk(2, dim=-1)``, an expanded gradient), a contiguous copy otherwise."""
    try:
        return tensor.view(-1, n_cols)
    except RuntimeError:
        return tensor.reshape(-1, n_cols)


def memory_order(tensor: torch.Tensor) -> list[int]:
    """The dims after dim 0 from the largest stride to the smallest (stable): ``[2, 3, 1]`` for a
    channels_last ``(N, C, H, W)``, ``[1, 2, 3]`` for a contiguous one."""
    return sorted(range(1, tensor.dim()), key=lambda d: -tensor.stride(d))


def samples_in_memory_order(tensor: torch.Tensor, order: list[int]) -> torch.Tensor | None:
    """``tensor`` as ``(N, prod(*))`` rows whose columns follow ``order`` (``memory_order``), as a view
    (no copy), or None when no such view exists."""
    permuted = tensor.permute(0, *order)
    try:
        return permuted.view(tensor.shape[0], -1)
    except RuntimeError:
        return None


def from_memory_order(flat: torch.Tensor, like: torch.Tensor, order: list[int]) -> torch.Tensor:
    """The inverse of ``samples_in_memory_order`` for a contiguous ``(N, M)`` result: a view of ``like``'s
    shape with ``like``'s memory format (a channels_last input gets a channels_last result)."""
    permuted = flat.view(like.shape[0], *(like.shape[d] for d in order))
    inverse = [0] * like.dim()
    for position, dim in enumerate([0, *order]):
        inverse[dim] = position
    return permuted.permute(*inverse)


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


def kernel_reads_in_place(event_dims: int, *tensors: torch.Tensor) -> bool:
    """Whether ``event_layout`` describes ``tensors`` (one shape), their ``empty_like`` outputs and the
    logical index within its dims: else the op hands the kernels contiguous copies."""
    shape = tensors[0].shape
    out = torch.empty_like(tensors[0], device="meta").stride()
    layouts = [t.stride() for t in tensors] + [out, logical_strides(shape, event_dims)]
    return event_layout(tuple(shape), event_dims, layouts) is not None

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

"""How tensors reach the kernels and the engine, in one place: as ``(rows, cols)`` or ``(A, N, C)`` views,
copied only when no view exists, and results back in the input's memory format.

The kernels' own view of strides (``kernels._launch.event_layout``: up to three sample and two event dims,
read in place) stays beside the kernels, which import nothing of fastvae.
"""
from __future__ import annotations

import math
from typing import Optional

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


def in_format(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``result`` (``like``'s shape) with the strides of ``torch.empty_like(like)``: itself when it has
    them, else a copy (the ops return z and the gradients in mu's memory format)."""
    if like.is_contiguous() and result.is_contiguous():
        return result
    target = torch.empty_like(like, dtype=result.dtype)
    if result.stride() == target.stride():
        return result
    return target.copy_(result)


def pixel_strides(t: torch.Tensor) -> tuple[int, int] | None:
    """``(sample stride, pixel stride)`` of a ``(B, C, *spatial)`` tensor held as channels_last memory: its channels
    contiguous (stride 1), its spatial dims merging into one dim of pixels (pixel ``p`` of sample ``b`` at
    ``b sample + p pixel``), at least ``C`` elements apart, and its samples outside the pixels. A channels_last
    tensor (pixel stride ``C``) and the halves of ``chunk(2, dim=1)`` of one (``2 C``) are; None for any other."""
    if t.dim() < 3 or t.stride(1) != 1:
        return None
    pixel = expected = None
    for d in range(t.dim() - 1, 1, -1):
        size, stride = t.shape[d], t.stride(d)
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return None
        pixel = stride if pixel is None else pixel
        expected = stride * size
    pixel = t.shape[1] if pixel is None else pixel
    if pixel < t.shape[1] or (t.shape[0] > 1 and t.stride(0) < pixel * (t.numel() // (t.shape[0] * t.shape[1]))):
        return None
    return t.stride(0), pixel


PIXEL_CHANNELS = 16
"""The pixel loops vectorize over a pixel's channels: a multiple of 16 (float32 lanes of a 512-bit vector) runs
whole vectors; fewer channels would leave them scalar, and a contiguous copy costs less."""


def channels_last_latents(t: torch.Tensor, event_dims: int) -> bool:
    """Whether ``reparameterize_kl``'s CPU engine runs ``t`` (``(B, C, H, W)`` or ``(B, C, T, H, W)`` samples, one to
    a batch item, ``C`` a multiple of ``PIXEL_CHANNELS``) in channels_last memory order: ``t`` not contiguous, in
    ``pixel_strides``' layout, and so ``torch.empty_like(t)`` channels_last. Then the noise it keeps for backward is
    channels_last too (its fake says so from this test alone)."""
    return (t.dim() in (4, 5) and event_dims == t.dim() - 1 and t.shape[1] % PIXEL_CHANNELS == 0
            and t.numel() > 0 and not t.is_contiguous() and pixel_strides(t) is not None)


def channels_last_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 else torch.channels_last_3d


# ------------------------------------------------------------------------------- batches of samples
def sample_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, *)`` as ``(N, prod(*))``."""
    return as_rows(x, x[0].numel() if x.dim() > 1 else 1)


def pair_rows(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """``(x_hat, x)`` as ``(N, M)`` rows for the kernels, and the column order used. Every reduction
    sums over a sample's elements in any order, so when both share their strides (channels_last
    images) they are read in memory order, in place; else row-major (copied when no view exists)."""
    if x_hat.dim() > 2 and x_hat.stride() == x.stride():
        order = memory_order(x_hat)
        rows_hat, rows_x = samples_in_memory_order(x_hat, order), samples_in_memory_order(x, order)
        if rows_hat is not None and rows_x is not None:
            return rows_hat, rows_x, order
    return sample_rows(x_hat), sample_rows(x), None


def unrows(flat: torch.Tensor, like: torch.Tensor, order: list[int] | None) -> torch.Tensor:
    """A kernel's contiguous ``(N, M)`` result in ``like``'s shape (and memory format, with an ``order``)."""
    return from_memory_order(flat, like, order) if order is not None else flat.view(like.shape)


# ------------------------------------------------------------------------ reductions over one dim
def slab(t: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """``t`` as ``(A, N, C)``: ``N`` the size of ``dim``, ``A`` and ``C`` the dims before and after it
    flattened. ``dim=None``: all leading dims of ``(..., D)`` are reduced, ``(1, numel // D, D)``."""
    if dim is None:
        return as_rows(t, t.shape[-1]).unsqueeze(0)
    dim = dim % t.dim()
    n_after = math.prod(t.shape[dim + 1:])
    return as_rows(t, n_after).view(math.prod(t.shape[:dim]), t.shape[dim], n_after)


def stat_shape(t: torch.Tensor, dim: Optional[int]) -> torch.Size:
    """The shape of a per-dimension statistic: ``t``'s without ``dim`` (``(D,)`` for ``dim=None``)."""
    if dim is None:
        return t.shape[-1:]
    dim = dim % t.dim()
    return t.shape[:dim] + t.shape[dim + 1:]


def reduced_first(t: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Size]:
    """``t`` with the reduced ``dims`` moved to the front and flattened into one: ``(N, *kept)``, and the
    kept shape. A view when one exists, a copy otherwise (such as dim=(0, 2, 3) of a ``(B, C, H, W)``)."""
    kept = [d for d in range(t.dim()) if d not in dims]
    moved = t.permute(*dims, *kept)
    kept_shape = torch.Size(t.shape[d] for d in kept)
    return moved.reshape(math.prod(t.shape[d] for d in dims), *kept_shape), kept_shape

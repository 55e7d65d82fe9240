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

"""The rules that every op shares: the accumulation dtype and the loss reductions.

Their one home: ``fastvae.ops`` and the rest of the package import ``REDUCTIONS`` and
``accumulation_dtype`` from here (the kernels, which need only Triton and torch, state the same rule in
``fastvae.kernels._launch`` and are tested against this one).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["REDUCTIONS", "accumulation_dtype", "reduce_loss", "expand_reduced_grad"]

REDUCTIONS = ("none", "per_sample", "batchmean", "sum")
"""The reductions of a loss (``reduce_loss``): elementwise, one value per sample, the mean over samples, the total."""

MEAN = "mean"
"""torch's ``reduction="mean"`` (``nn.MSELoss``, ``nn.GaussianNLLLoss``, ``F.kl_div``): the total over the number of
elements. The public ops accept it beside ``REDUCTIONS`` and compute it as their ``sum`` divided by ``numel``."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_loss(values: Tensor, reduction: str, sample_dims: tuple[int, ...], out_dtype: torch.dtype) -> Tensor:
    """Reduce elementwise ``values`` (in the accumulation dtype).

    ``none``: as they are, cast to ``out_dtype``; ``per_sample``: summed over ``sample_dims``;
    ``batchmean``: the total over the number of samples (``numel / prod(sizes of sample_dims)``);
    ``sum``: the total.
    """
    if reduction == "none":
        return values.to(out_dtype)
    if reduction == "per_sample":
        return values.sum(dim=sample_dims) if sample_dims else values.clone()
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        per_sample = math.prod(values.shape[d] for d in sample_dims)
        return total / (values.numel() // per_sample)
    raise ValueError(f"unknown reduction {reduction!r}")


def expand_reduced_grad(grad: Tensor, reduction: str, shape: torch.Size, sample_dims: tuple[int, ...]) -> Tensor:
    """The gradient of a reduced loss, broadcast back to the elementwise ``shape``."""
    if reduction == "none":
        return grad
    if reduction == "per_sample":
        for dim in sorted(d % len(shape) for d in sample_dims):
            grad = grad.unsqueeze(dim)
        return grad
    if reduction == "batchmean":
        per_sample = math.prod(shape[d] for d in sample_dims)
        return grad / (math.prod(shape) // per_sample)
    return grad  # sum

"""moments: per-dimension mean and variance over the batch of ``(N, D)``."""
from __future__ import annotations

import torch
from torch import Tensor

import fastvae

from . import OpBench, acc, numel, traffic


def eager(z: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.var_mean(z, dim=0, correction=0)`` in the accumulation dtype, as ``(mean, var)``."""
    var, mean = torch.var_mean(acc(z), dim=0, correction=0)
    return mean, var


def fused(z: Tensor) -> tuple[Tensor, Tensor]:
    return tuple(fastvae.moments(z))


def inputs(case: dict, device: torch.device, dtype: torch.dtype) -> tuple[Tensor]:
    return (3.0 + 2.0 * torch.randn(case["N"], case["D"], device=device, dtype=dtype)).requires_grad_(),


def min_bytes(case: dict, mode: str, s: int) -> int:
    n = numel(case)
    return traffic(n * s, 2 * n * s, mode)  # read z | read z, write grad z


def label(case: dict) -> str:
    return f"N={case['N']} D={case['D']}"


CASES = tuple({"N": n, "D": d} for n in (10_000, 100_000) for d in (16, 64))
QUICK_CASES = ({"N": 1000, "D": 8},)
CASE = OpBench("moments", CASES, QUICK_CASES, inputs, eager, fused, min_bytes, label,
               "forward: read z (N s); backward: read z, write d z (2 N s)", typical={"N": 100_000, "D": 64})

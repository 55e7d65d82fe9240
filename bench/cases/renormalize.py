"""renormalize (per_dim): ``(z - mean) / sqrt(var + eps) * sqrt(target_var) + target_mean`` over the batch."""
from __future__ import annotations

import torch
from torch import Tensor

import fastvae

from . import OpBench, acc, numel, traffic
from . import moments as _moments


def eager(z: Tensor, target_mean: Tensor, target_var: Tensor) -> tuple[Tensor]:
    """``(z - mean) / sqrt(var + 1e-6) * sqrt(target_var) + target_mean`` with per-dimension targets."""
    z_a = acc(z)
    var, mean = torch.var_mean(z_a, dim=0, correction=0, keepdim=True)
    return (((z_a - mean) / torch.sqrt(var + 1e-6) * torch.sqrt(target_var) + target_mean).to(z.dtype),)


def fused(z: Tensor, target_mean: Tensor, target_var: Tensor) -> tuple[Tensor]:
    return (fastvae.renormalize(z, target_mean, target_var),)


def inputs(case: dict, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    (z,) = _moments.inputs(case, device, dtype)
    target_mean = torch.zeros(case["D"], device=device, dtype=torch.float32)
    target_var = torch.full((case["D"],), 0.8, device=device, dtype=torch.float32)
    return z, target_mean, target_var


def min_bytes(case: dict, mode: str, s: int) -> int:
    n = numel(case)
    return traffic(2 * n * s, 3 * n * s, mode)  # read z, write z' | read g, z, write grad z


CASE = OpBench("renormalize", _moments.CASES, _moments.QUICK_CASES, inputs, eager, fused, min_bytes, _moments.label,
               "forward: read z, write z' (2 N s); backward: read g, z, write d z (3 N s)",
               typical={"N": 100_000, "D": 64})

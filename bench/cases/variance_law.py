"""variance_law: ``(E[mu], Var(mu) + E[exp(logvar)])`` per dimension of latents ``(N, D)``."""
from __future__ import annotations

import torch
from torch import Tensor

import fastvae

from . import OpBench, acc, numel, traffic
from . import moments as _moments
from . import reparameterize_kl as _latents


def eager(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """``(E[mu], Var(mu) + E[exp(logvar)])`` per dimension."""
    var_mu, mean = torch.var_mean(acc(mu), dim=0, correction=0)
    return mean, var_mu + acc(logvar).exp().mean(dim=0)


def fused(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    return tuple(fastvae.variance_law(mu, logvar))


def inputs(case: dict, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _latents.inputs({"B": case["N"], "D": case["D"]}, device, dtype)


def min_bytes(case: dict, mode: str, s: int) -> int:
    n = 2 * numel(case)  # mu and logvar
    return traffic(n * s, 2 * n * s, mode)  # read mu, logvar | read mu, logvar, write 2 grads


CASE = OpBench("variance_law", _moments.CASES, _moments.QUICK_CASES, inputs, eager, fused, min_bytes, _moments.label,
               "forward: read mu, logvar (2 N s); backward: read mu, logvar, write d mu, d logvar (4 N s)",
               typical={"N": 100_000, "D": 64})

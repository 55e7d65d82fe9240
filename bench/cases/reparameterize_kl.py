"""reparameterize_kl: ``z = mu + exp(logvar / 2) eps`` and the batch-mean KL, on latents ``(B, D)``."""
from __future__ import annotations

import torch
from torch import Tensor

import fastvae

from . import OpBench, acc, numel, randn, traffic


def eager(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """``z = mu + exp(logvar / 2) * randn_like(mu)`` and ``KL = sum(0.5 (mu^2 + e^logvar - logvar - 1)) / N``
    (pytorch/examples' VAE, with the batch mean of ``reduction="batchmean"``)."""
    mu_a, logvar_a = acc(mu), acc(logvar)
    std = torch.exp(0.5 * logvar_a)
    z = (mu_a + std * torch.randn_like(std)).to(mu.dtype)
    kl = 0.5 * (mu_a.pow(2) + logvar_a.exp() - logvar_a - 1).sum() / (mu.numel() // mu.shape[-1])
    return z, kl


def fused(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    return fastvae.reparameterize_kl(mu, logvar)


def inputs(case: dict, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = (case["B"], case["D"])
    return randn(shape, device, dtype), (0.5 * torch.randn(shape, device=device, dtype=dtype)).requires_grad_()


def min_bytes(case: dict, mode: str, s: int) -> int:
    n = numel(case)
    return traffic(3 * n * s, 5 * n * s, mode)  # read mu, logvar, write z | read g_z, mu, logvar, write 2 grads


def label(case: dict) -> str:
    return f"B={case['B']} D={case['D']}"


CASES = tuple({"B": b, "D": d} for b in (128, 1024, 16384) for d in (16, 64, 512))
CASE = OpBench(
    "reparameterize_kl", CASES, ({"B": 64, "D": 8}, {"B": 256, "D": 32}), inputs, eager, fused, min_bytes, label,
    "forward: read mu, logvar, write z (3 N s); backward: read g_z, mu, logvar, write d mu, d logvar (5 N s); "
    "the CPU engine also writes the float32 noise forward and reads it backward (4 N bytes saved, 8 N moved) "
    "instead of drawing it again, the GPU kernels recompute it",
    typical={"B": 16384, "D": 64})

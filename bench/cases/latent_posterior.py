"""latent_posterior: the posterior step of a latent-diffusion autoencoder on its encoder output
``h = (B, 2C, H, W)`` (or ``(B, 2C, T, H, W)`` for video): ``mean, logvar = h.chunk(2, dim=1)``, logvar
clamped to [-30, 20], ``z = mean + std * eps`` and the KL summed over each sample's latent, averaged over
the batch (diffusers' ``DiagonalGaussianDistribution``: ``sample()`` and ``kl().mean()``)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

import fastvae

from . import OpBench, randn, traffic

LOGVAR_CLAMP = (-30.0, 20.0)


def eager(h: Tensor) -> tuple[Tensor, Tensor]:
    """diffusers' ``DiagonalGaussianDistribution(h)``: ``sample()`` and ``kl().mean()``, in h's dtype as
    diffusers computes it, the KL summed over every non-batch dim."""
    mean, logvar = torch.chunk(h, 2, dim=1)
    logvar = torch.clamp(logvar, *LOGVAR_CLAMP)
    std = torch.exp(0.5 * logvar)
    var = torch.exp(logvar)
    z = mean + std * torch.randn(mean.shape, device=h.device, dtype=h.dtype)
    kl = 0.5 * torch.sum(torch.pow(mean, 2) + var - 1.0 - logvar, dim=list(range(1, h.dim())))
    return z, kl.mean()


def fused(h: Tensor) -> tuple[Tensor, Tensor]:
    mean, logvar = h.chunk(2, dim=1)
    return fastvae.reparameterize_kl(mean, logvar, event_dims=h.dim() - 1, logvar_clamp=LOGVAR_CLAMP)


def latent_shape(case: dict) -> tuple[int, ...]:
    return (case["B"], case["C"], *case["spatial"])


def inputs(case: dict, device: torch.device, dtype: torch.dtype) -> tuple[Tensor]:
    B, C, *spatial = latent_shape(case)
    h = randn((B, 2 * C, *spatial), device, dtype, requires_grad=False)
    if case.get("channels_last"):
        h = h.contiguous(memory_format=torch.channels_last if len(spatial) == 2 else torch.channels_last_3d)
    return (h.requires_grad_(),)


def min_bytes(case: dict, mode: str, s: int) -> int:
    n = math.prod(latent_shape(case))  # latent elements: h holds 2 n
    return traffic(3 * n * s, 5 * n * s, mode)  # read h, write z | read g_z, h, write d h


def label(case: dict) -> str:
    return "x".join(map(str, latent_shape(case))) + (" cl" if case.get("channels_last") else "")


CASES = (
    {"B": 8, "C": 4, "spatial": (64, 64)},  # Stable Diffusion 1/2 at 512 px
    {"B": 1, "C": 4, "spatial": (32, 32)},
    {"B": 32, "C": 4, "spatial": (32, 32)},
    {"B": 1, "C": 16, "spatial": (128, 128)},  # SD3 / Flux at 1024 px: one sample of 262144 elements
    {"B": 8, "C": 16, "spatial": (64, 64)},
    {"B": 8, "C": 16, "spatial": (64, 64), "channels_last": True},
    {"B": 4, "C": 32, "spatial": (64, 64)},
    {"B": 1, "C": 16, "spatial": (8, 64, 64)},  # a video latent (B, C, T, H, W)
)
CASE = OpBench(
    "latent_posterior", CASES, ({"B": 2, "C": 4, "spatial": (8, 8)},), inputs, eager, fused, min_bytes, label,
    "h = (B, 2C, ...) holds 2 n elements; forward: read h, write z (3 n s); backward: read g_z, h, write d h (5 n s);"
    " the CPU engine also keeps the float32 noise (4 n bytes saved), the GPU kernels recompute it",
)


if __name__ == "__main__":
    from bench.static import latent_posterior_table

    print("\n".join(latent_posterior_table()))

"""The launches of ``fastvae.kernels.reparameterize`` that CI compiles for every NVIDIA target: the
training path of each pass (batchmean KL), the ``DiagonalGaussian`` path (per-sample KL, clamped logvar) on
``(N, D)`` latents, and the same on the halves of a latent-diffusion encoder output read in place."""
from __future__ import annotations

import torch

from fastvae.kernels._launch import accumulation_dtype
from fastvae.kernels.reparameterize import backward, forward

from .harness import Spec, latent_pair


def _aot_forward(mu, logvar):
    forward(mu, logvar, torch.zeros(1, dtype=torch.int64), "batchmean")


def _aot_backward(mu, logvar):
    grad_kl = torch.ones(1, dtype=accumulation_dtype(mu.dtype))
    backward(torch.randn(mu.shape, dtype=mu.dtype), grad_kl, mu, logvar, torch.zeros(1, dtype=torch.int64), "batchmean")


_LDM_CLAMP = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution


def _aot_forward_clamped(mu, logvar):
    forward(mu, logvar, torch.zeros(1, dtype=torch.int64), "per_sample", _LDM_CLAMP)


def _aot_backward_clamped(mu, logvar):
    acc = accumulation_dtype(mu.dtype)
    n = mu.shape[0]
    # the per-sample gradient follows the variant: aligned, or starting one element into its buffer
    grad_kl = torch.ones(n, dtype=acc) if mu.is_contiguous() else torch.ones(n + 1, dtype=acc)[1:]
    backward(torch.randn(mu.shape, dtype=mu.dtype), grad_kl, mu, logvar, torch.zeros(1, dtype=torch.int64),
             "per_sample", _LDM_CLAMP)


def latent_halves(dtype: torch.dtype, aligned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunk(2, dim=1)`` of a channels_last ``(4, 32, 32, 32)`` encoder output (aligned), or of a contiguous
    5-D ``(2, 16, 4, 16, 16)`` one starting one element into its buffer (strided): the kernels read both in place."""
    if aligned:
        h = torch.randn(4, 32, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
    else:
        h = torch.randn(2 * 16 * 4 * 16 * 16 + 1, dtype=dtype)[1:].view(2, 16, 4, 16, 16)
    return tuple(h.chunk(2, dim=1))


def _aot_forward_latent(mu, logvar):
    forward(mu, logvar, torch.zeros(1, dtype=torch.int64), "per_sample", _LDM_CLAMP, event_dims=mu.dim() - 1)


def _aot_backward_latent(mu, logvar):
    grad_kl = torch.ones(mu.shape[0], dtype=accumulation_dtype(mu.dtype))
    backward(torch.empty_like(mu).normal_(), grad_kl, mu, logvar, torch.zeros(1, dtype=torch.int64), "per_sample",
             _LDM_CLAMP, event_dims=mu.dim() - 1)


AOT_SPECS = [
    Spec("reparameterize_kl", "forward", "z and batchmean KL (HAS_Z, KL_MODE=3)", latent_pair, _aot_forward,
         traffic={"reparameterize_kl_fwd_kernel": (2, 1)}, memsets=1),
    Spec("reparameterize_kl", "backward", "grad z and batchmean grad KL (HAS_GRAD_Z, HAS_GRAD_KL)",
         latent_pair, _aot_backward, traffic={"reparameterize_kl_bwd_kernel": (3, 2)}),
    Spec("reparameterize_kl", "forward", "DiagonalGaussian: z and per-sample KL, logvar clamped (CLAMP, KL_MODE=2)",
         latent_pair, _aot_forward_clamped, traffic={"reparameterize_kl_fwd_kernel": (2, 1)}, tag="clamp"),
    Spec("reparameterize_kl", "backward", "DiagonalGaussian: grad z and per-sample grad KL, logvar clamped (CLAMP)",
         latent_pair, _aot_backward_clamped, traffic={"reparameterize_kl_bwd_kernel": (3, 2)}, tag="clamp"),
    Spec("reparameterize_kl", "forward", "DiagonalGaussian on (B, 2C, ...) halves read in place, per-sample KL split over"
         " programs", latent_halves, _aot_forward_latent, traffic={"reparameterize_kl_fwd_kernel": (2, 1)}, memsets=1,
         tag="latent"),
    Spec("reparameterize_kl", "backward", "DiagonalGaussian on (B, 2C, ...) halves read in place", latent_halves,
         _aot_backward_latent, traffic={"reparameterize_kl_bwd_kernel": (3, 2)}, tag="latent"),
]

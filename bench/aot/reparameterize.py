"""The launches of ``fastvae.kernels.reparameterize`` that CI compiles for every NVIDIA target: the
training path of each pass (batchmean KL), and the ``DiagonalGaussian`` path (per-sample KL, clamped logvar)."""
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


AOT_SPECS = [
    Spec("reparameterize_kl", "forward", "z and batchmean KL (HAS_Z, KL_MODE=3)", latent_pair, _aot_forward,
         traffic={"reparameterize_kl_fwd_kernel": (2, 1)}, memsets=1),
    Spec("reparameterize_kl", "backward", "grad z and batchmean grad KL (HAS_GRAD_Z, HAS_GRAD_KL)",
         latent_pair, _aot_backward, traffic={"reparameterize_kl_bwd_kernel": (3, 2)}),
    Spec("reparameterize_kl", "forward", "DiagonalGaussian: z and per-sample KL, logvar clamped (CLAMP, KL_MODE=2)",
         latent_pair, _aot_forward_clamped, traffic={"reparameterize_kl_fwd_kernel": (2, 1)}, tag="clamp"),
    Spec("reparameterize_kl", "backward", "DiagonalGaussian: grad z and per-sample grad KL, logvar clamped (CLAMP)",
         latent_pair, _aot_backward_clamped, traffic={"reparameterize_kl_bwd_kernel": (3, 2)}, tag="clamp"),
]

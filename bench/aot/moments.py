"""The launches of ``fastvae.kernels.moments`` that CI compiles for every NVIDIA target: moments and
per_dim renormalize, each pass as training and the two-stage sampler run them (rows in several chunks,
so FINAL=False). The variance law runs the same kernels with HAS_LOGVAR."""
from __future__ import annotations

import torch

from fastvae.kernels._launch import accumulation_dtype
from fastvae.kernels.moments import moments, moments_backward, renormalize, renormalize_backward

from .harness import Spec, batch_pair, batch_slab


def _aot_stats(z):
    return torch.ones(z.shape[0] * z.shape[2], dtype=accumulation_dtype(z.dtype))


def _aot_targets(z):
    F = z.shape[0] * z.shape[2]
    return torch.zeros(F, dtype=torch.float32), torch.full((F,), 0.8, dtype=torch.float32)


def _aot_moments(z):
    moments(z)


def _aot_moments_backward(z):
    moments_backward(_aot_stats(z), _aot_stats(z), z, _aot_stats(z))


def _aot_renormalize(z):
    renormalize(z, *_aot_targets(z), scalar_mode=False, eps=1e-6)


def _aot_renormalize_backward(z):
    stats = _aot_stats(z)
    renormalize_backward(torch.randn(z.shape, dtype=z.dtype), z, stats, stats, stats.new_empty(0), _aot_targets(z)[1],
                         scalar_mode=False, eps=1e-6)


def _aot_variance_law(mu, logvar):
    moments(mu, logvar=logvar)


def _aot_variance_law_backward(mu, logvar):
    moments_backward(_aot_stats(mu), _aot_stats(mu), mu, _aot_stats(mu), logvar=logvar)


AOT_SPECS = [
    Spec("moments", "forward", "chunked column reduction (FINAL=False)", batch_slab, _aot_moments,
         traffic={"moments_partial_kernel": (1, 0), "moments_finish_kernel": (0, 0)}),
    Spec("moments", "backward", "grad mean and grad var (HAS_GRAD_MEAN, HAS_GRAD_VAR)",
         batch_slab, _aot_moments_backward, traffic={"moments_bwd_kernel": (1, 1)}),
    Spec("renormalize", "forward", "per_dim, per-dimension targets (TM_TENSOR, TV_TENSOR)",
         batch_slab, _aot_renormalize,
         traffic={"moments_partial_kernel": (1, 0), "moments_finish_kernel": (0, 0), "renormalize_fwd_kernel": (1, 1)}),
    Spec("renormalize", "backward", "per_dim: chunked column sums, then the gradient",
         batch_slab, _aot_renormalize_backward,
         traffic={"renormalize_bwd_partial_kernel": (2, 0), "renormalize_bwd_finish_kernel": (0, 0),
                  "renormalize_bwd_kernel": (2, 1)}),
    Spec("variance_law", "forward", "Var(mu) + E[exp(logvar)] (HAS_LOGVAR)", batch_pair, _aot_variance_law,
         traffic={"moments_partial_kernel": (2, 0), "moments_finish_kernel": (0, 0)}),
    Spec("variance_law", "backward", "grad mu and grad logvar (HAS_LOGVAR)", batch_pair, _aot_variance_law_backward,
         traffic={"moments_bwd_kernel": (2, 2)}),
]

"""The spec of every fused op: plain, obvious PyTorch formulas and their backward formulas.

One module per op (``philox``, ``reparameterize``, ``balanced_mse``, ``moments``) and the shared
rules in ``reduce``. The Triton kernels and the CPU engine (``fastvae.ops._cpu``) are tested against
these functions; nothing here is tuned for speed, and the ops never call it.

Each function has the signature of its public op in ``fastvae`` and is differentiable through
ordinary autograd. The ``*_backward`` functions spell out the gradient formulas that the backward
kernels implement; the tests check them against autograd of the forward.

The vocabulary of the ops lives here, one definition each: ``REDUCTIONS`` and the accumulation rule
(``reduce``), ``UPDATE_RULES`` (``balanced_mse``), ``RENORMALIZE_MODES`` (``moments``); ``fastvae.ops``
imports them. Accumulation is in float32 (float64 for float64 inputs). Elementwise results keep the input dtype;
reduced losses come back in the accumulation dtype (float32 for half-precision inputs).

**Noise.** ``philox_randn`` is Philox 4x32-10 with Box-Muller exactly as Triton's ``tl.randn`` draws
it. The CPU engine draws the same stream: the same counters, words and float32 uniforms bit for bit, and,
where numba runs, Box-Muller's ``log`` and ``cos`` as vectorized float32 polynomials within 4 ulp
of this spec's (``fastvae/ops/_cpu_numba.py``; without numba, this spec's very bits). A GPU agrees to
about 1e-6, its ``log``/``cos`` being approximate. We kept the stream rather than drawing CPU noise from a
``torch.Generator`` keyed by the seed: compiled, the Philox stream costs less than ``torch.randn``, and a
seed then means one ``z`` on every backend to float32 rounding (a test on CPU of a run on GPU) and bit for
bit on one machine (a resumed run).
"""
from .balanced_mse import (
    UPDATE_RULES, balanced_loss, balanced_mse, balanced_mse_backward, balanced_mse_forward, balanced_mse_loss,
    update_running_mse,
)
from .moments import (
    RENORMALIZE_MODES, moments, moments_backward, renormalize, renormalize_backward, renormalize_from_moments,
    scalar_renormalization, variance_law, variance_law_backward,
)
from .philox import philox_randn, philox_uint32
from .reduce import REDUCTIONS, accumulation_dtype, expand_reduced_grad, reduce_loss
from .reparameterize import (
    clamp_logvar, clamp_logvar_grad, event_reparameterize_kl, kl_divergence, reparameterize, reparameterize_kl,
    reparameterize_kl_backward,
)

__all__ = [
    "philox_uint32", "philox_randn",
    "REDUCTIONS", "accumulation_dtype", "reduce_loss", "expand_reduced_grad",
    "reparameterize", "kl_divergence", "reparameterize_kl", "reparameterize_kl_backward",
    "clamp_logvar", "clamp_logvar_grad", "event_reparameterize_kl", "balanced_loss",
    "UPDATE_RULES", "balanced_mse_loss", "balanced_mse_forward", "update_running_mse", "balanced_mse",
    "balanced_mse_backward",
    "RENORMALIZE_MODES", "moments", "renormalize", "renormalize_from_moments", "scalar_renormalization",
    "variance_law", "moments_backward", "renormalize_backward", "variance_law_backward",
]

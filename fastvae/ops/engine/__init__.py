"""The engine: the ops without Triton, on any device (the backend ``torch``).

- ``formulas``: plain PyTorch, one function per op forward and backward;
- ``loops``: numba loops for the CPU (the noise of ``tl.randn``, ``reparameterize_kl`` in one pass);
- ``philox``: the Philox stream of ``tl.randn``, from ``loops`` where numba runs, else from PyTorch integer ops.
"""
from .formulas import (
    balanced_mse_backward, balanced_mse_forward, moments, moments_backward, renormalize_backward,
    renormalize_from_moments, reparameterize_kl, reparameterize_kl_backward, reparameterize_kl_rows,
    reparameterize_kl_rows_backward, scalar_renormalization, update_running_mse, variance_law, variance_law_backward,
)
from .philox import numba_available, philox_randn

__all__ = [
    "reparameterize_kl", "reparameterize_kl_backward", "reparameterize_kl_rows", "reparameterize_kl_rows_backward",
    "balanced_mse_forward", "balanced_mse_backward", "update_running_mse",
    "moments", "moments_backward", "variance_law", "variance_law_backward",
    "renormalize_from_moments", "renormalize_backward", "scalar_renormalization",
    "philox_randn", "numba_available",
]

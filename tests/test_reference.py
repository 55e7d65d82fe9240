"""The spec package: its public names, and its Philox written from the definition."""
from __future__ import annotations

import torch

from fastvae import reference


def test_public_names_stay_importable():
    for name in ("philox_uint32", "philox_randn", "accumulation_dtype", "reduce_loss", "expand_reduced_grad",
                 "reparameterize", "kl_divergence", "reparameterize_kl", "reparameterize_kl_backward", "UPDATE_RULES",
                 "balanced_mse_loss", "balanced_mse_forward", "update_running_mse", "balanced_mse",
                 "balanced_mse_backward",
                 "RENORMALIZE_MODES", "moments", "renormalize", "renormalize_from_moments", "scalar_renormalization",
                 "variance_law", "moments_backward", "renormalize_backward", "variance_law_backward"):
        assert hasattr(reference, name), name
    assert reference.UPDATE_RULES == ("min-ema", "ema")
    assert reference.REDUCTIONS == ("none", "per_sample", "batchmean", "sum")
    assert reference.RENORMALIZE_MODES == ("per_dim", "scalar")


def test_uniform_fold_is_tritons():
    """Words from 2**31 fold to ``2**32 - 1 - word`` (``~c`` of a negative int32); the largest is below 1."""
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=torch.int64)
    u = reference.philox.uniform_from_word(words)
    assert u.dtype == torch.float32
    assert u[0] == u[5] == 0 and u[1] == u[4] > 0 and u[2] == u[3] and u[2] < 1


def test_balanced_mse_forward_sum_is_of_squared_errors():
    x_hat, x = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    _, sse = reference.balanced_mse_forward(x_hat, x, torch.tensor(1.0))
    assert float(sse) == 5.0

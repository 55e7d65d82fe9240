"""PyTorch's argument names on the public ops: ``generator=`` wherever an op draws noise (beside ``seed=``),
torch's ``reduction="mean"`` (the total over the number of elements), and ``moments``' stated default correction."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae.distributions import seed_from_generator

ROOT = Path(__file__).resolve().parent.parent


def _sample_of_reparameterize_kl(mu, logvar, **kwargs):
    return fastvae.reparameterize_kl(mu, logvar, **kwargs)[0]


@pytest.mark.parametrize("op", (fastvae.reparameterize, _sample_of_reparameterize_kl))
def test_generator_gives_the_sample_of_the_seed_it_draws(op):
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    z = op(mu, logvar, generator=torch.Generator().manual_seed(7))
    seed = seed_from_generator(torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, op(mu, logvar, seed=seed), rtol=0, atol=0)
    g = torch.Generator().manual_seed(7)
    first, second = op(mu, logvar, generator=g), op(mu, logvar, generator=g)
    assert torch.equal(first, z) and not torch.equal(first, second)  # the generator advanced
    with pytest.raises(ValueError, match="seed or generator, not both"):
        op(mu, logvar, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        op(mu, logvar, generator=3)


def test_every_noise_drawing_op_takes_generator():
    for op in (fastvae.reparameterize, fastvae.reparameterize_kl):
        parameters = inspect.signature(op).parameters
        assert "generator" in parameters and "seed" in parameters, op.__name__


def test_reduction_mean_is_the_total_over_the_elements():
    mu, logvar = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    kl_sum = fastvae.kl_divergence(mu, logvar, reduction="sum")
    torch.testing.assert_close(fastvae.kl_divergence(mu, logvar, reduction="mean"), kl_sum / mu.numel())
    z, kl = fastvae.reparameterize_kl(mu, logvar, seed=3, reduction="mean")
    torch.testing.assert_close(kl, kl_sum / mu.numel())
    torch.testing.assert_close(z, fastvae.reparameterize(mu, logvar, seed=3), rtol=0, atol=0)
    x_hat = torch.rand(4, 10, dtype=torch.float64, requires_grad=True)
    x = torch.rand(4, 10, dtype=torch.float64)
    running = torch.tensor(0.3, dtype=torch.float64)
    loss = fastvae.balanced_mse(x_hat, x, running.clone(), update=False, reduction="mean")
    expected = torch.nn.GaussianNLLLoss(reduction="mean")(x_hat, x, running.expand(4, 10))
    torch.testing.assert_close(loss, expected)
    rec = (x_hat - x).abs()
    torch.testing.assert_close(fastvae.balanced_loss(rec, running.clone(), update=False, reduction="mean"),
                               fastvae.balanced_loss(rec, running.clone(), update=False, reduction="sum") / rec.numel())
    loss.backward()
    torch.testing.assert_close(x_hat.grad, (x_hat - x).detach() / running / x.numel())
    for module in (fastvae.BalancedMSE(reduction="mean"), fastvae.BalancedLoss(reduction="mean")):
        assert module.reduction == "mean"
    with pytest.raises(ValueError, match="reduction"):
        fastvae.kl_divergence(mu, logvar, reduction="elementwise_mean")


def test_moments_default_correction_is_stated_and_matches_readme():
    assert inspect.signature(fastvae.moments).parameters["correction"].default == 0
    z = torch.randn(50, 3, dtype=torch.float64)
    torch.testing.assert_close(fastvae.moments(z)[1], z.var(dim=0, correction=0))
    torch.testing.assert_close(fastvae.moments(z, correction=1)[1], z.var(dim=0))
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "ops.md").read_text()  # README and the page it links
    lines = [line for line in text.splitlines() if "fastvae.moments(" in line and "correction" in line]
    assert lines and all(re.search(r"correction=0|population", line) for line in lines), lines
    assert "correction= as torch.var" not in text

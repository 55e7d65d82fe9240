"""balanced_loss / BalancedLoss: taming's ``rec / exp(logvar) + logvar`` with ``exp(logvar)`` the running mean of
the reconstruction loss, against the formula in every dtype and reduction, and its reduction to balanced_mse."""
from __future__ import annotations

import math

import pytest
import torch

import fastvae
from fastvae import reference
from fastvae.backend import use_backend
from helpers import DTYPES, RTOL, assert_close_scaled

REDUCTIONS = ("none", "per_sample", "batchmean", "sum")


def _formula(rec64, r, reduction):
    """taming's nll_loss with exp(logvar) = r: rec / r + log r, then reduced (batchmean: sum / shape[0])."""
    values = rec64 / r + math.log(r)
    if reduction == "none":
        return values
    if reduction == "per_sample":
        return values.sum(dim=tuple(range(1, values.dim())))
    return values.sum() / (values.shape[0] if reduction == "batchmean" else 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_and_gradient_match_the_formula(dtype, reduction):
    x_hat, x = torch.rand(2, 4, 3, 5, 5, dtype=torch.float64).unbind(0)
    rec = (x_hat - x).abs() + 0.3 * (x_hat - x).pow(2).mean(dim=(1, 2, 3), keepdim=True)
    rec = rec.to(dtype).requires_grad_(True)
    running = torch.tensor(0.37)
    loss = fastvae.balanced_loss(rec, running, update=False, reduction=reduction)
    rec64 = rec.detach().double().requires_grad_(True)
    r = float(running)  # 0.37 as float32 holds it
    expected = _formula(rec64, r, reduction)
    assert loss.shape == expected.shape
    assert loss.dtype == (dtype if reduction == "none" else reference.accumulation_dtype(dtype))
    scale = _formula(rec64.detach().abs(), r, reduction).abs() + abs(math.log(r)) * rec.numel()
    assert_close_scaled(loss, expected, rtol=RTOL[dtype], scale=scale)
    g = torch.randn(loss.shape, dtype=torch.float64)
    loss.backward(g.to(loss.dtype))
    expected.backward(g.to(loss.dtype).double())
    assert_close_scaled(rec.grad, rec64.grad, rtol=RTOL[dtype])
    assert running.item() == pytest.approx(0.37)  # update=False leaves it


@pytest.mark.parametrize("rule", ("min-ema", "ema"))
def test_running_loss_update(rule):
    rec = torch.rand(4, 3, 2, 2) * 3
    running = torch.tensor(1.0)
    fastvae.balanced_loss(rec, running, momentum=0.9, rule=rule)
    ema = 0.9 * 1.0 + 0.1 * rec.mean().item()
    expected = min(1.0, ema) if rule == "min-ema" else ema
    assert running.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_squared_error_reduces_to_balanced_mse(backend, reduction):
    """With rec = (x_hat - x)^2 the loss is twice balanced_mse (the Gaussian NLL's 1/2), with the same gradient
    direction and the same running estimate after the update."""
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    x_hat = torch.rand(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    x_hat2 = x_hat.detach().clone().requires_grad_(True)
    r_mse, r_loss = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    with use_backend(backend):
        mse = fastvae.balanced_mse(x_hat, x, r_mse, momentum=0.5, reduction=reduction)
    loss = fastvae.balanced_loss((x_hat2 - x).pow(2), r_loss, momentum=0.5, reduction=reduction)
    torch.testing.assert_close(loss, 2 * mse, rtol=1e-12, atol=1e-12)
    mse.sum().backward()
    loss.sum().backward()
    torch.testing.assert_close(x_hat2.grad, 2 * x_hat.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_loss, r_mse, rtol=1e-12, atol=0)


def test_module_buffer_training_and_eval():
    module = fastvae.BalancedLoss(momentum=0.5)
    assert "running_loss" in module.state_dict()
    rec = torch.full((2, 3), 0.2)
    module(rec)
    assert module.running_loss.item() == pytest.approx(0.6)
    assert module.logvar.item() == pytest.approx(math.log(0.6))
    module.eval()
    loss = module(rec)
    assert module.running_loss.item() == pytest.approx(0.6)
    assert loss.item() == pytest.approx((0.2 / 0.6 + math.log(0.6)) * 3)


def test_batchmean_saves_nothing_of_the_input_size():
    rec = torch.rand(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fastvae.balanced_loss(rec * 1.0, torch.tensor(0.5))
    assert all(n < rec.numel() for n in saved), saved


def test_bad_inputs():
    rec = torch.rand(2, 3)
    with pytest.raises(ValueError, match="running_loss must be positive"):
        fastvae.balanced_loss(rec, torch.tensor(0.0))
    with pytest.raises(ValueError, match="one-element"):
        fastvae.balanced_loss(rec, torch.ones(2))
    with pytest.raises(ValueError, match="reduction"):
        fastvae.balanced_loss(rec, torch.tensor(1.0), reduction="avg")
    with pytest.raises(TypeError, match="rec must be"):
        fastvae.balanced_loss(rec.long(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="init"):
        fastvae.BalancedLoss(init=0.0)

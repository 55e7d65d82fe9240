"""The models (fastvae.models) and the loss policies (fastvae.losses)."""
import math

import pytest
import torch
from torch import nn

import fastvae
from fastvae.losses import BalancedLoss, BetaLoss, LearnedGammaLoss, Objective, build_loss
from fastvae.models import ConvVAE, DenseVAE, ResNetVAE, SecondStageVAE, build_model

SMALL = [
    (DenseVAE((1, 28, 28), 16), (1, 28, 28)),
    (ConvVAE((1, 28, 28), 8, channels=(4, 8), hidden=16), (1, 28, 28)),
    (ConvVAE((3, 32, 32), 8, channels=(4, 8), hidden=16), (3, 32, 32)),
    (ResNetVAE((3, 32, 32), 8, channels=(4, 8), blocks_per_scale=1, hidden=16), (3, 32, 32)),
    (ResNetVAE((3, 64, 64), 8, channels=(4, 8, 8), blocks_per_scale=1, hidden=16), (3, 64, 64)),
    (SecondStageVAE((16,), 16, hidden=(32, 32)), (16,)),
]


@pytest.mark.parametrize("model,shape", SMALL, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_encode_decode_forward(model, shape):
    x = torch.rand(5, *shape)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, model.latent_dim)
    # the two halves of one encoder output: views of the same storage, read without a copy
    assert mu.untyped_storage().data_ptr() == logvar.untyped_storage().data_ptr()
    x_hat = model.decode(mu)
    assert x_hat.shape == x.shape
    if len(shape) == 3:
        assert 0 < x_hat.min() and x_hat.max() < 1  # sigmoid output in data space
    # forward = reparameterize_kl on those views, then decode
    x_hat, kl = model(x, 123)
    z = fastvae.reparameterize(mu, logvar, seed=123)
    torch.testing.assert_close(x_hat, model.decode(z))
    torch.testing.assert_close(kl, fastvae.kl_divergence(mu, logvar))
    assert model.sample(3).shape == (3, *shape)


@pytest.mark.parametrize("model,shape", SMALL, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_gradients_reach_every_parameter_and_spec_rebuilds(model, shape):
    objective = Objective(model, BalancedLoss())
    loss, rec, kl = objective(torch.rand(4, *shape))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    rebuilt = build_model(**model.spec)
    rebuilt.load_state_dict(model.state_dict())  # same architecture, parameter for parameter
    assert rebuilt.spec == model.spec


def test_dense_default_is_the_seed_architecture():
    model = DenseVAE()
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [(784, 256), (256, 64), (64, 32), (32, 32), (16, 32), (32, 64), (64, 256), (256, 784)]
    assert model.latent_dim == 16 and model.input_shape == (1, 28, 28)


def test_second_stage_concatenates_input_to_hidden_output():
    model = SecondStageVAE((16,), 8, hidden=(32, 24))
    assert model.encoder.out.in_features == 16 + 24 and model.encoder.out.out_features == 16
    assert model.decoder.out.in_features == 8 + 24 and model.decoder.out.out_features == 16
    z = torch.randn(4, 8) * 50  # linear output: not squashed into (0, 1)
    assert model.decode(z).abs().max() > 1


def test_resnet_halves_with_stride_two():
    model = ResNetVAE((3, 64, 64), 8, channels=(4, 8, 8), blocks_per_scale=1, hidden=16)
    strided = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 2
    assert model.encoder[-3].in_features == 8 * 16 * 16


@pytest.mark.parametrize("make,match", [
    (lambda: DenseVAE(latent_dim=0), "latent_dim"),
    (lambda: DenseVAE(hidden=(256, -1)), "hidden"),
    (lambda: ConvVAE((1, 30, 30)), "input_shape"),
    (lambda: ConvVAE((1, 28, 28), channels=(4, 8, 16)), "halved"),
    (lambda: ResNetVAE((3, 28, 28)), "input_shape"),
    (lambda: SecondStageVAE((1, 28, 28)), "input_shape"),
    (lambda: build_model("transformer", (1, 28, 28)), "model must be one of"),
    (lambda: build_model("dense", (1, 28, 28), 16, channels=(3,)), "channels"),
])
def test_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


# ------------------------------------------------------------------------------------------- losses
def test_policies_compute_their_formulas():
    x_hat, x = torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4)
    sse, n, p = (x_hat - x).square().sum(), 6, 16

    balanced = BalancedLoss()
    balanced.running_mse.fill_(0.3)
    expected = nn.GaussianNLLLoss(reduction="sum")(x_hat, x, torch.full_like(x, 0.3)) / n
    torch.testing.assert_close(balanced(x_hat, x), expected)
    assert balanced.running_mse < 0.3  # min-ema moved toward the batch MSE (about 1/6)

    torch.testing.assert_close(BetaLoss()(x_hat, x), sse / n)

    learned = LearnedGammaLoss()
    with torch.no_grad():
        learned.log_gamma.fill_(math.log(0.5))
    torch.testing.assert_close(learned(x_hat, x), sse / (2 * 0.25 * n) + p * math.log(0.5))
    torch.testing.assert_close(learned.gamma, torch.tensor(0.5))


def test_learned_gamma_is_stationary_at_the_mse():
    """d/dlog_gamma [sse / (2 gamma^2 N) + P log gamma] = 0 exactly where gamma^2 = sse / (N P) = MSE."""
    x_hat, x = torch.rand(8, 32), torch.rand(8, 32)
    learned = LearnedGammaLoss()
    with torch.no_grad():
        learned.log_gamma.fill_(0.5 * math.log(float((x_hat - x).square().mean())))
    learned(x_hat, x).backward()
    assert abs(float(learned.log_gamma.grad)) < 1e-4


def test_objective_weights_kl_and_build_loss_checks_names():
    model = DenseVAE((1, 8, 8), 4, hidden=(8,))
    x = torch.rand(5, 1, 8, 8)
    loss, rec, kl = Objective(model, BetaLoss(), kl_weight=0.25)(x, 7)
    torch.testing.assert_close(loss, rec + 0.25 * kl)
    with pytest.raises(ValueError, match="loss must be one of"):
        build_loss("l1")
    with pytest.raises(ValueError, match="kl_weight"):
        Objective(model, BetaLoss(), kl_weight=-1.0)
    assert isinstance(build_loss("balanced", momentum=0.9), BalancedLoss)

"""fastvae.DiagonalGaussian against diffusers' DiagonalGaussianDistribution: the same attributes, methods and
gradients in every dtype on both backends, and a tiny AutoencoderKL trained with either class (diffusers'
fed the same noise) reaching the same losses, KL and parameter gradients."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae import reference
from fastvae.backend import use_backend
from fastvae.distributions import seed_from_generator
from helpers import DTYPES, RTOL, RTOL_NOISE, assert_close_scaled

import diffusers  # noqa: E402  (in the test extras)
from diffusers.models.autoencoders import autoencoder_kl, vae as diffusers_vae  # noqa: E402

BACKENDS = ("triton", "torch")


def _parameters(dtype, *, channels_last=False, shape=(2, 8, 3, 5), spread=3.0):
    h = (torch.randn(*shape, dtype=torch.float64) * spread)
    h[:, shape[1] // 2:, 0, 0] = torch.tensor([-40.0, 25.0]).repeat(shape[1] // 4)[: shape[1] // 2]  # past the clamp
    h = h.to(dtype)
    return h.contiguous(memory_format=torch.channels_last) if channels_last else h


def _philox_noise(monkeypatch):
    """diffusers' randn_tensor replaced by the Philox noise fastvae draws from the same generator."""
    def randn_tensor(shape, generator=None, device=None, dtype=None, **_):
        seed = seed_from_generator(generator)
        return reference.philox_randn(seed, shape).to(device=device, dtype=dtype)

    monkeypatch.setattr(diffusers_vae, "randn_tensor", randn_tensor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", (False, True), ids=("contiguous", "channels_last"))
def test_same_attributes_and_methods_as_diffusers(backend, dtype, channels_last, monkeypatch):
    _philox_noise(monkeypatch)
    h = _parameters(dtype, channels_last=channels_last)
    other_h = _parameters(dtype)
    theirs = diffusers_vae.DiagonalGaussianDistribution(h)
    other_theirs = diffusers_vae.DiagonalGaussianDistribution(other_h)
    with use_backend(backend):
        ours = fastvae.DiagonalGaussian(h)
        other = fastvae.DiagonalGaussian(other_h)
        for name in ("mean", "logvar", "std", "var"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0, msg=name)
        assert ours.parameters is h and ours.mode() is ours.mean
        torch.testing.assert_close(ours.mode(), theirs.mode(), rtol=0, atol=0)
        sample = ours.sample(torch.Generator().manual_seed(3))
        expected = theirs.sample(torch.Generator().manual_seed(3))
        assert sample.dtype == expected.dtype == dtype
        m, lv = theirs.mean.double(), theirs.logvar.double()
        eps = reference.philox_randn(seed_from_generator(torch.Generator().manual_seed(3)), m.shape).double()
        assert_close_scaled(sample, expected.double(), rtol=2 * RTOL_NOISE[dtype],
                            scale=m.abs() + (lv / 2).exp() * eps.abs())
        kl, kl_expected = ours.kl(), theirs.kl()
        assert kl.shape == kl_expected.shape == (2,) and kl.dtype == dtype
        kl64 = 0.5 * torch.sum(m * m + lv.exp() - 1 - lv, dim=[1, 2, 3])
        terms = 0.5 * torch.sum(m * m + lv.exp() + 1 + lv.abs(), dim=[1, 2, 3])
        assert_close_scaled(kl, kl64, rtol=RTOL[dtype], scale=terms)
        torch.testing.assert_close(ours.kl(other), theirs.kl(other_theirs), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(ours.nll(sample), theirs.nll(sample), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(ours.nll(sample, dims=[1, 3]), theirs.nll(sample, dims=[1, 3]),
                                   rtol=0, atol=0, equal_nan=True)
        z, kl_one_pass = ours.sample_kl(torch.Generator().manual_seed(3))
        torch.testing.assert_close(z, sample, rtol=0, atol=0)
        torch.testing.assert_close(kl_one_pass, kl, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_is_diffusers_deterministic(backend):
    h = _parameters(torch.float32, shape=(2, 4, 3, 3))
    theirs = diffusers_vae.DiagonalGaussianDistribution(h, deterministic=True)
    with use_backend(backend):
        ours = fastvae.DiagonalGaussian(h, deterministic=True)
        for name in ("mean", "logvar", "std", "var"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ours.sample(torch.Generator().manual_seed(0)),
                                   theirs.sample(torch.Generator().manual_seed(0)))
        torch.testing.assert_close(ours.kl(), theirs.kl())
        torch.testing.assert_close(ours.nll(h[:, :2]), theirs.nll(h[:, :2]))
        z, kl = ours.sample_kl()
        torch.testing.assert_close(z, ours.mean)
        torch.testing.assert_close(kl, theirs.kl())


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_state_decides_the_sample(backend):
    h = _parameters(torch.float32)
    with use_backend(backend):
        posterior = fastvae.DiagonalGaussian(h)
        g = torch.Generator().manual_seed(11)
        first, second = posterior.sample(g), posterior.sample(g)
        assert not torch.equal(first, second)  # the generator advanced
        torch.testing.assert_close(posterior.sample(torch.Generator().manual_seed(11)), first, rtol=0, atol=0)
        torch.manual_seed(4)
        a = posterior.sample()
        torch.manual_seed(4)
        torch.testing.assert_close(posterior.sample(), a, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_gradients_match_diffusers(backend, dtype, monkeypatch):
    _philox_noise(monkeypatch)
    h = _parameters(dtype, channels_last=True)
    grads = []
    for make in (diffusers_vae.DiagonalGaussianDistribution, fastvae.DiagonalGaussian):
        leaf = h.detach().clone().requires_grad_(True)
        with use_backend(backend):
            posterior = make(leaf)
            z = posterior.sample(torch.Generator().manual_seed(1))
            loss = (z * torch.linspace(-1, 1, z.numel(), dtype=dtype).view(z.shape)).sum() + 0.1 * posterior.kl().mean()
            loss.backward()
        grads.append(leaf.grad)
    theirs, ours = grads
    assert (theirs[:, 4:, 0, 0] == 0).all()  # the clamped entries get no gradient
    torch.testing.assert_close(ours, theirs, rtol=1e-5 if dtype == torch.float32 else 1e-7, atol=1e-6)


def test_bad_parameters():
    with pytest.raises(ValueError, match="even size"):
        fastvae.DiagonalGaussian(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fastvae.DiagonalGaussian([1.0, 2.0])
    with pytest.raises(ValueError, match="lo <= hi"):
        fastvae.DiagonalGaussian(torch.randn(2, 4, 4, 4), logvar_clamp=(1.0, 0.0))


# ------------------------------------------------------------------------- drop-in training
def tiny_autoencoder_kl():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )


def _train(model, images, steps=2):
    """A few steps of the usual objective: MSE reconstruction + 1e-3 KL, each step with its own generator."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for step in range(steps):
        optimizer.zero_grad()
        posterior = model.encode(images).latent_dist
        z = posterior.sample(generator=torch.Generator().manual_seed(100 + step))
        kl = posterior.kl().mean()
        rec = F.mse_loss(model.decode(z).sample, images)
        loss = rec + 1e-3 * kl
        loss.backward()
        history.append((loss.detach(), kl.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        optimizer.step()
    return history


@pytest.mark.parametrize("backend", BACKENDS)
def test_autoencoder_kl_trains_the_same_with_fastvae_posterior(backend, monkeypatch):
    _philox_noise(monkeypatch)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    model = tiny_autoencoder_kl()
    theirs = _train(copy.deepcopy(model), images)
    monkeypatch.setattr(autoencoder_kl, "DiagonalGaussianDistribution", fastvae.DiagonalGaussian)
    with use_backend(backend):
        ours = _train(copy.deepcopy(model), images)
    assert type(model.encode(images).latent_dist) is fastvae.DiagonalGaussian
    for (loss_a, kl_a, grads_a), (loss_b, kl_b, grads_b) in zip(theirs, ours):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
        torch.testing.assert_close(kl_b, kl_a, rtol=1e-5, atol=0)
        for name, grad in grads_a.items():
            torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_latents_as_diffusers(backend, monkeypatch):
    """(B, 2C, T, H, W): diffusers sums kl() over dims [1, 2, 3] whatever the rank, and so does DiagonalGaussian."""
    _philox_noise(monkeypatch)
    h = _parameters(torch.float32, shape=(2, 8, 2, 3, 4))
    theirs = diffusers_vae.DiagonalGaussianDistribution(h)
    with use_backend(backend):
        ours = fastvae.DiagonalGaussian(h)
        torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-5, atol=1e-5)
        sample = ours.sample(torch.Generator().manual_seed(2))
        torch.testing.assert_close(sample, theirs.sample(torch.Generator().manual_seed(2)), rtol=1e-5, atol=1e-6)
        z, kl = ours.sample_kl(torch.Generator().manual_seed(2))
        torch.testing.assert_close(z, sample, rtol=0, atol=0)
        torch.testing.assert_close(kl, ours.kl(), rtol=0, atol=0)
        torch.testing.assert_close(ours.nll(sample, dims=[1, 2, 3, 4]), theirs.nll(sample, dims=[1, 2, 3, 4]))


# ------------------------------------------------------------------------- diffusers' conventions
class _PhiloxTorch:
    """``torch`` as diffusers' ``randn_tensor`` sees it, with ``torch.randn(shape, generator=g)`` drawing fastvae's
    Philox noise from ``g``: diffusers' own handling of generator lists then decides which generator feeds which
    batch item."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        return reference.philox_randn(seed_from_generator(generator), tuple(shape)).to(device=device, dtype=dtype)


def test_diffusers_positional_signature():
    h = _parameters(torch.float32, shape=(2, 4, 3, 3))
    theirs = diffusers_vae.DiagonalGaussianDistribution(h, True)
    ours = fastvae.DiagonalGaussian(h, True)
    assert ours.deterministic and ours.dim == 1
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(ours.sample(), theirs.sample(), rtol=0, atol=0)
    assert not fastvae.DiagonalGaussian(h, False).deterministic
    rows = fastvae.DiagonalGaussian(h.permute(0, 2, 3, 1), dim=-1)
    torch.testing.assert_close(rows.mean, h.permute(0, 2, 3, 1)[..., :2], rtol=0, atol=0)
    with pytest.raises(TypeError, match="dim is keyword-only"):
        fastvae.DiagonalGaussian(h, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_of_generators_one_per_batch_item(backend, monkeypatch):
    monkeypatch.setattr(diffusers.utils.torch_utils, "torch", _PhiloxTorch())
    h = _parameters(torch.float32, shape=(3, 8, 3, 5))
    theirs = diffusers_vae.DiagonalGaussianDistribution(h)
    with use_backend(backend):
        ours = fastvae.DiagonalGaussian(h)
        sample = ours.sample([torch.Generator().manual_seed(s) for s in (5, 6, 7)])
        for i, s in enumerate((5, 6, 7)):  # item i depends on generator i alone
            alone = fastvae.DiagonalGaussian(h[i:i + 1]).sample(torch.Generator().manual_seed(s))
            torch.testing.assert_close(sample[i:i + 1], alone, rtol=0, atol=0)
        expected = theirs.sample([torch.Generator().manual_seed(s) for s in (5, 6, 7)])
        torch.testing.assert_close(sample, expected, rtol=1e-6, atol=1e-6)
        one = ours.sample([torch.Generator().manual_seed(5)])  # a list of one is one generator, as in diffusers
        torch.testing.assert_close(one, theirs.sample([torch.Generator().manual_seed(5)]), rtol=1e-6, atol=1e-6)
        z, kl = ours.sample_kl([torch.Generator().manual_seed(s) for s in (5, 6, 7)])
        torch.testing.assert_close(z, sample, rtol=0, atol=0)
        torch.testing.assert_close(kl, ours.kl(), rtol=0, atol=0)
        with pytest.raises(ValueError, match="2 generators for a batch of 3"):
            ours.sample([torch.Generator(), torch.Generator()])
        with pytest.raises(TypeError, match="list of them"):
            ours.sample([torch.Generator(), 3, torch.Generator()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_empty_outputs_as_diffusers(backend):
    h = torch.randn(0, 8, 3, 5)
    theirs = diffusers_vae.DiagonalGaussianDistribution(h)
    with use_backend(backend):
        ours = fastvae.DiagonalGaussian(h)
        for got, expected in ((ours.sample(), theirs.sample()), (ours.kl(), theirs.kl()),
                              (ours.sample_kl()[0], theirs.sample()), (ours.sample_kl()[1], theirs.kl()),
                              (ours.nll(ours.mean), theirs.nll(theirs.mean)),
                              (ours.kl(fastvae.DiagonalGaussian(h)), theirs.kl(theirs))):
            assert got.shape == expected.shape and got.dtype == expected.dtype


def test_one_line_errors_for_parameters_it_cannot_take():
    cases = [
        (lambda: fastvae.DiagonalGaussian(torch.randn(4, 6)).kl(), ValueError, "4 or more dims"),
        (lambda: fastvae.DiagonalGaussian(torch.randn(4, 6)).sample_kl(), ValueError, "4 or more dims"),
        (lambda: fastvae.DiagonalGaussian(torch.randn(4, 6, 2)).nll(torch.randn(4, 3, 2)), ValueError, "do not all"),
        (lambda: fastvae.DiagonalGaussian(torch.ones(2, 4, 3, 3, dtype=torch.int64)), TypeError, "floating"),
        (lambda: fastvae.DiagonalGaussian(torch.randn(2, 4, 3, 3), dim=4), ValueError, "dim must be an int in"),
        (lambda: fastvae.DiagonalGaussian(torch.randn(4)), ValueError, "even size|dim must"),
    ]
    for make, error, match in cases:
        with pytest.raises(error, match=match) as info:
            make()
        assert "\n" not in str(info.value)
    # the 2-D posterior itself works: sample() and the ops' per-sample KL
    posterior = fastvae.DiagonalGaussian(torch.randn(4, 6))
    assert posterior.sample(torch.Generator().manual_seed(0)).shape == (4, 3)


def _one_step(model, images, make_posterior, sample):
    """One Adam step of MSE + 1e-3 KL with the posterior ``make_posterior(parameters)``; loss and gradients."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.zero_grad()
    posterior = make_posterior(model.quant_conv(model.encoder(images)))
    z = sample(posterior)
    loss = F.mse_loss(model.decode(z).sample, images) + 1e-3 * posterior.kl().mean()
    loss.backward()
    optimizer.step()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_autoencoder_kl_trains_a_step_with_generator_lists_and_deterministic(backend, monkeypatch):
    monkeypatch.setattr(diffusers.utils.torch_utils, "torch", _PhiloxTorch())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    model = tiny_autoencoder_kl()
    generators = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    for deterministic in (False, True):
        results = []
        for make in (diffusers_vae.DiagonalGaussianDistribution, fastvae.DiagonalGaussian):
            with use_backend(backend):
                results.append(_one_step(copy.deepcopy(model), images, lambda p: make(p, deterministic),
                                         lambda posterior: posterior.sample(generators())))
        (loss_a, grads_a), (loss_b, grads_b) = results
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
        assert grads_a.keys() == grads_b.keys()
        for name, grad in grads_a.items():
            torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)

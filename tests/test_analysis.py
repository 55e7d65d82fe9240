"""Per-latent statistics against direct computations on small real models; the analyze command end to end."""
import json

import pytest
import torch

import fastvae
from fastvae import analysis
from fastvae.cli import main
from fastvae.data import load_dataset
from fastvae.models import DenseVAE

from helpers import tiny_digits_vae


@pytest.fixture(scope="module")
def digits():
    images, labels = load_dataset("digits", split="train")
    return images[:300], labels[:300]


def _silence(model: DenseVAE, j: int) -> DenseVAE:
    """Make variable j exactly inactive: mu_j = 0 and logvar_j = 0 for every input, and a decoder that ignores z_j."""
    with torch.no_grad():
        head = model.encoder[-1]
        for row in (j, model.latent_dim + j):
            head.weight[row].zero_()
            head.bias[row].zero_()
        model.decoder[0].weight[:, j].zero_()
    return model


def test_statistics_match_direct_computation(digits):
    images, _ = digits
    model = tiny_digits_vae()
    stats = analysis.latent_statistics(model, images, batch_size=64)  # 300 = 4 * 64 + 44: batches are merged
    with torch.no_grad():
        mu, logvar = (t.double() for t in model.encode(images))
        base = model.decode(mu.float()).double()
        mse = ((base - images.double()) ** 2).mean()
        gains = []
        for j in range(model.latent_dim):
            z = mu.clone()
            z[:, j] = 0
            gains.append(((model.decode(z.float()).double() - images.double()) ** 2).mean() - mse)
    assert stats.count == 300
    torch.testing.assert_close(stats.mean_mu, mu.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.var_mu, torch.var(mu, dim=0, correction=0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(stats.mean_sigma2, logvar.exp().mean(0), rtol=1e-5, atol=1e-7)
    kl = fastvae.kl_divergence(mu, logvar, reduction="none").mean(0)
    torch.testing.assert_close(stats.kl, kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.total, torch.var(mu, 0, correction=0) + logvar.exp().mean(0), rtol=1e-4, atol=1e-6)
    assert stats.mse == pytest.approx(float(mse), rel=1e-5)
    torch.testing.assert_close(stats.gain, torch.stack(gains), rtol=1e-3, atol=1e-7)
    assert (stats.gain.abs() > 1e-6).all()  # a random decoder uses every variable


def test_gain_limit_uses_the_first_images_and_moments_use_all(digits):
    images, _ = digits
    model = tiny_digits_vae(seed=1)
    limited = analysis.latent_statistics(model, images, batch_size=64, gain_limit=100)
    first = analysis.latent_statistics(model, images[:100], batch_size=64)
    full = analysis.latent_statistics(model, images, batch_size=300, gain=False)
    torch.testing.assert_close(limited.gain, first.gain)
    torch.testing.assert_close(limited.var_mu, full.var_mu, rtol=1e-5, atol=1e-8)
    assert full.gain is None and full.mse is None and limited.extra["gain_count"] == 100


def test_inactive_variable_flag_gain_and_zeroing(digits):
    images, _ = digits
    model = tiny_digits_vae(seed=2)
    with torch.no_grad():  # at initialization every variable looks inactive: make the others informative
        model.encoder[-1].weight[:4] *= 20
        model.encoder[-1].bias[4:] = -3.0
    model = _silence(model, 1)
    stats = analysis.latent_statistics(model, images, batch_size=128)
    assert stats.var_mu[1] == 0 and stats.mean_sigma2[1] == pytest.approx(1.0) and stats.kl[1] == pytest.approx(0.0)
    assert stats.gain[1] == pytest.approx(0.0, abs=1e-9)
    assert stats.inactive.tolist() == [False, True, False, False]
    assert stats.deviation[1] == pytest.approx(0.0, abs=1e-7)

    check = analysis.zeroing_check(model, stats.inactive, num_samples=8, gain=stats.gain)
    assert check.samples.shape == (8, 1, 8, 8) and check.inactive == [1]
    assert check.mean_abs_diff == 0.0
    assert check.reference_mean_abs_diff > 1e-4
    assert check.reference_variables == [max((0, 2, 3), key=lambda j: float(stats.gain[j]))]

    report = stats.to_dict()
    json.dumps(report)
    assert report["inactive"] == [1] and report["num_inactive"] == 1
    assert [row["active"] for row in report["variables"]] == [True, False, True, True]
    everything = stats.with_thresholds(sigma2_min=-1.0, var_max=1e9)
    assert everything.inactive.all() and stats.inactive.sum() == 1


def test_stationary_condition_and_table():
    d = 3
    stats = analysis.LatentStatistics(
        mean_mu=torch.zeros(d, dtype=torch.float64), var_mu=torch.tensor([0.9, 0.02, 0.3], dtype=torch.float64),
        mean_sigma2=torch.tensor([0.05, 0.97, 0.2], dtype=torch.float64), kl=torch.zeros(d, dtype=torch.float64),
        gain=None, mse=None, count=10)
    torch.testing.assert_close(stats.deviation, torch.tensor([0.05, 0.01, 0.5], dtype=torch.float64))
    assert not stats.stationary
    assert "has not reached its stationary point" in stats.table() and "largest 0.500 (variable 2)" in stats.table()
    assert stats.with_thresholds(tolerance=0.6).stationary
    assert "holds within 0.6" in stats.with_thresholds(tolerance=0.6).table()


def test_bad_input_raises(digits):
    images, _ = digits
    with pytest.raises(TypeError, match="encode"):
        analysis.latent_statistics(torch.nn.Linear(2, 2), images)
    with pytest.raises(ValueError, match="batch_size"):
        analysis.latent_statistics(tiny_digits_vae(), images, batch_size=0)
    with pytest.raises(TypeError, match="images"):
        analysis.latent_statistics(tiny_digits_vae(), images.numpy())
    with pytest.raises(ValueError, match="every"):
        analysis.LatentTracker(images, every=0)
    with pytest.raises(ValueError, match="inactive"):
        analysis.zeroing_check(tiny_digits_vae(), torch.zeros(2, 2, dtype=torch.bool))


def test_tracker_records_along_training(digits, tmp_path):
    images, _ = digits
    model = tiny_digits_vae(seed=3)
    tracker = analysis.LatentTracker(images[:100], every=2)
    config = fastvae.TrainConfig(dataset="digits", epochs=1, batch_size=64, out=str(tmp_path / "run"), progress=False,
                                 tensorboard=False, log_every=5)
    fastvae.fit(model, images, config, callbacks=[tracker])  # 5 steps: records at 2 and 4
    assert tracker.history["step"] == [2, 4]
    assert len(tracker.history["var_mu"][0]) == 4
    saved = json.loads((tmp_path / "run" / analysis.LatentTracker.FILE).read_text())
    assert saved == tracker.history
    assert (tmp_path / "run" / "latent_evolution.png").stat().st_size > 0


def test_analyze_command_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--latent", "2",
                 "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0
    assert main(["analyze", str(run), "--samples", "4", "--var-max", "0.5", "--gain-samples", "200"]) == 0
    printed = capsys.readouterr().out
    assert "Var(mu)" in printed and "stationary condition" in printed and "mean absolute difference" in printed
    report = json.loads((run / "analysis" / "latents.json").read_text())
    assert report["latent_dim"] == 2 and len(report["variables"]) == 2
    assert report["thresholds"]["var_max"] == 0.5 and report["zeroing_check"]["num_samples"] == 4
    model, _ = fastvae.load(run)
    images, _ = load_dataset("digits", split="train")
    with torch.no_grad():
        mu, logvar = model.encode(images)
    assert report["variables"][0]["var_mu"] == pytest.approx(float(torch.var(mu[:, 0], correction=0)), rel=1e-4,
                                                             abs=1e-8)
    for name in ("latents.png", "zeroing.png", "latent_circles.png"):
        assert (run / "analysis" / name).stat().st_size > 0

"""The seed's experiments at a small size: objective variants, noise injection, the 3-D slices, active two-stage."""
import csv
import json

import pytest
import torch

import fastvae
from fastvae import analysis, experiments, two_stage
from fastvae._util import derive_seed
from fastvae.cli import main
from fastvae.data import load_dataset
from fastvae.models import SecondStageVAE

from helpers import tiny_digits_vae


@pytest.fixture(scope="module")
def digits():
    images, labels = load_dataset("digits", split="train")
    return images[:256], labels[:256]


# ------------------------------------------------------------------------------------------ --kl, --no-sampling
def test_kl_penalty_against_direct_formulas():
    mu, logvar = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    full = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).sum() / 6
    torch.testing.assert_close(experiments.kl_penalty(mu, logvar, "full").double(), full, rtol=1e-6, atol=0)
    torch.testing.assert_close(experiments.kl_penalty(mu, logvar, "quadratic").double(), 0.5 * (mu ** 2).sum() / 6,
                               rtol=1e-6, atol=0)
    assert float(experiments.kl_penalty(mu, logvar, "none")) == 0.0
    with pytest.raises(ValueError, match="kl must be one of"):
        experiments.kl_penalty(mu, logvar, "half")


def test_train_options_validate_and_reach_the_loop(tmp_path, digits):
    with pytest.raises(ValueError, match="TrainConfig.kl must be one of"):
        fastvae.TrainConfig(kl="half")
    config = fastvae.TrainConfig(kl="none", sampling=False, epochs=1, batch_size=64, out=str(tmp_path / "run"),
                                 progress=False, tensorboard=False, log_every=1)
    fastvae.fit(tiny_digits_vae(), digits[0], config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 4 and all(r["kl"] == 0.0 for r in train_rows)
    assert fastvae.TrainConfig.load(tmp_path / "run" / "config.json").sampling is False


def test_analyze_reports_the_inactive_count_of_a_no_kl_run(tmp_path, capsys):
    """The inactive count printed by analyze is the direct count over the encoder's outputs."""
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--latent", "4",
                 "--kl", "none", "--no-sampling", "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0
    assert main(["analyze", str(run), "--samples", "2", "--no-gain"]) == 0
    assert "KL none, z = mu" in capsys.readouterr().out
    report = json.loads((run / "analysis" / "latents.json").read_text())
    model, _ = fastvae.load(run)
    images, _ = load_dataset("digits", split="train")
    with torch.no_grad():
        mu, logvar = model.encode(images)
    direct = ((logvar.exp().mean(0) > 0.8) & (mu.var(0, correction=0) < 0.05)).sum()
    assert report["num_inactive"] == int(direct) and report["kl"] == "none" and report["sampling"] is False


# ------------------------------------------------------------------------------------------ noise injection
def test_smallest_gain_variable_skips_inactive_ones():
    stats = analysis.LatentStatistics(mean_mu=torch.zeros(4), var_mu=torch.tensor([1.0, 0.01, 0.9, 0.8]),
                                      mean_sigma2=torch.tensor([0.05, 0.99, 0.1, 0.1]), kl=torch.zeros(4),
                                      gain=torch.tensor([0.3, 0.0, 0.1, 0.2]), mse=0.0, count=10)
    assert experiments.smallest_gain_variable(stats) == 2


def test_noise_injection_rows_against_direct_computation(digits):
    images = digits[0]
    model = tiny_digits_vae(latent=4)
    held_weights = model.encoder[-1].weight[[1, 5]].detach().clone()
    rows = experiments.noise_injection(model, images, variable=2, held=[1], increment=0.5, max_increments=3,
                                       recovery_epochs=2, batch_size=64, stats_images=images[:100], seed=0)
    phases = [r.phase for r in rows]
    noise = [r for r in rows if r.phase == "noise"]
    assert phases[0] == "start" and phases[-2:] == ["recovery", "recovery"]
    assert [r.epoch for r in rows] == list(range(len(rows)))
    assert [r.noise_std for r in noise] == [0.5 * (k + 1) for k in range(len(noise))]
    # the noise grows while the gain stays at or above the KL, and stops at the first epoch where it falls below
    assert all(r.gain_nats >= r.kl for r in noise[:-1])
    assert noise[-1].gain_nats < noise[-1].kl or len(noise) == 3
    # the held variable's encoder rows (mu_1 and logvar_1) get no gradient: held inactive
    torch.testing.assert_close(model.encoder[-1].weight[[1, 5]], held_weights)
    # the last row is the direct statistic of the final model with variable 1 held at mu = 0, logvar = 0
    x = images[:100]
    with torch.no_grad():
        mu, logvar = model.encode(x)
        mu[:, 1], logvar[:, 1] = 0.0, 0.0
        mse = (model.decode(mu) - x).square().mean()
        cut = mu.clone()
        cut[:, 2] = 0.0
        gain = (model.decode(cut) - x).square().mean() - mse
    last = rows[-1]
    assert last.var_mu == pytest.approx(float(mu[:, 2].var(correction=0)), rel=1e-4)
    assert last.mean_sigma2 == pytest.approx(float(logvar[:, 2].exp().mean()), rel=1e-4)
    assert last.gain == pytest.approx(float(gain), rel=1e-3, abs=1e-7)
    assert last.gain_nats == pytest.approx(64 * last.gain / (2 * last.gamma), rel=1e-9)
    kl = 0.5 * (mu[:, 2] ** 2 + logvar[:, 2].exp() - logvar[:, 2] - 1).mean()
    assert last.kl == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="held variables"):
        experiments.noise_injection(model, images, variable=1, held=[1])


def _active_run(run, images):
    """A run folder whose 4 variables are active (a few steps of training leave them all inactive): the encoder
    head scaled up for mu and biased down for logvar, then one step of ``fit`` at a tiny learning rate."""
    model = tiny_digits_vae(latent=4)
    with torch.no_grad():
        model.encoder[-1].weight[:4] *= 30.0
        model.encoder[-1].bias[4:] = -3.0
    fastvae.fit(model, images, fastvae.TrainConfig(dataset="digits", latent=4, hidden=[32], lr=1e-9, max_steps=1,
                                                   out=str(run), progress=False, tensorboard=False))


def test_noise_injection_command_writes_history(tmp_path, capsys, digits):
    run = tmp_path / "run"
    _active_run(run, digits[0])
    assert main(["noise-injection", str(run), "--max-increments", "2", "--recovery-epochs", "1",
                 "--limit", "256", "--stats-samples", "64"]) == 0
    folder = run / "noise_injection"
    with open(folder / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(experiments.HISTORY_FIELDS) and rows[-1]["phase"] == "recovery"
    assert experiments.read_history(folder / "history.csv")[0].phase == "start"
    summary = json.loads((folder / "summary.json").read_text())
    stats = analysis.latent_statistics(fastvae.load(run)[0], load_dataset("digits", split="train")[0][:64])
    assert summary["variable"] == experiments.smallest_gain_variable(stats) and summary["recovery_epochs"] == 1
    for name in ("noise_injection.png", "model.pt"):
        assert (folder / name).stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["noise-injection", str(run), "--variable", "9"])
    assert "--variable must be in [0, 4)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 3-D latent space
def test_slice_latents_grid():
    z = experiments.slice_latents((-1.0, 0.5), side=3, extent=2.0)
    assert z.shape == (2, 9, 3)
    assert torch.equal(z[1, :, 2], torch.full((9,), 0.5))
    assert torch.equal(z[0, :3, 0], torch.tensor([-2.0, 0.0, 2.0]))   # columns: first free variable
    assert torch.equal(z[0, ::3, 1], torch.tensor([2.0, 0.0, -2.0]))  # rows, top first: second free variable


def test_analyze_of_a_3d_run_writes_the_3d_figures(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--latent", "3",
                 "--hidden", "32", "16", "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0
    assert main(["analyze", str(run), "--samples", "2", "--no-gain"]) == 0
    for name in ("latent_3d.png", "latent_slices.png"):
        assert (run / "analysis" / name).stat().st_size > 0


# ------------------------------------------------------------------------------------------ active two-stage
def test_active_latents_fill_and_renormalize():
    torch.manual_seed(0)
    second = SecondStageVAE((2,), latent_dim=2, hidden=(8,)).eval()
    target = two_stage.AggregatePosterior(torch.tensor([0.0, 0.5, 0.0, -1.0]), torch.tensor([1.0, 2.0, 1.0, 0.5]))
    variables = [1, 3]
    z = two_stage.generate_active_latents(second, variables, 500, 4, seed=3, mode="per_dim", target=target)
    expected = two_stage.generate_latents(second, 500, 2, seed=3, mode="per_dim",
                                          target=two_stage.AggregatePosterior(target.mean[variables],
                                                                              target.var[variables]))
    torch.testing.assert_close(z[:, variables], expected)
    fill = torch.randn(500, 4, generator=torch.Generator().manual_seed(derive_seed(3, 1)))
    torch.testing.assert_close(z[:, [0, 2]], fill[:, [0, 2]])
    mean, var = z[:, variables].mean(0), z[:, variables].var(0, correction=0)
    torch.testing.assert_close(mean, target.mean[variables], atol=1e-5, rtol=0)
    torch.testing.assert_close(var, target.var[variables], rtol=1e-4, atol=0)
    zeros = two_stage.generate_active_latents(second, variables, 10, 4, seed=3, fill="zeros")
    assert torch.equal(zeros[:, [0, 2]], torch.zeros(10, 2))
    with pytest.raises(ValueError, match="models"):
        two_stage.generate_active_latents(second, [0, 1, 2], 10, 4)


def test_second_stage_on_active_variables(tmp_path, digits):
    first = tiny_digits_vae(latent=4)
    config = two_stage.second_stage_config(fastvae.TrainConfig(dataset="digits", latent=4), tmp_path / "s",
                                           epochs=1, batch_size=128, progress=False, hidden=[8], latent=2)
    second, _, target = two_stage.train_second_stage(first, digits[0], config, source="mean", variables=[0, 3])
    assert second.input_shape == (2,)
    torch.testing.assert_close(target.var, two_stage.aggregate_posterior(first, digits[0]).var)  # all 4 variables
    stats = analysis.latent_statistics(first, digits[0], gain=False)
    assert two_stage.active_variables(first, digits[0]) == [j for j in range(4) if not bool(stats.inactive[j])]

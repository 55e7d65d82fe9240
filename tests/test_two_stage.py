"""Two-stage generation: renormalization targets, shapes, the variance report, training, the command end to end."""
import json

import pytest
import torch

import fastvae
from fastvae import two_stage
from fastvae._util import derive_seed
from fastvae.cli import main
from fastvae.data import load_dataset
from fastvae.models import DenseVAE, SecondStageVAE


def _first(latent=4):
    return DenseVAE((1, 8, 8), latent_dim=latent, hidden=(32,)).eval()


def _target(d=4):
    mu = torch.randn(500, d) * torch.tensor([0.5, 1.0, 0.1, 2.0])[:d] + 0.3
    logvar = torch.randn(500, d) * 0.2 - 1.0
    return mu, logvar, two_stage.AggregatePosterior.from_latents(mu, logvar)


def test_aggregate_posterior_is_the_variance_law():
    mu, logvar, target = _target()
    torch.testing.assert_close(target.mean, mu.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target.var, torch.var(mu, 0, correction=0) + logvar.exp().mean(0), rtol=1e-5, atol=1e-6)


def test_per_dim_renormalization_hits_the_variance_law_targets():
    _, _, target = _target()
    z = torch.randn(2000, 4) * torch.tensor([0.1, 0.3, 2.0, 0.05]) - 1.0
    out = two_stage.renormalize_latents(z, "per_dim", target)
    mean, var = torch.mean(out, 0), torch.var(out, 0, correction=0)
    torch.testing.assert_close(mean, target.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(var, target.var, rtol=1e-3, atol=0)  # eps = 1e-6 against var 0.0025 at worst


def test_scalar_renormalization_is_one_factor_and_none_is_identity():
    _, _, target = _target()
    z = torch.randn(1000, 4) * torch.tensor([0.1, 0.3, 2.0, 0.05]) + 0.5
    out = two_stage.renormalize_latents(z, "scalar", target)
    factor = target.var.mean().sqrt() / (torch.var(z, 0, correction=0) + 1e-6).sqrt().mean()  # eps = 1e-6
    torch.testing.assert_close(out, z * factor, rtol=1e-5, atol=1e-6)
    assert two_stage.renormalize_latents(z, "none", None) is z
    with pytest.raises(ValueError, match="mode"):
        two_stage.renormalize_latents(z, "affine", target)
    with pytest.raises(ValueError, match="target"):
        two_stage.renormalize_latents(z, "per_dim", None)
    with pytest.raises(ValueError, match="at least 2"):
        two_stage.renormalize_latents(z[:1], "scalar", target)


def test_generation_shapes_and_shared_draws():
    first, second = _first(), SecondStageVAE((4,), 4, hidden=(16,)).eval()
    _, _, target = _target()
    z, x = two_stage.generate(first, second, 50, seed=3, mode="none")
    assert z.shape == (50, 4) and x.shape == (50, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    with torch.no_grad():
        u = torch.randn(50, 4, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(z, second.decode(u))
    z_dim, _ = two_stage.generate(first, second, 50, seed=3, mode="per_dim", target=target)
    torch.testing.assert_close(z_dim, fastvae.renormalize(z, target.mean, target.var))
    settings = two_stage.setting_latents(first, second, 50, target, seed=3)
    assert list(settings) == [name for name, _, _ in two_stage.SETTINGS]
    torch.testing.assert_close(settings["second-stage"], z)
    assert list(two_stage.setting_latents(first, None, 50, target)) == ["first-stage"]
    with pytest.raises(ValueError, match="n must be"):
        two_stage.generate(first, second, 0)


def test_variance_report_against_direct_computation():
    first, second = _first(), SecondStageVAE((4,), 4, hidden=(16,)).eval()
    images, _ = load_dataset("digits", split="train")
    report = two_stage.variance_report(first, second, images[:400], n=3000, seed=1)
    with torch.no_grad():
        mu, logvar = first.encode(images[:400])
    agg = torch.var(mu, 0, correction=0) + logvar.exp().mean(0)
    assert report["aggregate_posterior"]["var"] == pytest.approx(agg.tolist(), rel=1e-4)
    assert report["data_pixel_var"] == pytest.approx(float(images[:400].flatten(1).var(0, correction=0).mean()),
                                                     rel=1e-5)
    rows = report["settings"]
    assert list(rows) == [name for name, _, _ in two_stage.SETTINGS]
    assert rows["first-stage"]["latent_var"] == pytest.approx([1.0] * 4, abs=0.1)  # N(0, I) draws
    assert rows["second-stage + per_dim"]["latent_var"] == pytest.approx(agg.tolist(), rel=1e-3)
    z = two_stage.setting_latents(first, second, 3000, two_stage.aggregate_posterior(first, images[:400]),
                                  seed=1)["second-stage"]
    with torch.no_grad():
        x = first.decode(z)
    assert rows["second-stage"]["pixel_var"] == pytest.approx(float(x.flatten(1).var(0, correction=0).mean()), rel=1e-4)
    assert "aggregate posterior" in two_stage.format_variance_report(report)


def test_resample_callback_redraws_from_the_posterior():
    mu, logvar = torch.randn(20, 4), torch.randn(20, 4) * 0.1
    data = fastvae.reparameterize(mu, logvar, seed=5)
    before = data.clone()
    callback = two_stage._Resample(data, mu, logvar, seed=5)
    callback(epoch=1, epoch_end=False)
    torch.testing.assert_close(data, before)
    callback(epoch=1, epoch_end=True)
    assert not torch.equal(data, before) and callback.draws == 2
    torch.testing.assert_close(data, fastvae.reparameterize(mu, logvar, seed=derive_seed(5, 1)))


@pytest.mark.parametrize("source", ["sample", "mean"])
def test_train_second_stage(tmp_path, source):
    images, _ = load_dataset("digits", split="train")
    first = _first()
    config = two_stage.second_stage_config(fastvae.TrainConfig(dataset="digits", latent=4), tmp_path / source,
                                           epochs=2, batch_size=256, progress=False, hidden=[16])
    second, result, target = two_stage.train_second_stage(first, images[:512], config, source=source)
    assert isinstance(second, SecondStageVAE) and second.input_shape == (4,) and result.step == 4
    loaded, _ = fastvae.load(tmp_path / source)
    for a, b in zip(second.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(target.var, two_stage.aggregate_posterior(first, images[:512]).var)
    with pytest.raises(ValueError, match="source"):
        two_stage.train_second_stage(first, images[:512], config, source="modes")


def test_two_stage_command_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--latent", "4",
                 "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0
    assert main(["two-stage", str(run), "--epochs", "1", "--n", "300", "--hidden", "16", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "second-stage + per_dim" in printed
    folder = run / "two_stage"
    report = json.loads((folder / "report.json").read_text())
    assert set(report["settings"]) == {name for name, _, _ in two_stage.SETTINGS} and report["n"] == 300
    per_dim = report["settings"]["second-stage + per_dim"]["latent_var"]
    assert per_dim == pytest.approx(report["aggregate_posterior"]["var"], rel=1e-3)
    for name in ("samples.png", "variance.png", "checkpoint.pt"):
        assert (folder / name).stat().st_size > 0
    assert isinstance(two_stage.load_second_stage(run), SecondStageVAE)
    assert main(["two-stage", str(run), "--n", "300"]) == 0
    assert "reusing the second stage" in capsys.readouterr().out


def _active_run(run, images):
    """A run folder of a 4-variable model whose variables 0 and 2 are active and 1 and 3 exactly inactive
    (mu = 0, logvar = 0 for every input): one step of ``fit`` at a negligible learning rate."""
    torch.manual_seed(0)
    model = _first()
    with torch.no_grad():
        head = model.encoder[-1]
        head.weight[[0, 2]] *= 30.0
        head.bias[[4, 6]] = -3.0
        for row in (1, 3, 5, 7):
            head.weight[row].zero_()
            head.bias[row].zero_()
    fastvae.fit(model, images, fastvae.TrainConfig(dataset="digits", latent=4, hidden=[32], lr=1e-12, max_steps=1,
                                                   out=str(run), progress=False, tensorboard=False))


def test_two_stage_command_on_active_latents(tmp_path, capsys):
    run = tmp_path / "run"
    images, _ = load_dataset("digits", split="train")
    _active_run(run, images)
    assert main(["two-stage", str(run), "--latents", "active", "--epochs", "1", "--n", "300", "--hidden", "16",
                 "--no-progress"]) == 0
    assert "active variables [0, 2]" in capsys.readouterr().out
    folder = run / two_stage.SUBDIR_ACTIVE
    assert json.loads((folder / "latents.json").read_text()) == {"variables": [0, 2]}
    second, variables = two_stage.load_active_second_stage(run)
    assert variables == [0, 2] and second.input_shape == (2,) and second.latent_dim == 2
    report = json.loads((folder / "report.json").read_text())
    assert set(report["settings"]) == {name for name, _, _ in two_stage.ACTIVE_SETTINGS}
    assert report["variables"] == [0, 2]
    target = report["aggregate_posterior"]["var"]
    per_dim = report["settings"]["active second-stage + per_dim"]["latent_var"]
    assert [per_dim[0], per_dim[2]] == pytest.approx([target[0], target[2]], rel=1e-3)
    # the inactive variables are N(0, 1) noise: the variance of 300 draws of the documented generator
    fill = torch.randn(300, 4, generator=torch.Generator().manual_seed(derive_seed(0, 1)))
    assert [per_dim[1], per_dim[3]] == pytest.approx(fill.var(0, correction=0)[[1, 3]].tolist(), rel=1e-5)
    assert report["settings"]["active second-stage, zeros"]["latent_var"][1] == 0.0
    assert two_stage.load_second_stage(run) is None  # the all-latents second stage is a separate folder


def test_second_stage_initial_weights_follow_the_seed(tmp_path):
    images, _ = load_dataset("digits", split="train")
    first = _first()
    weights = []
    for k in range(2):
        torch.manual_seed(100 + k)  # a different global generator state before each call
        config = two_stage.second_stage_config(fastvae.TrainConfig(dataset="digits", latent=4), tmp_path / str(k),
                                               epochs=1, batch_size=256, progress=False, hidden=[8], max_steps=1,
                                               lr=1e-12)
        second, _, _ = two_stage.train_second_stage(first, images[:256], config, source="mean")
        weights.append(second.encoder.body[0].weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-9)


def test_second_stages_trained_through_the_api_record_their_source(tmp_path):
    """train_second_stage into RUN/two_stage(_active) writes source.json (and latents.json), so the loaders accept
    it; one whose record is missing or names another checkpoint is refused with a warning, not silently."""
    run = tmp_path / "run"
    images, _ = load_dataset("digits", split="train")
    _active_run(run, images[:256])
    first, first_config = fastvae.load(run)
    for subdir, variables in ((two_stage.SUBDIR, None), (two_stage.SUBDIR_ACTIVE, [0, 2])):
        config = two_stage.second_stage_config(first_config, run / subdir, epochs=1, batch_size=256, progress=False,
                                               hidden=[8], latent=2, max_steps=1)
        two_stage.train_second_stage(first, images[:256], config, source="mean", variables=variables)
    assert isinstance(two_stage.load_second_stage(run), SecondStageVAE)
    second, variables = two_stage.load_active_second_stage(run)
    assert variables == [0, 2] and second.input_shape == (2,)
    record = run / two_stage.SUBDIR / "source.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "0" * 64}))
    with pytest.warns(UserWarning, match="another checkpoint of the run"):
        assert two_stage.load_second_stage(run) is None
    (run / two_stage.SUBDIR_ACTIVE / "source.json").unlink()
    with pytest.warns(UserWarning, match="no source.json"):
        assert two_stage.load_active_second_stage(run) is None
    elsewhere = two_stage.second_stage_config(first_config, tmp_path / "elsewhere", epochs=1, batch_size=256,
                                              progress=False, hidden=[8], max_steps=1)
    two_stage.train_second_stage(first, images[:256], elsewhere, source="mean", run_dir=run)
    from fastvae.train.runfolder import provenance

    assert json.loads((tmp_path / "elsewhere" / "source.json").read_text()) == provenance(run)

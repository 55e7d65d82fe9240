"""Frechet distance against direct computations and known cases; the feature extractors; the commands."""
import json

import numpy as np
import pytest
import torch
from scipy import linalg

import fastvae
from fastvae import fid
from fastvae.data import load_dataset


def _direct(f1, f2):
    """The textbook formula with scipy's sqrtm and nothing else."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))


def _by_eigenvalues(m1, s1, m2, s2):
    """Tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric problem that needs no offset."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def test_identical_sets_give_zero():
    f = np.random.default_rng(0).normal(size=(400, 16))
    assert abs(fid.fid_from_features(f, f)) < 1e-8


def test_shifted_gaussians_give_the_squared_mean_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8))
    cov = a @ a.T + np.eye(8)
    mean = rng.normal(size=8)
    shift = rng.normal(size=8)
    value = fid.frechet_distance(mean, cov, mean + shift, cov)
    assert value == pytest.approx(float(shift @ shift), rel=1e-8, abs=1e-8)
    # the same with features: shifting a set moves its mean and keeps its covariance
    f = rng.normal(size=(300, 8))
    assert fid.fid_from_features(f, f + shift) == pytest.approx(float(shift @ shift), rel=1e-7)


def test_diagonal_covariances_closed_form():
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = float(((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()) + 1.0
    value = fid.frechet_distance(np.zeros(3), np.diag(var1), np.array([1.0, 0, 0]), np.diag(var2))
    assert value == pytest.approx(expected, rel=1e-10)


def test_matches_direct_scipy_computation_and_accepts_tensors():
    rng = np.random.default_rng(2)
    f1 = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))
    f2 = rng.normal(size=(400, 12)) * 1.5 + 0.3
    expected = _direct(f1, f2)
    assert fid.fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-9)
    distance = fid.fid_from_features(torch.from_numpy(f1).float(), torch.from_numpy(f2).float())
    assert distance == pytest.approx(expected, rel=1e-4)


def test_singular_covariances():
    """Dead ReLU units and fewer samples than features make both covariances singular."""
    rng = np.random.default_rng(3)
    f1 = np.maximum(rng.normal(size=(60, 128)), 0)
    f2 = np.maximum(rng.normal(size=(60, 128)) + 0.2, 0)
    f1[:, :40] = 0
    f2[:, 70:100] = 0
    value = fid.fid_from_features(f1, f2)
    m1, s1 = fid.feature_statistics(f1)
    m2, s2 = fid.feature_statistics(f2)
    assert np.linalg.matrix_rank(s1) < 128 and np.linalg.matrix_rank(s2) < 128
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(_by_eigenvalues(m1, s1, m2, s2), rel=1e-4)
    # exactly zero covariances: the distance reduces to the mean shift plus the other trace
    z = np.zeros((4, 4))
    assert fid.frechet_distance(np.zeros(4), z, np.ones(4), z) == pytest.approx(4.0)


def test_invalid_covariances_raise():
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid.feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        fid.feature_statistics(np.zeros(4))


@pytest.fixture
def one_thread():
    """The classifier's many tiny convolutions run no faster on two threads, and far slower when another
    process holds one of the two cores; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target)


def test_classifier_extractor_trains_caches_and_separates(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("FASTVAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights there
    monkeypatch.delenv("FASTVAE_INCEPTION_WEIGHTS", raising=False)
    images, labels = _digits()
    train, test = (images[:1400], labels[:1400]), (images[1400:], labels[1400:])
    net, info = fid.train_feature_classifier(*train, test=test, epochs=5, batch_size=64, log=None)
    assert info["test_accuracy"] > 0.8
    path = fid.classifier_path("digits")
    fid.save_classifier(net, {**info, "dataset": "digits"}, path)

    assert not fid.inception_available()
    extractor = fid.get_extractor("digits", "auto", train_if_missing=False, log=None)
    assert "classifier" in extractor.name and "digits" in extractor.name
    features = extractor(test[0])
    assert features.shape == (test[0].shape[0], 128) and features.dtype == torch.float64
    torch.testing.assert_close(features, net(test[0]).double())
    # flat images of the extractor's size are reshaped
    torch.testing.assert_close(extractor(test[0].flatten(1)), features)

    real_a, real_b = extractor(images[:700]), extractor(images[700:1400])
    noise = extractor(torch.rand(700, 1, 8, 8))
    blurred = extractor(torch.nn.functional.avg_pool2d(images[700:1400], 3, 1, 1))
    same = fid.fid_from_features(real_a, real_b)
    assert same < 0.2 * fid.fid_from_features(real_a, blurred)
    assert same < 0.2 * fid.fid_from_features(real_a, noise)

    with pytest.raises(RuntimeError, match="not on this machine"):
        fid.get_extractor("digits", "inception")
    with pytest.raises(FileNotFoundError, match="fid-features"):
        fid.get_extractor("other", "classifier", train_if_missing=False)
    with pytest.raises(ValueError, match="kind"):
        fid.get_extractor("digits", "vgg")
    with pytest.raises(ValueError, match="image shape"):
        extractor(torch.rand(3, 1, 9, 9))


def test_fid_commands_end_to_end(tmp_path, monkeypatch, capsys, one_thread):
    from fastvae.cli import main

    monkeypatch.setenv("FASTVAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("FASTVAE_INCEPTION_WEIGHTS", raising=False)
    assert main(["fid-features", "--dataset", "digits", "--epochs", "1"]) == 0
    assert "fastvae classifier features" in capsys.readouterr().out
    assert fid.classifier_path("digits").is_file()

    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--latent", "4",
                 "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0
    assert main(["fid", str(run), "--n", "200"]) == 0
    printed = capsys.readouterr().out
    assert "features: fastvae classifier" in printed and "fastvae two-stage" in printed
    header = next(line for line in printed.splitlines() if line.startswith("setting"))
    assert header.split()[-1] == "classifier-FID" and "not with published (Inception) FIDs" in printed
    report = json.loads((run / "fid.json").read_text())
    assert "classifier" in report["extractor"] and report["metric"] == "classifier-FID"
    assert list(report["settings"]) == ["real training images", "reconstructions (test)", "first-stage"]

    assert main(["two-stage", str(run), "--epochs", "1", "--n", "200", "--hidden", "16", "--no-progress"]) == 0
    assert main(["fid", str(run), "--n", "200", "--extractor", "classifier"]) == 0
    report = json.loads((run / "fid.json").read_text())
    rows = report["settings"]
    assert list(rows)[3:] == ["second-stage", "second-stage + per_dim", "second-stage + scalar"]
    assert all(row["n"] == 200 for row in rows.values())
    assert all(row["fid"] >= 0 for row in rows.values())
    assert rows["real training images"]["fid"] < rows["first-stage"]["fid"]

    # the first-stage number is the Frechet distance of the features of the documented draws
    model, _ = fastvae.load(run)
    extractor = fid.get_extractor("digits", "classifier", train_if_missing=False, log=None)
    test, _ = load_dataset("digits", split="test")
    with torch.no_grad():
        samples = model.decode(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)))
    assert rows["first-stage"]["fid"] == pytest.approx(fid.fid_from_features(extractor(samples), extractor(test)),
                                                       rel=1e-6)

    # a second stage of the active variables adds its settings; the zeros one checked against its direct draws
    from test_two_stage import _active_run

    active_run = tmp_path / "active"
    _active_run(active_run, load_dataset("digits", split="train")[0])
    assert main(["two-stage", str(active_run), "--latents", "active", "--epochs", "1", "--n", "200", "--hidden", "16",
                 "--no-progress"]) == 0
    assert main(["fid", str(active_run), "--n", "200", "--extractor", "classifier"]) == 0
    report = json.loads((active_run / "fid.json").read_text())
    assert report["active_variables"] == [0, 2]
    assert list(report["settings"])[3:] == [name for name, _, _ in fastvae.two_stage.ACTIVE_SETTINGS]
    first, _ = fastvae.load(active_run)
    second, variables = fastvae.two_stage.load_active_second_stage(active_run)
    z = fastvae.two_stage.generate_active_latents(second, variables, 200, 4, seed=0, fill="zeros")
    with torch.no_grad():
        zeros = first.decode(z)
    assert report["settings"]["active second-stage, zeros"]["fid"] == pytest.approx(
        fid.fid_from_features(extractor(zeros), extractor(test)), rel=1e-6)

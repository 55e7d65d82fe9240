"""The examples run at a tiny size: the diffusers autoencoder script, the Lightning module and the pythae model."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

import fastvae
from fastvae import reference

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_autoencoder_kl(monkeypatch, tmp_path, capsys):
    from diffusers.models.autoencoders import autoencoder_kl

    # the example swaps diffusers' posterior class on import; restore it after the test
    monkeypatch.setattr(autoencoder_kl, "DiagonalGaussianDistribution", autoencoder_kl.DiagonalGaussianDistribution)
    example = _load("train_autoencoder_kl")
    assert autoencoder_kl.DiagonalGaussianDistribution is fastvae.DiagonalGaussian
    metrics = example.main(["--tiny", "--steps", "3", "--batch-size", "2", "--out", str(tmp_path / "vae")])
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 < metrics["running_loss"] < 1.0  # the balanced loss updated its running L1 from 1.0
    assert (tmp_path / "vae" / "config.json").is_file()
    assert "running L1" in capsys.readouterr().out


def test_lightning_module():
    example = _load("lightning_vae")
    metrics = example.main(["--steps", "4", "--count", "64", "--batch-size", "16"])
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["gamma"] < 1.0  # BalancedMSE's running estimate moved


def test_pythae_model_matches_pythae_vae_with_the_same_noise(monkeypatch):
    from pythae.models import VAE, VAEConfig

    example = _load("pythae_vae")
    torch.manual_seed(0)
    model = example.FastVAE(VAEConfig(input_dim=(1, 8, 8), latent_dim=4))
    x = torch.rand(6, 1, 8, 8)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64))  # what reparameterize_kl draws for seed=None
    torch.manual_seed(5)
    ours = model({"data": x})

    def sample_gauss(mu, std):
        eps = reference.philox_randn(seed, mu.shape).to(mu.dtype)
        return mu + eps * std, eps

    monkeypatch.setattr(model, "_sample_gauss", sample_gauss)
    theirs = VAE.forward(model, {"data": x})
    for name in ("loss", "recon_loss", "reg_loss", "z", "recon_x"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_pythae_training_pipeline():
    example = _load("pythae_vae")
    metrics = example.main(["--epochs", "1", "--count", "64", "--balanced"])
    assert all(math.isfinite(v) for v in metrics.values())


def test_posterior_cost():
    """docs/ops.md's table: fastvae's posterior saves the seed beyond the encoder output (on the CPU engine also the
    float32 noise, which the GPU kernels recompute instead) and runs fewer ops."""
    rows = {r["posterior"]: r for r in _load("posterior_cost").main(["--shape", "2", "8", "4", "4"])}
    diffusers, separate, fused = rows["diffusers"], rows["fastvae sample()+kl()"], rows["fastvae sample_kl()"]
    assert diffusers["saved_bytes"] == 3 * 2 * 4 * 4 * 4 * 4  # std, var and the noise, fp32, half of (2, 8, 4, 4) each
    noise = 2 * 4 * 4 * 4 * 4  # float32, half of (2, 8, 4, 4): what the CPU engine keeps for its backward
    assert separate["saved_bytes"] == fused["saved_bytes"] == 8 + noise  # the int64 seed and the noise
    assert fused["ops"].count("fastvae::reparameterize_kl") == 1
    assert fused["ops"].count("fastvae::reparameterize_kl_backward") == 1
    assert fused["forward_ops"] < separate["forward_ops"] < diffusers["forward_ops"]
    assert fused["backward_ops"] < separate["backward_ops"] < diffusers["backward_ops"]


def test_fit_dataloader(tmp_path, capsys):
    example = _load("fit_dataloader")
    metrics = example.main(["--epochs", "2", "--out", str(tmp_path / "run")])
    assert all(math.isfinite(v) for v in metrics.values())
    state = fastvae.run.load_checkpoint(tmp_path / "run")
    assert "ema" in state and state["step"] == 2 * math.ceil(math.ceil(1500 / 64) / 2)
    assert "EMA model: DenseVAE" in capsys.readouterr().out


def test_readme_is_a_quick_start_with_the_internals_linked():
    """README opens with a quick start of at most ~40 lines (install, train, sample, load, the ops, diffusers'
    posterior), explains the loss value, and links the docs pages that hold the internals."""
    import re

    readme = (EXAMPLES.parent / "README.md").read_text()
    lines = readme.splitlines()
    start = lines.index("## Quick start")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    assert start < 8 and end - start <= 40
    quick = "\n".join(lines[start:end])
    for needed in ("pip install", "fastvae train", "fastvae sample", "fastvae.load(", "fastvae.reparameterize_kl(",
                   "fastvae.fit(", "DiagonalGaussianDistribution = fastvae.DiagonalGaussian"):
        assert needed in quick, needed
    assert "## What the loss value means" in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (EXAMPLES.parent / link).is_file(), link
    for page in ("training", "ops", "performance", "layout", "science"):
        assert f"](docs/{page}.md)" in readme, page
    for internal in ("Philox", "PTX", "<!-- bench:", "registers"):
        assert internal not in quick and internal not in readme.split("## More")[0], internal

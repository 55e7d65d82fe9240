"""Per-channel latent statistics and the scaling factor, streamed batch by batch: the function against torch
over the whole set, on both backends and in every dtype, and ``fastvae latent-stats`` on a tiny diffusers
AutoencoderKL saved to a temporary folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fastvae
from fastvae.backend import use_backend
from fastvae.cli import main
from fastvae.latent_stats import LatentMoments, diffusers_encoder, latent_channel_stats
from helpers import DTYPES

RTOL_STATS = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_streamed_stats_equal_those_of_the_whole_set(backend, dtype):
    scale = torch.tensor([0.5, 2.0, 5.0]).view(1, 3, 1, 1)
    batches = [(torch.randn(n, 3, 4, 5) * scale + 3.0).to(dtype) for n in (2, 5, 1)]
    batches[1] = batches[1].contiguous(memory_format=torch.channels_last)
    with use_backend(backend):
        stats = latent_channel_stats(lambda z: z, batches)
    everything = torch.cat([b.double() for b in batches])
    rtol = RTOL_STATS[dtype]
    torch.testing.assert_close(stats.mean, everything.mean(dim=(0, 2, 3)), rtol=rtol, atol=rtol)
    torch.testing.assert_close(stats.std, everything.std(dim=(0, 2, 3)), rtol=rtol, atol=rtol)
    assert stats.global_std == pytest.approx(float(everything.flatten().std()), rel=rtol)
    assert stats.scaling_factor == pytest.approx(1 / float(everything.flatten().std()), rel=rtol)
    assert stats.shift_factor == pytest.approx(float(everything.mean()), rel=rtol, abs=rtol)
    assert stats.num_latents == 8 and stats.count == 8 * 20


def test_one_batch_gives_ldm_scale_factor():
    """LDM: ``scale_factor = 1 / z.flatten().std()`` of the first batch's posterior samples."""
    z = torch.randn(4, 4, 8, 8, dtype=torch.float64) * 1.7 + 0.2
    stats = latent_channel_stats(lambda t: t, [z])
    assert stats.scaling_factor == pytest.approx(1.0 / float(z.flatten().std()), rel=1e-12)


def test_video_latents_and_population_correction():
    z = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    stats = latent_channel_stats(lambda t: t, [z[:1], z[1:]], correction=0)
    torch.testing.assert_close(stats.std, z.std(dim=(0, 2, 3, 4), correction=0))


def test_bad_batches():
    with pytest.raises(ValueError, match="no latents"):
        latent_channel_stats(lambda t: t, [])
    acc = LatentMoments()
    acc.update(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="3 channels"):
        acc.update(torch.randn(2, 4, 4))


import diffusers  # noqa: E402  (in the test extras)


def _tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8,
    ).eval()


def test_diffusers_encoder_mode_and_sample():
    vae = _tiny_vae()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        mode = vae.encode(x).latent_dist.mode()
    stats = latent_channel_stats(diffusers_encoder(vae, "mode"), [x[:2], x[2:]])
    torch.testing.assert_close(stats.mean, mode.double().mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    sampled = latent_channel_stats(diffusers_encoder(vae, "sample", torch.Generator().manual_seed(0)), [x])
    again = latent_channel_stats(diffusers_encoder(vae, "sample", torch.Generator().manual_seed(0)), [x])
    torch.testing.assert_close(sampled.std, again.std, rtol=0, atol=0)
    with pytest.raises(ValueError, match="posterior"):
        diffusers_encoder(vae, "mean")


def test_cli_on_a_saved_autoencoder_kl(tmp_path, capsys):
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    images = (np.random.default_rng(0).random((5, 8, 8, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "stats.json"
    code = main(["latent-stats", str(tmp_path / "vae"), "--data", str(tmp_path / "images.npy"), "--batch-size", "2",
                 "--posterior", "mode", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "scaling_factor" in printed and "AutoencoderKL" in printed
    report = json.loads(out.read_text())
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode().double()
    assert report["num_latents"] == 5 and report["channels"] == 4
    assert report["scaling_factor"] == pytest.approx(1 / float(z.flatten().std()), rel=1e-5)
    assert report["mean"] == pytest.approx(z.mean(dim=(0, 2, 3)).tolist(), rel=1e-4, abs=1e-6)


def test_cli_errors_are_one_line(tmp_path, capsys):
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    np.save(tmp_path / "rgba.npy", np.zeros((2, 8, 8, 4), dtype=np.uint8))
    for argv, message in (
        (["latent-stats", str(tmp_path / "vae"), "--data", str(tmp_path / "rgba.npy")],
         "4 channels and the model expects 3"),
        (["latent-stats", str(tmp_path / "vae")], "--data is required"),
        (["latent-stats", str(tmp_path / "missing")], "is not a folder"),
        (["latent-stats", str(tmp_path / "vae"), "--data", str(tmp_path / "none.npy")], "does not exist"),
        (["latent-stats", str(tmp_path / "vae"), "--data", "x.npy", "--batch-size", "0"], "--batch-size"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_cli_on_a_fastvae_run_folder(tmp_path, capsys):
    from fastvae.data import load_dataset

    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--latent", "3",
                 "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0
    out = tmp_path / "stats.json"
    assert main(["latent-stats", str(run), "--posterior", "mode", "--batch-size", "500", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    model, _ = fastvae.load(run)
    images, _ = load_dataset("digits", split="train")
    with torch.no_grad():
        mu, _ = model.encode(images)
    assert report["channels"] == 3 and report["num_latents"] == len(images)
    assert report["mean"] == pytest.approx(mu.double().mean(dim=0).tolist(), rel=1e-4, abs=1e-6)
    assert report["std"] == pytest.approx(mu.double().std(dim=0).tolist(), rel=1e-4)

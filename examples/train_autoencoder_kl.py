"""Train a latent-diffusion autoencoder (diffusers' AutoencoderKL) with fastvae's posterior and balanced loss.

The model is diffusers' own; two lines make it fastvae's: the posterior class is swapped for
``fastvae.DiagonalGaussian`` (sample and KL in one fused pass, logvar clamped inside the op), and the
reconstruction term is taming's ``rec / exp(logvar) + logvar`` with ``exp(logvar)`` the running mean of the
L1 error (``fastvae.BalancedLoss``) instead of a learned scalar, so the KL weight keeps its meaning along training.

    python examples/train_autoencoder_kl.py --steps 200 --data images.npy      # (N, H, W, 3) uint8 images
    python examples/train_autoencoder_kl.py --tiny --steps 3                   # a smoke run on random images

Prints the loss, KL and running reconstruction loss; with ``--out`` saves the model (``save_pretrained``), whose
latents ``fastvae latent-stats OUT --data images.npy`` then measures for the scaling factor.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders import autoencoder_kl

import fastvae

autoencoder_kl.DiagonalGaussianDistribution = fastvae.DiagonalGaussian  # every AutoencoderKL.encode now returns it


def build_model(tiny: bool) -> AutoencoderKL:
    if tiny:
        return AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=16,
        )
    return AutoencoderKL(  # Stable Diffusion's layout at a quarter of its width
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
        latent_channels=4, norm_num_groups=32, sample_size=256,
    )


def load_images(path: str | None, count: int, size: int) -> torch.Tensor:
    """``(N, 3, size, size)`` in ``[-1, 1]``: an ``.npy`` of uint8 ``(N, H, W, 3)`` images, or random ones."""
    if path is None:
        return torch.rand(count, 3, size, size) * 2 - 1
    images = torch.from_numpy(np.load(path)).permute(0, 3, 1, 2).float() / 255
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return images * 2 - 1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help=".npy of uint8 (N, H, W, 3) images (default: random images)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and 16x16 images")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4.5e-6 * 8)
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="LDM's kl_weight (default: 1e-6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save_pretrained folder for the trained model")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = build_model(args.tiny)
    size = 16 if args.tiny else 256
    images = load_images(args.data, 4 * args.batch_size, size)
    balanced = fastvae.BalancedLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        batch = images[torch.randint(0, len(images), (args.batch_size,), generator=generator)]
        posterior = model.encode(batch).latent_dist
        z, kl = posterior.sample_kl(generator)          # (B, 4, h, w) and diffusers' kl(): (B,)
        rec = (model.decode(z).sample - batch).abs()    # per-element L1, as LDM's LPIPSWithDiscriminator
        loss = balanced(rec) + args.kl_weight * kl.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():10.4f}  kl {kl.mean().item():10.2f}  "
                  f"running L1 {balanced.running_loss.item():.4f}")
    if args.out:
        model.save_pretrained(args.out)
    return {"loss": loss.item(), "kl": kl.mean().item(), "running_loss": balanced.running_loss.item()}


if __name__ == "__main__":
    main()

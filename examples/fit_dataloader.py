"""Train with fastvae's loop on your own ``Dataset`` and ``DataLoader``: augmentation per sample in the dataset,
a transform per batch on the device, EMA weights and gradient accumulation.

    python examples/fit_dataloader.py --epochs 20 --out runs/digits-loader

The data here are scikit-learn's 8x8 digits as uint8 images, each flipped left-right with probability 1/2 when
read (the kind of augmentation an in-memory tensor cannot give); ``fit`` takes the ``DataLoader`` as it is (its
sampler, workers and order), and ``fastvae.load`` gives the EMA model back. Prints the test metrics.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import fastvae


class FlippedDigits(Dataset):
    """Digits as uint8 ``(1, 8, 8)`` images, flipped left-right with probability 1/2 per read (seeded per index
    and read count, so a run repeats)."""

    def __init__(self, split: str):
        from sklearn.datasets import load_digits

        images = (load_digits().images * (255 / 16)).round().astype(np.uint8)
        images = images[:1500] if split == "train" else images[1500:]
        self.images, self.reads = torch.from_numpy(images).unsqueeze(1), 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        flip = torch.rand((), generator=torch.Generator().manual_seed(self.reads)) < 0.5
        return self.images[index].flip(-1) if flip else self.images[index]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--grad-accumulation", type=int, default=2)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--out", default="runs/digits-loader")
    args = parser.parse_args(argv)

    loader = DataLoader(FlippedDigits("train"), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    test = FlippedDigits("test").images  # uint8 in memory: divided by 255 per batch on the device
    torch.manual_seed(0)
    model = fastvae.DenseVAE((1, 8, 8), latent_dim=8, hidden=(64, 32))
    config = fastvae.TrainConfig(epochs=args.epochs, grad_accumulation=args.grad_accumulation, ema=args.ema,
                                 out=args.out, overwrite=True, progress=False, tensorboard=False, log_every=5)
    result = fastvae.fit(model, loader, config, test_data=test,
                         transform=lambda x: (x + 0.01 * torch.randn_like(x)).clamp(0, 1))  # on the device
    averaged, _ = fastvae.load(result.out_dir)  # the EMA weights
    print(f"{result.step} steps; test loss {result.test_metrics['loss']:.4g}, MSE {result.test_metrics['mse']:.4g}; "
          f"EMA model: {type(averaged).__name__} from {result.out_dir}")
    return {k: result.test_metrics[k] for k in ("loss", "rec", "kl", "mse")}


if __name__ == "__main__":
    main()

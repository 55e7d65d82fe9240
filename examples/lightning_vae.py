"""A PyTorch Lightning module whose VAE runs on fastvae's fused ops.

``reparameterize_kl`` gives the sample and the KL in one pass, and ``BalancedMSE`` (a module, so its running
MSE is a buffer that Lightning checkpoints with the model) weights the reconstruction by its own running
estimate. Nothing else in the module is fastvae-specific.

    python examples/lightning_vae.py --steps 500                  # random 28x28 images unless --data
"""
from __future__ import annotations

import argparse

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastvae


class LitVAE(L.LightningModule):
    def __init__(self, input_dim: int = 784, hidden: int = 256, latent_dim: int = 16, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, input_dim), nn.Sigmoid()
        )
        self.reconstruction = fastvae.BalancedMSE()

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        z, kl = fastvae.reparameterize_kl(mu, logvar)   # one pass; only mu, logvar and the seed saved
        return self.decoder(z).view_as(x), kl

    def training_step(self, batch, batch_idx):
        (x,) = batch
        x_hat, kl = self(x)
        rec = self.reconstruction(x_hat, x)
        loss = rec + kl
        self.log_dict({"loss": loss, "kl": kl, "gamma": self.reconstruction.gamma}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help=".npy of (N, 28, 28) uint8 images (default: random)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--count", type=int, default=512, help="random images when no --data")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    if args.data:
        images = torch.from_numpy(np.load(args.data)).float().div(255).unsqueeze(1)
    else:
        images = torch.rand(args.count, 1, 28, 28)
    loader = DataLoader(TensorDataset(images), batch_size=args.batch_size, shuffle=True)
    model = LitVAE(input_dim=images[0].numel())
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()

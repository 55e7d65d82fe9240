"""A pythae model on fastvae's ops: pythae's VAE with its sampling and KL replaced by ``reparameterize_kl`` and,
optionally, its reconstruction term by the balanced MSE.

pythae's ``VAE.forward`` computes ``std``, draws ``eps``, then the KL, as separate tensors that autograd
keeps; ``FastVAE.forward`` does the same in one fused pass and saves only ``mu``, ``logvar`` and the seed.
The loss is pythae's (``0.5 * SSE + KL`` per sample, averaged) unless ``balanced=True``. The model trains
with pythae's own ``TrainingPipeline``.

    python examples/pythae_vae.py --epochs 5                 # random 28x28 images unless --data
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from pythae.models import VAE, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig

import fastvae


class FastVAE(VAE):
    """pythae's ``VAE`` with the sampling and KL on ``fastvae.reparameterize_kl``."""

    def __init__(self, model_config: VAEConfig, encoder=None, decoder=None, balanced: bool = False):
        super().__init__(model_config, encoder=encoder, decoder=decoder)
        self.model_name = "FastVAE"
        self.balanced = fastvae.BalancedMSE() if balanced else None

    def forward(self, inputs, **kwargs):
        x = inputs["data"]
        encoder_output = self.encoder(x)
        mu, log_var = encoder_output.embedding, encoder_output.log_covariance
        z, kld = fastvae.reparameterize_kl(mu, log_var, reduction="batchmean")
        recon_x = self.decoder(z)["reconstruction"]
        if self.balanced is not None:
            recon_loss = self.balanced(recon_x.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1))
        else:
            recon_loss = 0.5 * (recon_x - x).pow(2).reshape(x.shape[0], -1).sum(dim=-1).mean()
        loss = recon_loss + kld
        return ModelOutput(recon_loss=recon_loss, reg_loss=kld, loss=loss, recon_x=recon_x, z=z)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help=".npy of (N, 28, 28) uint8 images (default: random)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--count", type=int, default=512, help="random images when no --data")
    parser.add_argument("--balanced", action="store_true", help="the balanced MSE as the reconstruction term")
    parser.add_argument("--out", default=None, help="pythae's output folder (default: a temporary one)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.data:
        images = torch.from_numpy(np.load(args.data)).float().div(255).unsqueeze(1)
    else:
        images = torch.rand(args.count, 1, 28, 28)
    split = max(1, len(images) // 8)
    model = FastVAE(VAEConfig(input_dim=tuple(images.shape[1:]), latent_dim=16), balanced=args.balanced)
    with tempfile.TemporaryDirectory() as tmp:
        config = BaseTrainerConfig(output_dir=args.out or tmp, num_epochs=args.epochs, learning_rate=1e-3,
                                   per_device_train_batch_size=64, per_device_eval_batch_size=64, no_cuda=True)
        TrainingPipeline(model=model, training_config=config)(train_data=images[split:], eval_data=images[:split])
    model.eval()
    with torch.no_grad():
        out = model({"data": images[:split]})
    metrics = {"loss": out.loss.item(), "recon_loss": out.recon_loss.item(), "kl": out.reg_loss.item()}
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()

"""fastvae: fused Triton ops and a lean training loop for variational autoencoders."""
from . import reference
from .backend import use_backend
from .ops import (
    BalancedLoss,
    BalancedMSE,
    balanced_loss,
    balanced_mse,
    kl_divergence,
    moments,
    renormalize,
    reparameterize,
    reparameterize_kl,
    variance_law,
)
from . import data, models
from .models import ConvVAE, DenseVAE, ResNetVAE, SecondStageVAE
from .run import load
from .train import TrainConfig, fit
from . import analysis, fid, two_stage
from .analysis import LatentTracker, latent_statistics
from .fid import frechet_distance
from .distributions import DiagonalGaussian
from . import latent_stats
from .latent_stats import LatentStats, latent_channel_stats

__version__ = "0.1.0"

__all__ = [
    "reparameterize_kl", "reparameterize", "kl_divergence",
    "balanced_mse", "BalancedMSE",
    "balanced_loss", "BalancedLoss", "DiagonalGaussian", "latent_stats", "LatentStats", "latent_channel_stats",
    "moments", "renormalize", "variance_law",
    "use_backend", "reference",
    "data", "models", "DenseVAE", "ConvVAE", "ResNetVAE", "SecondStageVAE", "TrainConfig", "fit", "load",
    "analysis", "two_stage", "fid", "latent_statistics", "LatentTracker", "frechet_distance",
]

"""fastvae: fused Triton ops and a lean training loop for variational autoencoders."""
from . import reference
from .backend import use_backend
from . import ops
from .ops import *  # noqa: F401,F403 - the public ops: every name of fastvae.ops.__all__
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
    *ops.__all__,
    "DiagonalGaussian", "latent_stats", "LatentStats", "latent_channel_stats",
    "use_backend", "reference",
    "data", "models", "DenseVAE", "ConvVAE", "ResNetVAE", "SecondStageVAE", "TrainConfig", "fit", "load",
    "analysis", "two_stage", "fid", "latent_statistics", "LatentTracker", "frechet_distance",
]

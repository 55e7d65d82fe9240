"""The fused ops: input checks, custom-op registration, autograd and backend dispatch. No kernel code here."""
from .balanced_loss import BalancedLoss, balanced_loss
from .balanced_mse import BalancedMSE, balanced_mse
from .moments import moments, renormalize, variance_law
from .reparameterize import kl_divergence, reparameterize, reparameterize_kl

__all__ = [
    "reparameterize_kl", "reparameterize", "kl_divergence",
    "balanced_mse", "BalancedMSE",
    "balanced_loss", "BalancedLoss",
    "moments", "renormalize", "variance_law",
]

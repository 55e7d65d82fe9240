"""The training objective of one step: ``loss = rec + kl_weight * kl_term``, with the KL term and the sampling
chosen by ``TrainConfig.kl`` and ``TrainConfig.sampling``.

For a batch of ``N`` codes ``mu, logvar`` ``(N, D)``:

- ``kl="full"``: ``kl_term = sum(mu^2 + exp(logvar) - 1 - logvar) / (2 N)``, the KL to ``N(0, I)``;
- ``kl="quadratic"``: ``kl_term = sum(mu^2) / (2 N)``, only the penalty on the means;
- ``kl="none"``: ``kl_term = 0`` (a plain autoencoder when ``sampling`` is off too).

``sampling=True`` decodes ``z = mu + exp(logvar / 2) * eps`` (``fastvae.reparameterize_kl``), ``sampling=False``
decodes ``z = mu``. The default (full, sampling) is the model's own ``forward`` (the fused op).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..losses import kl_penalty
from ..ops import kl_divergence, reparameterize_kl

__all__ = ["TrainObjective"]


class TrainObjective(nn.Module):
    """``forward(x) -> (loss, rec, kl_term, mse)`` for ``model`` and a reconstruction ``policy`` (``mse`` per
    element, detached, for the metrics). One module, so that DDP and the optimizer see the model's and the
    policy's parameters together. ``runner`` is what runs the model (``torch.compile(model)`` or ``model``)."""

    def __init__(self, model: nn.Module, policy: nn.Module, *, kl_weight: float = 1.0, kl: str = "full",
                 sampling: bool = True, compile: bool = False):
        super().__init__()
        self.model, self.policy = model, policy
        self.kl_weight, self.kl, self.sampling = float(kl_weight), kl, sampling
        # kept out of the module tree so that the compiled wrapper adds no second copy of the parameters
        self.__dict__["runner"] = torch.compile(model) if compile else model

    def forward(self, x: Tensor, seed: int | Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The step's terms for batch ``x``; ``seed`` fixes the reparameterization noise (None: a fresh draw)."""
        if self.kl == "full" and self.sampling:
            x_hat, kl = self.runner(x, seed)
        else:
            x_hat, kl = self._encode_decode(x, seed)
        rec = self.policy(x_hat, x)
        with torch.no_grad():
            mse = (x_hat.detach().float() - x.float()).square().mean()
        return rec + self.kl_weight * kl, rec, kl, mse

    def _encode_decode(self, x: Tensor, seed: int | Tensor | None) -> tuple[Tensor, Tensor]:
        mu, logvar = self.model.encode(x)
        if self.sampling:
            z, full = reparameterize_kl(mu, logvar, seed=seed, reduction="batchmean")
        else:
            z = mu
            full = kl_divergence(mu, logvar, reduction="batchmean") if self.kl == "full" else None
        kl = full if self.kl == "full" else kl_penalty(mu, logvar, self.kl)
        return self.model.decode(z), kl

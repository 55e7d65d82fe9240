"""``DiagonalGaussian``: the posterior of latent-diffusion autoencoders on fastvae's fused ops.

A drop-in for diffusers' ``DiagonalGaussianDistribution`` (and taming/CompVis's class of the same
name): the same constructor argument, attributes and methods with the same semantics, so assigning
it in place of diffusers' class trains the same model. ``sample`` and ``kl`` run ``reparameterize``
and ``kl_divergence`` with the clamp inside the op (the clamped ``logvar``, ``std`` and ``var`` are
only materialized when read), and ``sample_kl`` returns both from one pass.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .ops import kl_divergence, reparameterize, reparameterize_kl
from .ops._checks import check_logvar_clamp

_KL_DIMS = (1, 2, 3)  # diffusers sums kl() over dims [1, 2, 3] whatever the rank


def seed_from_generator(generator: Optional[torch.Generator], device: torch.device | str = "cpu") -> Optional[Tensor]:
    """The Philox seed that ``DiagonalGaussian.sample(generator)`` uses: one int64 in ``[0, 2**62)`` drawn
    from ``generator`` (advancing it), as a ``(1,)`` tensor on ``device``; None for no generator (the op
    then draws from torch's default generator). The same generator state gives the same seed."""
    if generator is None:
        return None
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device, dtype=torch.int64)
    return seed.to(device)


class DiagonalGaussian:
    r"""The diagonal Gaussian ``N(mean, exp(logvar))`` of a latent-diffusion encoder's output.

    ``mean, logvar = parameters.chunk(2, dim=dim)``, ``logvar`` clamped to ``logvar_clamp`` (diffusers:
    ``[-30, 20]``). With ``deterministic=True`` the distribution is a point mass: ``std`` and ``var`` are
    zeros, ``sample()`` returns the mean, ``kl()`` and ``nll()`` return ``tensor([0.])``.

    Attributes: ``parameters``, ``mean``, ``logvar`` (clamped), ``std = exp(logvar / 2)``,
    ``var = exp(logvar)``, ``deterministic`` (those derived from ``logvar`` are computed when first read).

    Args:
        parameters: ``(B, 2C, *spatial)`` encoder output (``(B, 2C, H, W)`` or ``(B, 2C, T, H, W)``), any
            memory layout; float16, bfloat16, float32 or float64.
        dim: the dim that holds ``[mean, logvar]`` (1 for diffusers' and taming's models).
        deterministic: a point mass at the mean (diffusers' ``deterministic``).
        logvar_clamp: ``(lo, hi)`` or None.

    Example::

        >>> import diffusers.models.autoencoders.autoencoder_kl as akl
        >>> akl.DiagonalGaussianDistribution = fastvae.DiagonalGaussian    # every AutoencoderKL now uses it
        >>> posterior = vae.encode(x).latent_dist
        >>> z, kl = posterior.sample_kl()                                  # one pass: (B, C, H, W), (B,)
    """

    def __init__(
        self, parameters: Tensor, dim: int = 1, *, deterministic: bool = False,
        logvar_clamp: Optional[tuple[float, float]] = (-30.0, 20.0),
    ):
        if not isinstance(parameters, Tensor):
            raise TypeError(f"DiagonalGaussian: parameters must be a torch.Tensor, got {type(parameters).__name__}")
        if parameters.dim() < 2 or parameters.shape[dim] % 2:
            raise ValueError(
                f"DiagonalGaussian: parameters must hold [mean, logvar] along dim {dim} (an even size), "
                f"got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.dim = dim
        self.deterministic = deterministic
        self.logvar_clamp = check_logvar_clamp("DiagonalGaussian", logvar_clamp)
        self.mean, self.raw_logvar = torch.chunk(parameters, 2, dim=dim)

    # ---------------------------------------------------------------------------- attributes
    @functools.cached_property
    def logvar(self) -> Tensor:
        if self.logvar_clamp is None:
            return self.raw_logvar
        return torch.clamp(self.raw_logvar, *self.logvar_clamp)

    @functools.cached_property
    def std(self) -> Tensor:
        if self.deterministic:
            return torch.zeros_like(self.mean, device=self.parameters.device, dtype=self.parameters.dtype)
        return torch.exp(0.5 * self.logvar)

    @functools.cached_property
    def var(self) -> Tensor:
        if self.deterministic:
            return torch.zeros_like(self.mean, device=self.parameters.device, dtype=self.parameters.dtype)
        return torch.exp(self.logvar)

    # ------------------------------------------------------------------------------- methods
    def _event_dims(self) -> int:
        return self.mean.dim() - 1

    def _zero(self) -> Tensor:
        # diffusers returns torch.Tensor([0.0]); here on the parameters' device
        return torch.zeros(1, device=self.parameters.device)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """``mean + std * eps``, ``eps`` from the fused op's Philox stream with a seed drawn from ``generator``
        (torch's default generator for the device when None); shape and dtype of ``mean``."""
        if self.deterministic:
            return self.mean + self.std * 0.0
        seed = seed_from_generator(generator, self.parameters.device)
        return reparameterize(
            self.mean, self.raw_logvar, seed=seed, event_dims=self._event_dims(), logvar_clamp=self.logvar_clamp
        )

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> Tensor:
        """``KL(self || N(0, I))`` (or ``|| other``) summed over dims 1, 2, 3: ``(B,)`` for 4-D latents."""
        if self.deterministic:
            return self._zero()
        if other is not None:
            return 0.5 * torch.sum(
                torch.pow(self.mean - other.mean, 2) / other.var + self.var / other.var
                - 1.0 - self.logvar + other.logvar,
                dim=list(_KL_DIMS),
            )
        if self.mean.dim() == 4:
            return kl_divergence(
                self.mean, self.raw_logvar, reduction="per_sample", event_dims=3, logvar_clamp=self.logvar_clamp
            ).to(self.mean.dtype)
        kl = kl_divergence(self.mean, self.raw_logvar, reduction="none", logvar_clamp=self.logvar_clamp)
        return kl.sum(dim=list(_KL_DIMS))

    def sample_kl(self, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """``(self.sample(generator), self.kl())`` from one fused pass (the same seed, the same values)."""
        if self.deterministic:
            return self.sample(generator), self._zero()
        seed = seed_from_generator(generator, self.parameters.device)
        if self.mean.dim() == 4:
            z, kl = reparameterize_kl(
                self.mean, self.raw_logvar, seed=seed, reduction="per_sample", event_dims=3,
                logvar_clamp=self.logvar_clamp,
            )
            return z, kl.to(self.mean.dtype)
        z, kl = reparameterize_kl(
            self.mean, self.raw_logvar, seed=seed, reduction="none", logvar_clamp=self.logvar_clamp
        )
        return z, kl.sum(dim=list(_KL_DIMS))

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """``0.5 * sum(log(2 pi) + logvar + (sample - mean)^2 / var)`` over ``dims``."""
        if self.deterministic:
            return self._zero()
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=list(dims)
        )

    def mode(self) -> Tensor:
        return self.mean

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
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .ops import kl_divergence, reparameterize, reparameterize_kl
from .ops._checks import check_logvar_clamp
from .ops.reparameterize import seed_from_generator

__all__ = ["DiagonalGaussian", "seed_from_generator"]

_KL_DIMS = (1, 2, 3)  # diffusers sums kl() over dims [1, 2, 3] whatever the rank
Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


class DiagonalGaussian:
    r"""The diagonal Gaussian ``N(mean, exp(logvar))`` of a latent-diffusion encoder's output.

    ``mean, logvar = parameters.chunk(2, dim=dim)``, ``logvar`` clamped to ``logvar_clamp`` (diffusers:
    ``[-30, 20]``). With ``deterministic=True`` the distribution is a point mass: ``std`` and ``var`` are
    zeros, ``sample()`` returns the mean, ``kl()`` and ``nll()`` return ``tensor([0.])``. The positional
    signature is diffusers' ``(parameters, deterministic=False)``; an empty batch gives empty outputs.

    Attributes: ``parameters``, ``mean``, ``logvar`` (clamped), ``std = exp(logvar / 2)``,
    ``var = exp(logvar)``, ``deterministic`` (those derived from ``logvar`` are computed when first read).

    Args:
        parameters: ``(B, 2C, *spatial)`` encoder output (``(B, 2C, H, W)`` or ``(B, 2C, T, H, W)``), any
            memory layout; float16, bfloat16, float32 or float64.
        deterministic: a point mass at the mean (diffusers' ``deterministic``).
        dim: the dim that holds ``[mean, logvar]`` (1 for diffusers' and taming's models); keyword only.
        logvar_clamp: ``(lo, hi)`` or None.

    Example::

        >>> import diffusers.models.autoencoders.autoencoder_kl as akl
        >>> akl.DiagonalGaussianDistribution = fastvae.DiagonalGaussian    # every AutoencoderKL now uses it
        >>> posterior = vae.encode(x).latent_dist
        >>> z, kl = posterior.sample_kl()                                  # one pass: (B, C, H, W), (B,)
    """

    def __init__(
        self, parameters: Tensor, deterministic: bool = False, *, dim: int = 1,
        logvar_clamp: Optional[tuple[float, float]] = (-30.0, 20.0),
    ):
        name = "DiagonalGaussian"
        if not isinstance(parameters, Tensor):
            raise TypeError(f"{name}: parameters must be a torch.Tensor, got {type(parameters).__name__}")
        if not parameters.dtype.is_floating_point:
            raise TypeError(f"{name}: parameters must be floating (float16, bfloat16, float32 or float64), "
                            f"got {parameters.dtype}")
        if not isinstance(deterministic, bool):
            raise TypeError(f"{name}: deterministic must be True or False, got {deterministic!r} (dim is keyword-only: "
                            "DiagonalGaussian(parameters, dim=...))")
        if isinstance(dim, bool) or not isinstance(dim, int) or not -parameters.dim() <= dim < parameters.dim():
            raise ValueError(f"{name}: dim must be an int in [{-parameters.dim()}, {parameters.dim() - 1}] for "
                             f"parameters of shape {tuple(parameters.shape)}, got {dim!r}")
        if parameters.dim() < 2 or parameters.shape[dim] % 2:
            raise ValueError(
                f"{name}: parameters must hold [mean, logvar] along dim {dim} (an even size), "
                f"got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.dim = dim
        self.deterministic = deterministic
        self.logvar_clamp = check_logvar_clamp(name, logvar_clamp)
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

    def _check_kl_dims(self, method: str) -> None:
        if self.mean.dim() < 4:
            raise ValueError(
                f"DiagonalGaussian.{method}: sums over dims 1, 2, 3 as diffusers' does, so it needs parameters of "
                f"4 or more dims, got shape {tuple(self.parameters.shape)}; for (N, 2D) parameters use "
                "fastvae.kl_divergence(mean, logvar, reduction='per_sample')")

    def _generators(self, generator: Generators) -> Optional[list[torch.Generator]]:
        """``None`` for a single generator (or none); a list of one generator per batch item otherwise."""
        if generator is None or isinstance(generator, torch.Generator):
            return None
        generators = list(generator)
        if not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError("DiagonalGaussian.sample: generator must be a torch.Generator or a list of them, got "
                            f"[{', '.join(type(g).__name__ for g in generators)}]")
        if len(generators) != self.mean.shape[0] and len(generators) != 1:
            raise ValueError(f"DiagonalGaussian.sample: {len(generators)} generators for a batch of "
                             f"{self.mean.shape[0]}; pass one per batch item (or one for all)")
        return generators

    def sample(self, generator: Generators = None) -> Tensor:
        """``mean + std * eps``, ``eps`` from the fused op's Philox stream with a seed drawn from ``generator``
        (torch's default generator for the device when None); shape and dtype of ``mean``. A list of generators
        (diffusers' ``randn_tensor`` convention) gives item ``i`` the sample that ``generator[i]`` alone gives
        it: ``sample([g0, g1])[i] == DiagonalGaussian(parameters[i:i + 1]).sample(g_i)``."""
        generators = self._generators(generator)
        if self.deterministic or self.mean.numel() == 0:
            return self.mean + self.std * 0.0
        if generators is not None and len(generators) == 1:
            generator, generators = generators[0], None
        if generators is not None:
            return torch.cat([self._sample_rows(slice(i, i + 1), g) for i, g in enumerate(generators)])
        return self._sample_rows(slice(None), generator)

    def _sample_rows(self, rows: slice, generator: Optional[torch.Generator]) -> Tensor:
        return reparameterize(self.mean[rows], self.raw_logvar[rows], event_dims=self._event_dims(),
                              logvar_clamp=self.logvar_clamp, generator=generator)

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> Tensor:
        """``KL(self || N(0, I))`` (or ``|| other``) summed over dims 1, 2, 3: ``(B,)`` for 4-D latents."""
        if self.deterministic:
            return self._zero()
        self._check_kl_dims("kl")
        if other is not None or self.mean.numel() == 0:
            other_mean, other_var, other_logvar = ((other.mean, other.var, other.logvar) if other is not None
                                                   else (0.0, 1.0, 0.0))
            return 0.5 * torch.sum(
                torch.pow(self.mean - other_mean, 2) / other_var + self.var / other_var
                - 1.0 - self.logvar + other_logvar,
                dim=list(_KL_DIMS),
            )
        if self.mean.dim() == 4:
            return kl_divergence(
                self.mean, self.raw_logvar, reduction="per_sample", event_dims=3, logvar_clamp=self.logvar_clamp
            ).to(self.mean.dtype)
        kl = kl_divergence(self.mean, self.raw_logvar, reduction="none", logvar_clamp=self.logvar_clamp)
        return kl.sum(dim=list(_KL_DIMS))

    def sample_kl(self, generator: Generators = None) -> tuple[Tensor, Tensor]:
        """``(self.sample(generator), self.kl())`` from one fused pass (the same seed, the same values); with a
        list of generators, ``sample`` and ``kl`` as two calls."""
        if self.deterministic:
            return self.sample(generator), self._zero()
        self._check_kl_dims("sample_kl")
        if self._generators(generator) is not None or self.mean.numel() == 0:
            return self.sample(generator), self.kl()
        if self.mean.dim() == 4:
            z, kl = reparameterize_kl(
                self.mean, self.raw_logvar, reduction="per_sample", event_dims=3,
                logvar_clamp=self.logvar_clamp, generator=generator,
            )
            return z, kl.to(self.mean.dtype)
        z, kl = reparameterize_kl(
            self.mean, self.raw_logvar, reduction="none", logvar_clamp=self.logvar_clamp, generator=generator
        )
        return z, kl.sum(dim=list(_KL_DIMS))

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """``0.5 * sum(log(2 pi) + logvar + (sample - mean)^2 / var)`` over ``dims``."""
        if self.deterministic:
            return self._zero()
        if any(not -self.mean.dim() <= d < self.mean.dim() for d in dims):
            raise ValueError(f"DiagonalGaussian.nll: dims {list(dims)} do not all exist in a latent of shape "
                             f"{tuple(self.mean.shape)}")
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=list(dims)
        )

    def mode(self) -> Tensor:
        return self.mean

"""Per-channel statistics and the scaling factor of a trained autoencoder's latents over a dataset.

Latent diffusion trains on ``z * scaling_factor`` (LDM's ``scale_factor = 1 / z.flatten().std()``,
diffusers' ``vae.config.scaling_factor``, and ``shift_factor`` for the autoencoders that also shift),
so a new or fine-tuned autoencoder needs these numbers, and per-channel ones to see which channels
carry the variance. ``LatentMoments`` streams them batch by batch (``fastvae.moments`` over
``dim=(0, 2, 3, ...)`` per batch, Chan's combine across batches in float64), so a dataset of any size
goes through in constant memory; ``latent_channel_stats`` runs it over an encoder and batches, and
``diffusers_encoder`` turns a diffusers ``AutoencoderKL`` into such an encoder.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from .ops import moments

POSTERIOR_MODES = ("sample", "mode")


@dataclasses.dataclass
class LatentStats:
    """Statistics of latents ``(N, C, *spatial)`` over a dataset.

    ``mean``, ``std``: per channel, ``(C,)`` float64; ``global_mean``, ``global_std``: of all latent values
    (``std`` with ``correction``, as ``torch.std``); ``scaling_factor = 1 / global_std`` (LDM's
    ``scale_factor``); ``shift_factor = global_mean``; ``count``: values per channel; ``num_latents``: N.
    """

    mean: Tensor
    std: Tensor
    global_mean: float
    global_std: float
    count: int
    num_latents: int
    correction: int

    @property
    def scaling_factor(self) -> float:
        return 1.0 / self.global_std

    @property
    def shift_factor(self) -> float:
        return self.global_mean

    def to_dict(self) -> dict:
        return {
            "channels": len(self.mean), "num_latents": self.num_latents, "values_per_channel": self.count,
            "correction": self.correction,
            "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
            "global_mean": self.global_mean, "global_std": self.global_std,
            "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
        }

    def table(self) -> str:
        lines = ["channel        mean         std"]
        lines += [f"{c:7d} {float(m):11.5f} {float(s):11.5f}" for c, (m, s) in enumerate(zip(self.mean, self.std))]
        lines.append(f"all     {self.global_mean:11.5f} {self.global_std:11.5f}")
        lines.append(f"scaling_factor {self.scaling_factor:.6g}   shift_factor {self.shift_factor:.6g}")
        return "\n".join(lines)


class LatentMoments:
    """Streaming per-channel moments of latent batches ``(B, C, *spatial)``, channel dim 1.

    Each batch gives ``(n, mean_c, M2_c)`` per channel from ``fastvae.moments(z, dim=(0, 2, ...))``; batches
    are combined with Chan's formula in float64: ``delta = mean_b - mean``, ``mean += delta n_b / n``,
    ``M2 += M2_b + delta^2 n n_b / n``. The global moments pool the channels (equal counts):
    ``mean_all = mean(mean_c)``, ``M2_all = sum(M2_c) + n sum((mean_c - mean_all)^2)``.
    """

    def __init__(self) -> None:
        self.n = 0
        self.num_latents = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.dim() < 2 or not z.dtype.is_floating_point:
            described = type(z).__name__ if not isinstance(z, Tensor) else f"{z.dtype} of shape {tuple(z.shape)}"
            raise ValueError(f"latent stats: latents must be a floating (B, C, *spatial) tensor, got {described}")
        if self.mean is not None and z.shape[1] != self.mean.numel():
            raise ValueError(f"latent stats: every batch must have {self.mean.numel()} channels, "
                             f"got shape {tuple(z.shape)}")
        dims = (0, *range(2, z.dim()))
        n_b = z.numel() // z.shape[1]
        mean_b, var_b = moments(z, dim=dims if len(dims) > 1 else 0)
        mean_b = mean_b.detach().to(device="cpu", dtype=torch.float64)
        m2_b = var_b.detach().to(device="cpu", dtype=torch.float64) * n_b
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
        else:
            n = self.n + n_b
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (n_b / n)
            self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / n)
            self.n = n
        self.num_latents += z.shape[0]

    def result(self, correction: int = 1) -> LatentStats:
        if self.mean is None:
            raise ValueError("latent stats: no latents were seen (the dataset is empty)")
        if self.n - correction <= 0:
            raise ValueError(f"latent stats: {self.n} values per channel leave no degrees of freedom "
                             f"for correction={correction}")
        channels = self.mean.numel()
        global_mean = float(self.mean.mean())
        m2_all = float(self.m2.sum()) + self.n * float(((self.mean - global_mean) ** 2).sum())
        return LatentStats(
            mean=self.mean.clone(), std=torch.sqrt(self.m2 / (self.n - correction)),
            global_mean=global_mean, global_std=math.sqrt(m2_all / (self.n * channels - correction)),
            count=self.n, num_latents=self.num_latents, correction=correction,
        )


def latent_channel_stats(
    encode: Callable[[Tensor], Tensor], batches: Iterable[Tensor], *, correction: int = 1,
    progress: Optional[Callable[[int], None]] = None,
) -> LatentStats:
    """Stream ``encode(batch)`` (latents ``(B, C, *spatial)``) over ``batches`` and return their ``LatentStats``.

    Example::

        >>> stats = fastvae.latent_channel_stats(fastvae.latent_stats.diffusers_encoder(vae), loader)
        >>> vae.register_to_config(scaling_factor=stats.scaling_factor)
    """
    acc = LatentMoments()
    with torch.no_grad():
        for batch in batches:
            acc.update(encode(batch))
            if progress is not None:
                progress(acc.num_latents)
    return acc.result(correction)


def diffusers_encoder(
    vae, posterior: str = "sample", generator: Optional[torch.Generator] = None
) -> Callable[[Tensor], Tensor]:
    """An encoder for ``latent_channel_stats`` from a diffusers autoencoder (``vae.encode(x).latent_dist``):
    its ``sample(generator)`` (what LDM and diffusers' training scripts scale) or its ``mode()``."""
    if posterior not in POSTERIOR_MODES:
        raise ValueError(f"latent stats: posterior must be one of {POSTERIOR_MODES}, got {posterior!r}")
    parameter = next(vae.parameters())

    def encode(x: Tensor) -> Tensor:
        dist = vae.encode(x.to(device=parameter.device, dtype=parameter.dtype)).latent_dist
        return dist.sample(generator=generator) if posterior == "sample" else dist.mode()

    return encode

"""The VAE models: ``DenseVAE``, ``ConvVAE``, ``ResNetVAE`` and ``SecondStageVAE``.

Every model maps data ``x`` of shape ``(N, *input_shape)`` to a Gaussian posterior and back:

- ``encode(x) -> (mu, logvar)``: the two halves of one encoder output ``h`` of shape ``(N, 2 * latent_dim)``
  (``h.chunk(2, dim=-1)``, strided views read without a copy by the fused ops);
- ``decode(z) -> x_hat``: ``(N, latent_dim)`` to ``(N, *input_shape)`` in data space. Image models end in a
  sigmoid, so ``x_hat`` lies in ``(0, 1)`` like the data (images are scaled to ``[0, 1]``, as in Asperti &
  Trentin's code); ``SecondStageVAE`` models unbounded latent vectors and has a linear output;
- ``forward(x, seed=None) -> (x_hat, kl)``: ``z, kl = fastvae.reparameterize_kl(mu, logvar, seed=seed)``
  (KL summed over the latent dim and averaged over the batch), then ``x_hat = decode(z)``;
- ``sample(n, generator=None) -> x``: ``decode(z)`` for ``z ~ N(0, I)``;
- ``latent_dim``, ``input_shape`` and ``spec`` (the name and keyword arguments that rebuild the model through
  ``build_model(**spec)``, saved in checkpoints).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .ops import reparameterize_kl

__all__ = ["VAE", "DenseVAE", "ConvVAE", "ResNetVAE", "SecondStageVAE", "MODELS", "build_model"]


def _check_positive_ints(owner: str, name: str, values: Sequence[int], *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(values, int) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{owner}: {name} must be a sequence of ints, got {values!r}")
    values = tuple(values)
    if (not values and not allow_empty) or any(v < 1 for v in values):
        raise ValueError(f"{owner}: {name} must be {'' if allow_empty else 'a non-empty sequence of '}positive ints, "
                         f"got {values!r}")
    return values


def _check_shape(owner: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    return _check_positive_ints(owner, "input_shape", input_shape)


def _check_latent(owner: str, latent_dim: int) -> int:
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"{owner}: latent_dim must be a positive int, got {latent_dim!r}")
    return latent_dim


def _image_shape(owner: str, input_shape: Sequence[int], sizes: tuple[int, ...]) -> tuple[int, int, int]:
    shape = _check_shape(owner, input_shape)
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] not in sizes:
        raise ValueError(f"{owner}: input_shape must be (C, H, W) with H = W in {sizes}, got {shape}")
    return shape  # type: ignore[return-value]


class VAE(nn.Module):
    """Base class: ``encoder`` maps ``x`` to ``(N, 2 * latent_dim)``, ``decoder`` maps ``z`` to data space."""

    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, name: str, input_shape: Sequence[int], latent_dim: int, **kwargs):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.spec = {"name": name, "input_shape": list(self.input_shape), "latent_dim": latent_dim,
                     **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)``, each ``(N, latent_dim)``: the two halves of one encoder output."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """``x_hat`` of shape ``(N, *input_shape)`` in data space."""
        return self.decoder(z)

    def forward(self, x: Tensor, seed: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x_hat, kl)``: the reconstruction of a reparameterized sample and the batch-mean KL to ``N(0, I)``."""
        mu, logvar = self.encode(x)
        z, kl = reparameterize_kl(mu, logvar, seed=seed, reduction="batchmean")
        return self.decode(z), kl

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``decode(z)`` for ``n`` draws ``z ~ N(0, I)`` (from ``generator`` when given)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sample: n must be a positive int, got {n!r}")
        param = next(self.parameters())
        device = generator.device if generator is not None else param.device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device, dtype=param.dtype)
        return self.decode(z)


# --------------------------------------------------------------------------------------------------
# Dense
# --------------------------------------------------------------------------------------------------
def _mlp(widths: Sequence[int]) -> list[nn.Module]:
    """Linear + ReLU for each pair of consecutive widths."""
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
    return layers


class DenseVAE(VAE):
    """A fully connected VAE: ``D_in - hidden... - latent`` and back, ReLU between layers, sigmoid output.

    The default is the seed architecture 784-256-64-32-16 (Asperti & Trentin's dense MNIST model):
    ``DenseVAE((1, 28, 28), latent_dim=16, hidden=(256, 64, 32))``. The decoder mirrors the encoder.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 16,
                 hidden: Sequence[int] = (256, 64, 32)):
        input_shape = _check_shape("DenseVAE", input_shape)
        latent_dim = _check_latent("DenseVAE", latent_dim)
        hidden = _check_positive_ints("DenseVAE", "hidden", hidden, allow_empty=True)
        super().__init__("dense", input_shape, latent_dim, hidden=hidden)
        d_in = math.prod(input_shape)
        widths = (d_in, *hidden)
        self.encoder = nn.Sequential(nn.Flatten(), *_mlp(widths), nn.Linear(widths[-1], 2 * latent_dim))
        back = (latent_dim, *reversed(hidden))
        self.decoder = nn.Sequential(*_mlp(back), nn.Linear(back[-1], d_in), nn.Sigmoid(), nn.Unflatten(1, input_shape))


# --------------------------------------------------------------------------------------------------
# Convolutional
# --------------------------------------------------------------------------------------------------
class ConvVAE(VAE):
    """A convolutional VAE for ``(C, 28, 28)`` and ``(C, 32, 32)`` images.

    Encoder: per entry of ``channels`` a 4x4 convolution with stride 2 and a ReLU (28 -> 14 -> 7, 32 -> 16 -> 8),
    then a dense layer of width ``hidden`` and the ``2 * latent_dim`` output. The decoder mirrors it with
    transposed convolutions and ends in a sigmoid.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 16,
                 channels: Sequence[int] = (32, 64), hidden: int = 256):
        c, h, _ = _image_shape("ConvVAE", input_shape, (28, 32))
        latent_dim = _check_latent("ConvVAE", latent_dim)
        channels = _check_positive_ints("ConvVAE", "channels", channels)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"ConvVAE: hidden must be a positive int, got {hidden!r}")
        if h % 2 ** len(channels):
            raise ValueError(f"ConvVAE: {h}x{h} images cannot be halved {len(channels)} times; "
                             "use fewer channels entries")
        super().__init__("conv", (c, h, h), latent_dim, channels=channels, hidden=hidden)
        side = h // 2 ** len(channels)
        flat = channels[-1] * side * side
        down: list[nn.Module] = []
        for a, b in zip((c, *channels[:-1]), channels):
            down += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, 2 * latent_dim))
        up: list[nn.Module] = []
        rev = tuple(reversed(channels))
        for a, b in zip(rev, (*rev[1:], c)):
            up += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        up[-1] = nn.Sigmoid()
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, flat),
                                     nn.ReLU(inplace=True), nn.Unflatten(1, (channels[-1], side, side)), *up)


# --------------------------------------------------------------------------------------------------
# Residual (Dai & Wipf 2019)
# --------------------------------------------------------------------------------------------------
class _ResBlock(nn.Module):
    """``x + conv(relu(bn(conv(relu(bn(x))))))`` with 3x3 convolutions (pre-activation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=False), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _scale_block(channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*(_ResBlock(channels) for _ in range(blocks)))


class ResNetVAE(VAE):
    """The residual VAE of Dai & Wipf (2019) for ``(C, 32, 32)`` and ``(C, 64, 64)`` colour images.

    Encoder: a 3x3 convolution to ``channels[0]``; per scale, ``blocks_per_scale`` residual blocks (the scale
    block) and a stride-2 3x3 convolution to the next width (32 -> 16 -> 8 -> 4 with three widths); then the
    dense bottleneck: flatten, a dense layer of width ``hidden`` and the ``2 * latent_dim`` output. The decoder
    mirrors it: dense layers to the smallest feature map, per scale a stride-2 transposed convolution and a
    scale block, and a 3x3 convolution to ``C`` channels with a sigmoid.
    """

    def __init__(self, input_shape: Sequence[int] = (3, 64, 64), latent_dim: int = 64,
                 channels: Sequence[int] = (64, 128, 256, 512), blocks_per_scale: int = 2, hidden: int = 512):
        c, h, _ = _image_shape("ResNetVAE", input_shape, (32, 64))
        latent_dim = _check_latent("ResNetVAE", latent_dim)
        channels = _check_positive_ints("ResNetVAE", "channels", channels)
        for name, value in (("blocks_per_scale", blocks_per_scale), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ResNetVAE: {name} must be a positive int, got {value!r}")
        downs = len(channels) - 1
        if h % 2 ** downs or h // 2 ** downs < 2:
            raise ValueError(f"ResNetVAE: {h}x{h} images cannot be halved {downs} times; use fewer channels entries")
        super().__init__("resnet", (c, h, h), latent_dim, channels=channels, blocks_per_scale=blocks_per_scale,
                         hidden=hidden)
        side = h // 2 ** downs
        flat = channels[-1] * side * side
        enc: list[nn.Module] = [nn.Conv2d(c, channels[0], 3, padding=1)]
        for a, b in zip(channels[:-1], channels[1:]):
            enc += [_scale_block(a, blocks_per_scale), nn.Conv2d(a, b, 3, stride=2, padding=1)]
        enc += [_scale_block(channels[-1], blocks_per_scale), nn.BatchNorm2d(channels[-1]), nn.ReLU(inplace=True),
                nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2 * latent_dim)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Linear(latent_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, flat),
                                nn.Unflatten(1, (channels[-1], side, side))]
        rev = tuple(reversed(channels))
        for a, b in zip(rev[:-1], rev[1:]):
            dec += [_scale_block(a, blocks_per_scale), nn.ConvTranspose2d(a, b, 4, stride=2, padding=1)]
        dec += [_scale_block(channels[0], blocks_per_scale), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True),
                nn.Conv2d(channels[0], c, 3, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)


# --------------------------------------------------------------------------------------------------
# Second stage (two-stage VAE)
# --------------------------------------------------------------------------------------------------
class _SkipMLP(nn.Module):
    """``linear(cat(x, mlp(x)))``: hidden ReLU layers with the input concatenated to their output."""

    def __init__(self, d_in: int, hidden: Sequence[int], d_out: int):
        super().__init__()
        self.body = nn.Sequential(*_mlp((d_in, *hidden)))
        self.out = nn.Linear(d_in + (hidden[-1] if hidden else d_in), d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.cat((x, self.body(x)), dim=-1))


class SecondStageVAE(VAE):
    """The second-stage VAE of the two-stage papers (Dai & Wipf 2019): a dense VAE on latent vectors
    ``(N, D)`` whose encoder and decoder concatenate their input to the last hidden output before the final
    linear layer. Linear output (latent vectors are unbounded); default 16-256-256-16.
    """

    def __init__(self, input_shape: Sequence[int] = (16,), latent_dim: int = 16, hidden: Sequence[int] = (256, 256)):
        input_shape = _check_shape("SecondStageVAE", input_shape)
        if len(input_shape) != 1:
            raise ValueError(f"SecondStageVAE: input_shape must be (D,) for latent vectors, got {input_shape}")
        latent_dim = _check_latent("SecondStageVAE", latent_dim)
        hidden = _check_positive_ints("SecondStageVAE", "hidden", hidden)
        super().__init__("second-stage", input_shape, latent_dim, hidden=hidden)
        self.encoder = _SkipMLP(input_shape[0], hidden, 2 * latent_dim)
        self.decoder = _SkipMLP(latent_dim, hidden, input_shape[0])


MODELS = {"dense": DenseVAE, "conv": ConvVAE, "resnet": ResNetVAE, "second-stage": SecondStageVAE}


def build_model(name: str, input_shape: Sequence[int], latent_dim: int = 16, **kwargs) -> VAE:
    """The model called ``name`` (one of ``MODELS``) for inputs of ``input_shape``; ``kwargs`` go to its
    constructor (``hidden``, ``channels``, ...). ``build_model(**model.spec)`` rebuilds ``model``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    cls = MODELS[name]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return cls(tuple(input_shape), latent_dim, **kwargs)
    except TypeError as error:
        if "unexpected keyword" in str(error):
            raise ValueError(f"model {name!r}: {error}") from None
        raise

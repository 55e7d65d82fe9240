"""Reparameterized sampling and the closed-form KL divergence: ``reparameterize_kl``, ``reparameterize``,
``kl_divergence``, all three on one custom op, ``fastvae::reparameterize_kl``.

The op takes an optional seed and an optional reduction and returns ``(z, kl, eps)``, an output not asked
for as an empty tensor; its backward is ``fastvae::reparameterize_kl_backward``. The noise is Philox with the
seed as a one-element int64 tensor. On the Triton kernels (the GPU) the backward recomputes it, and only
``mu``, ``logvar`` and the seed are saved for backward. On the CPU engine, when a gradient will flow
(``keep_noise``), the forward also returns the float32 noise it drew and the backward reads it: drawing the
noise costs the CPU about as much as the rest of the backward, and memory is not what a CPU run is short of;
that costs one float32 tensor of the latents' size saved (what eager PyTorch's ``randn_like`` saves too).

The custom op takes the latents in their own shape and strides with ``event_dims`` (the trailing dims of
one sample). The kernels read them in place (the halves of chunk(2, dim=1) of a contiguous or channels_last
encoder output included) and write z, the elementwise KL and the gradients in mu's memory format
(``torch.empty_like(mu)``), which the fake states too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..reference.reduce import MEAN
from . import engine
from ._checks import (
    REDUCTIONS, check_choice, check_event_dims, check_finite, check_float_tensor, check_logvar_clamp, check_same_layout,
    seed_tensor,
)
from ._layout import channels_last_latents, in_format
from ._op import Op

try:
    from ..kernels import reparameterize as kernels_reparameterize
except Exception as error:  # noqa: BLE001 - no Triton, or one the kernels cannot use: the engine runs the op
    kernels_reparameterize = backend.kernels_unavailable(error)

__all__ = ["reparameterize_kl", "reparameterize", "kl_divergence"]


# ------------------------------------------------------------------------------------ declaration
def _engine(mu: Tensor, logvar: Tensor, seed: Optional[Tensor], reduction: Optional[str],
            logvar_clamp: Optional[list[float]] = None, event_dims: int = 1,
            keep_noise: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    z, kl, eps = engine.reparameterize_kl(mu, logvar, seed, reduction, logvar_clamp, event_dims,
                                          _keeps_noise(mu, seed, keep_noise))
    return _present(z, mu), _present(kl, mu), _present_noise(eps, mu)


def _keeps_noise(mu: Tensor, seed: Optional[Tensor], keep_noise: bool) -> bool:
    """Whether the engine's forward returns the noise it drew: asked for, drawn, and on the CPU."""
    return keep_noise and seed is not None and mu.is_cpu


def _present_noise(eps: Optional[Tensor], mu: Tensor) -> Tensor:
    """The noise kept for backward (float32, mu's shape; contiguous, or channels_last for channels_last latents), or
    an empty float32 tensor."""
    return eps if eps is not None else mu.new_empty(0, dtype=torch.float32)


def _kernel(mu, logvar, seed, reduction, logvar_clamp=None, event_dims=1, keep_noise=False):
    if kernels_reparameterize.reads_in_place(event_dims, mu, logvar):
        z, kl = kernels_reparameterize.forward(mu, logvar, seed, reduction, logvar_clamp, event_dims)
    else:  # strides the kernel cannot index (more than 3 sample or 2 event dims after merging): contiguous copies
        z, kl = kernels_reparameterize.forward(mu.contiguous(), logvar.contiguous(), seed, reduction, logvar_clamp,
                                               event_dims)
        z = None if z is None else in_format(z, mu)
        kl = in_format(kl, mu) if reduction == "none" else kl
    return _present(z, mu), _present(kl, mu), _present_noise(None, mu)  # the backward recomputes the noise


def _present(t: Optional[Tensor], mu: Tensor) -> Tensor:
    """An output not asked for (no seed: no ``z``; no reduction: no KL) as an empty tensor."""
    return t if t is not None else mu.new_empty(0)


def _fake(mu, logvar, seed, reduction, logvar_clamp=None, event_dims=1, keep_noise=False):
    z = torch.empty_like(mu) if seed is not None else mu.new_empty(0)
    kept = backend.decide(mu) == "torch" and _keeps_noise(mu, seed, keep_noise)
    eps = _present_noise(None, mu)
    if kept:  # the engine keeps it in channels_last memory order for channels_last latents, contiguous otherwise
        eps = (torch.empty_like(mu, dtype=torch.float32) if channels_last_latents(mu, event_dims)
               else mu.new_empty(mu.shape, dtype=torch.float32))
    if reduction is None:
        return z, mu.new_empty(0), eps
    if reduction == "none":
        return z, torch.empty_like(mu), eps
    shape = mu.shape[: mu.dim() - event_dims] if reduction == "per_sample" else ()
    return z, mu.new_empty(shape, dtype=reference.accumulation_dtype(mu.dtype)), eps


def _flowing(grad_z, grad_kl, seed, reduction):
    """The gradients that flow: none into an output that was not computed."""
    return (grad_z if seed is not None else None), (grad_kl if reduction is not None else None)


def _engine_backward(grad_z, grad_kl, grad_eps, mu, logvar, seed, eps, reduction, logvar_clamp, event_dims, keep_noise,
                     needs):
    grad_z, grad_kl = _flowing(grad_z, grad_kl, seed, reduction)
    return engine.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, seed, reduction or "none", logvar_clamp,
                                             event_dims, eps if eps is not None and eps.numel() else None)


def _kernel_backward(grad_z, grad_kl, grad_eps, mu, logvar, seed, eps, reduction, logvar_clamp, event_dims, keep_noise,
                     needs):
    grad_z, grad_kl = _flowing(grad_z, grad_kl, seed, reduction)
    reduction = reduction or "none"
    operands = [t for t in (mu, logvar, grad_z, grad_kl if reduction == "none" else None) if t is not None]
    if kernels_reparameterize.reads_in_place(event_dims, *operands):
        return kernels_reparameterize.backward(grad_z, grad_kl, mu, logvar, seed, reduction, logvar_clamp, event_dims)
    grad_z = None if grad_z is None else grad_z.contiguous()
    grad_kl = None if grad_kl is None else grad_kl.contiguous()
    grad_mu, grad_logvar = kernels_reparameterize.backward(grad_z, grad_kl, mu.contiguous(), logvar.contiguous(), seed,
                                                           reduction, logvar_clamp, event_dims)
    return in_format(grad_mu, mu), in_format(grad_logvar, mu)


def _examples(n: int, d: int, device: torch.device) -> list[tuple]:
    h = torch.randn(n, 2 * d, device=device, dtype=torch.float64)
    mu, logvar = (half.float().requires_grad_() for half in h.chunk(2, dim=-1))  # strided views
    seed = torch.tensor([7], device=device)
    lat = torch.randn(2, 3, 4, 5, device=device).requires_grad_()
    cl = torch.randn(2, 32, 2, 3, device=device).contiguous(memory_format=torch.channels_last)
    mean_cl, logvar_cl = (half.detach().requires_grad_() for half in cl.chunk(2, dim=1))  # run in memory order
    return [(mu, logvar, seed, "batchmean", [-0.7, 0.4], 1, True), (mu, logvar, seed, None, None, 1),
            (mu, logvar, None, "none", [-0.2, 0.3], 1), (lat, lat.flip(1).detach() * 0.5, seed, "per_sample", None, 3),
            (lat, lat.flip(1).detach() * 0.5, seed, "none", [-0.5, 0.5], 3, True),
            (mean_cl, logvar_cl, seed, "per_sample", [-0.5, 0.5], 3, True)]


REPARAMETERIZE_KL = Op(
    "reparameterize_kl", _engine, _fake, _engine_backward, outputs=("z", "kl", "eps"),
    saves=("mu", "logvar", "seed", "eps"), differentiable=("mu", "logvar"), non_differentiable=("eps",),
    kernel=_kernel, kernel_backward=_kernel_backward,
    examples=_examples, bench=("bench.cases.reparameterize_kl", "bench.cases.latent_posterior"),
    aot="bench.aot.reparameterize",
)


# ------------------------------------------------------------------------------------- public API
def _check_latents(op: str, mu: Tensor, logvar: Tensor, event_dims: int, logvar_clamp) -> Optional[list[float]]:
    check_float_tensor(op, "mu", mu)
    check_float_tensor(op, "logvar", logvar)
    check_same_layout(op, ("mu", "logvar"), mu, logvar)
    check_event_dims(op, event_dims, mu.dim())
    clamp = check_logvar_clamp(op, logvar_clamp)
    check_finite(op, mu=mu, logvar=logvar)
    return clamp


def reparameterize_kl(
    mu: Tensor, logvar: Tensor, *, seed: int | Tensor | None = None, reduction: str = "batchmean",
    event_dims: int = 1, logvar_clamp: tuple[float, float] | None = None, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Sample ``z ~ N(mu, exp(logvar))`` by reparameterization and compute its KL to ``N(0, I)``, in one pass.

    .. math::
        z = \mu + e^{\log\sigma^2 / 2} \epsilon, \quad \epsilon \sim N(0, 1) \\
        KL = \tfrac12 (\mu^2 + e^{\log\sigma^2} - \log\sigma^2 - 1)

    Args:
        mu, logvar: ``(*, E_1, ..., E_k)``, same shape, dtype (float16, bfloat16, float32, float64) and
            device; either may be a strided view, such as the halves of ``h.chunk(2, dim=-1)`` or of
            ``h.chunk(2, dim=1)`` for a latent-diffusion ``(B, 2C, H, W)`` encoder output.
        seed: Philox seed (int or one-element integer tensor). Element ``i`` of the flattened ``z``
            uses ``tl.randn(seed, i)``; the same seed gives the same ``z`` on every backend and for
            every memory layout. ``None`` draws a seed from ``generator``, else from torch's generator
            for the device (``torch.manual_seed`` reproduces it).
        reduction: ``none`` (KL of ``mu``'s shape and dtype), ``per_sample`` (sum over the event dims:
            shape ``mu.shape[:-event_dims]``), ``batchmean`` (total / ``prod(mu.shape[:-event_dims])``),
            ``sum``, or torch's ``mean`` (total / ``mu.numel()``, as ``F.kl_div(reduction="mean")``);
            reduced KL is float32 for half inputs.
        event_dims: the number of trailing dims that form one sample's latent (``k`` above;
            torch.distributions' ``Independent`` convention): 1 for ``(N, D)``, 3 for a ``(B, C, H, W)``
            latent, whose ``per_sample`` KL is diffusers' ``posterior.kl()``.
        logvar_clamp: ``(lo, hi)`` or None: ``logvar`` is clamped to ``[lo, hi]`` inside the op (diffusers
            uses ``(-30, 20)``), with torch.clamp's gradient (zero outside the range).
        generator: a ``torch.Generator`` the seed is drawn from (advancing it), as torch's sampling
            functions take one; the same generator state gives the same ``z``. Not with ``seed``.

    Returns:
        ``(z, kl)``: ``z`` of ``mu``'s shape, dtype and memory format (a channels_last ``mu`` gives a
        channels_last ``z``; so do the gradients), and the reduced KL.

    On the GPU (the Triton kernels) the backward recomputes ``eps`` from the seed; only ``mu``, ``logvar`` and the
    seed are saved. On the CPU engine the backward reads the float32 ``eps`` the forward drew, saved beside them
    (drawing it again would cost the CPU as much as the rest of the backward).

    Example::

        >>> h = encoder(x)                        # (N, 2 * D)
        >>> mu, logvar = h.chunk(2, dim=-1)
        >>> z, kl = fastvae.reparameterize_kl(mu, logvar)
        >>> mean, logvar = vae_encoder(x).chunk(2, dim=1)    # (B, C, H, W) each
        >>> z, kl = fastvae.reparameterize_kl(mean, logvar, event_dims=3, logvar_clamp=(-30.0, 20.0))
    """
    op = "reparameterize_kl"
    clamp = _check_latents(op, mu, logvar, event_dims, logvar_clamp)
    check_choice(op, "reduction", reduction, REDUCTIONS + (MEAN,))
    seed = _seed(op, seed, generator, mu.device)
    if reduction == MEAN:
        z, total, _ = REPARAMETERIZE_KL(mu, logvar, seed, "sum", clamp, event_dims, _grad_flows(mu, logvar))
        return z, total / mu.numel()
    z, kl, _ = REPARAMETERIZE_KL(mu, logvar, seed, reduction, clamp, event_dims, _grad_flows(mu, logvar))
    return z, kl


def reparameterize(
    mu: Tensor, logvar: Tensor, *, seed: int | Tensor | None = None, event_dims: int = 1,
    logvar_clamp: tuple[float, float] | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """``z = mu + exp(logvar / 2) * eps``: the sample of ``reparameterize_kl`` alone (same seed or generator state,
    same ``z``; ``event_dims`` only decides the layout the kernel reads, never the values)."""
    op = "reparameterize"
    clamp = _check_latents(op, mu, logvar, event_dims, logvar_clamp)
    return REPARAMETERIZE_KL(mu, logvar, _seed(op, seed, generator, mu.device), None, clamp, event_dims,
                             _grad_flows(mu, logvar))[0]


def kl_divergence(
    mu: Tensor, logvar: Tensor, *, reduction: str = "batchmean", event_dims: int = 1,
    logvar_clamp: tuple[float, float] | None = None,
) -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))``: the KL of ``reparameterize_kl`` alone, same reductions (``mean`` too),
    ``event_dims`` and ``logvar_clamp``."""
    op = "kl_divergence"
    clamp = _check_latents(op, mu, logvar, event_dims, logvar_clamp)
    check_choice(op, "reduction", reduction, REDUCTIONS + (MEAN,))
    if reduction == MEAN:
        return REPARAMETERIZE_KL(mu, logvar, None, "sum", clamp, event_dims)[1] / mu.numel()
    return REPARAMETERIZE_KL(mu, logvar, None, reduction, clamp, event_dims)[1]


def _grad_flows(mu: Tensor, logvar: Tensor) -> bool:
    """Whether autograd will record this call (so that a backward may read the noise the forward keeps)."""
    return torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad)


def seed_from_generator(generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """The Philox seed a ``generator=`` argument stands for: one int64 in ``[0, 2**62)`` drawn from ``generator``
    (advancing it) on the generator's device, as a ``(1,)`` tensor on ``device``. The same state, the same seed."""
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device, dtype=torch.int64)
    return seed.to(device)


def _seed(op: str, seed, generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is None:
        return seed_tensor(op, seed, device)
    if seed is not None:
        raise ValueError(f"{op}: pass seed or generator, not both")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
    return seed_from_generator(generator, device)

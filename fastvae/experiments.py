"""The seed's experiments on sparsity: objective variants, noise injection and the 3-D latent space's slices.

**Objective variants** (``fastvae train --kl full|quadratic|none --no-sampling``; the loop's
``fastvae.train.objective.TrainObjective`` takes its KL term from ``kl_penalty``). Per batch of ``N`` samples,
with ``mu, logvar = encode(x)`` ``(N, D)``::

    z   = mu + exp(logvar / 2) * eps      (sampling)      or   z = mu      (--no-sampling)
    KL  = sum_j 0.5 (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1) / N     (full)
        = sum_j 0.5 mu_j^2 / N                                        (quadratic: no variance term)
        = 0                                                           (none)
    loss = rec(decode(z), x) + kl_weight * KL

**Noise injection** (``noise_injection``). Starting from a trained model, train on with Gaussian noise of
standard deviation ``s`` added to one active variable ``j``'s sample, ``z_j = mu_j + sigma_j eps + s eps'``,
``s`` growing by ``increment`` each epoch, while the variables already inactive are *held* inactive (their
encoder outputs replaced by ``mu = 0, logvar = 0``, so ``z ~ N(0, 1)`` carries nothing and costs no KL; left
free, the network revives one of them to replace ``j``). After each epoch, on a fixed subset of the data
(``fastvae.analysis.latent_statistics``): the gain of ``j`` in nats, ``gain_nats = P * gain / (2 gamma^2)``
(the growth of the balanced loss's reconstruction term when ``z_j`` is set to 0, ``P`` values per sample,
``gamma^2`` the running MSE; ``gain`` is the per-element MSE increase), its KL, ``Var(mu_j)`` and
``E[sigma_j^2]``. The noise stops growing once ``gain_nats < KL_j``; then it is removed and training goes on
for ``recovery_epochs`` to see whether the variable comes back.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .analysis import _check_images, _check_model, _model_device, encode_all, latent_statistics
from .losses import KL_MODES, kl_penalty
from .ops import kl_divergence, reparameterize

__all__ = ["KL_MODES", "kl_penalty", "smallest_gain_variable", "NoiseInjectionRow",
           "noise_injection", "write_history", "read_history", "slice_latents", "HISTORY_FIELDS"]

PHASES = ("start", "noise", "recovery")
HISTORY_FIELDS = ("epoch", "phase", "noise_std", "gain", "gain_nats", "kl", "var_mu", "mean_sigma2", "mse", "gamma")


# --------------------------------------------------------------------------------------------------
# What causes sparsity: the KL term and the sampling
# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# Noise injection and its reversal
# --------------------------------------------------------------------------------------------------
def smallest_gain_variable(stats) -> int:
    """The active variable of ``stats`` (a ``LatentStatistics`` with gains) whose reconstruction gain is smallest."""
    if stats.gain is None:
        raise ValueError("smallest_gain_variable: the statistics have no reconstruction gain")
    active = [j for j in range(stats.latent_dim) if not bool(stats.inactive[j])]
    if not active:
        raise ValueError("smallest_gain_variable: the model has no active variable")
    return min(active, key=lambda j: float(stats.gain[j]))


@dataclass
class NoiseInjectionRow:
    """One epoch of ``noise_injection`` (``epoch`` 0: the starting model), for the injected variable."""

    epoch: int
    phase: str
    noise_std: float
    gain: float
    gain_nats: float
    kl: float
    var_mu: float
    mean_sigma2: float
    mse: float
    gamma: float


def _gain_nats(gain: float, per_sample: int, gamma2: float) -> float:
    """The per-element MSE increase ``gain`` as the growth of ``sum (x_hat - x)^2 / (2 gamma^2)`` per sample."""
    return per_sample * gain / (2.0 * gamma2)


def noise_injection(
    model: nn.Module,
    images: Tensor,
    *,
    variable: int,
    held: Sequence[int] = (),
    increment: float = 0.25,
    max_increments: int = 12,
    recovery_epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    gamma2: float | None = None,
    momentum: float = 0.99,
    stats_images: Tensor | None = None,
    seed: int = 0,
    on_epoch: Callable[[NoiseInjectionRow], None] | None = None,
) -> list[NoiseInjectionRow]:
    """Train ``model`` on ``images`` ``(N, ...)`` with growing noise on ``variable``, then without (module docstring).

    ``held``: variables held inactive throughout. The loss is the balanced one (``fastvae.BalancedMSE``,
    batch mean) plus the full KL of the free variables, Adam at ``lr``; ``gamma2`` starts the running MSE
    (default: the model's MSE on ``stats_images``). Statistics after each epoch come from ``stats_images``
    (default: the first 2000 images). Returns one row per epoch, the starting model first; the model is
    trained in place. ``on_epoch`` sees each row as it is made.
    """
    from .ops import BalancedMSE

    _check_model(model)
    _check_images(images)
    d = model.latent_dim
    if isinstance(variable, bool) or not isinstance(variable, int) or not 0 <= variable < d:
        raise ValueError(f"noise_injection: variable must be an int in [0, {d}), got {variable!r}")
    held = sorted({int(j) for j in held})
    if any(not 0 <= j < d for j in held) or variable in held:
        raise ValueError(f"noise_injection: held variables {held} must lie in [0, {d}) and exclude variable {variable}")
    if not increment > 0 or max_increments < 1 or recovery_epochs < 0 or batch_size < 1:
        raise ValueError("noise_injection: increment and max_increments must be positive, recovery_epochs >= 0, "
                         "batch_size positive")
    device = _model_device(model)
    stats_images = images[:2000] if stats_images is None else stats_images
    per_sample = images[0].numel()
    held_mask = torch.zeros(d, dtype=torch.bool, device=device)
    held_mask[held] = True

    policy = BalancedMSE(momentum=momentum, reduction="batchmean").to(device)
    stats = latent_statistics(model, stats_images, gain=True)
    policy.running_mse.fill_(stats.mse if gamma2 is None else gamma2)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    rows: list[NoiseInjectionRow] = []

    def record(epoch: int, phase: str, noise_std: float) -> NoiseInjectionRow:
        s = latent_statistics(_Held(model, held_mask), stats_images, gain=True)
        g2 = float(policy.running_mse)
        row = NoiseInjectionRow(epoch, phase, noise_std, float(s.gain[variable]),
                                _gain_nats(float(s.gain[variable]), per_sample, g2), float(s.kl[variable]),
                                float(s.var_mu[variable]), float(s.mean_sigma2[variable]), float(s.mse), g2)
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
        return row

    def train_epoch(noise_std: float, epoch: int) -> None:
        model.train()
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], batch_size):
            x = images[order[start:start + batch_size]].to(device)
            mu, logvar = model.encode(x)
            mu = mu.masked_fill(held_mask, 0.0)
            logvar = logvar.masked_fill(held_mask, 0.0)
            z = reparameterize(mu, logvar, seed=int(torch.randint(2**31 - 1, (1,), generator=generator)))
            if noise_std > 0:
                extra = torch.randn(x.shape[0], generator=generator).to(device) * noise_std
                z = z + torch.nn.functional.one_hot(torch.tensor(variable), d).to(z) * extra[:, None]
            loss = policy(model.decode(z), x) + kl_divergence(mu, logvar, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()

    row = record(0, "start", 0.0)
    epoch = 0
    for k in range(1, max_increments + 1):
        epoch += 1
        train_epoch(k * increment, epoch)
        row = record(epoch, "noise", k * increment)
        if row.gain_nats < row.kl:
            break
    for _ in range(recovery_epochs):
        epoch += 1
        train_epoch(0.0, epoch)
        record(epoch, "recovery", 0.0)
    return rows


class _Held(nn.Module):
    """``model`` with the variables of ``mask`` held inactive: ``encode`` returns ``mu = 0, logvar = 0`` there."""

    def __init__(self, model: nn.Module, mask: Tensor):
        super().__init__()
        self.model, self.mask = model, mask
        self.latent_dim = model.latent_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.model.encode(x)
        return mu.masked_fill(self.mask, 0.0), logvar.masked_fill(self.mask, 0.0)

    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z)


def write_history(rows: Sequence[NoiseInjectionRow], path: str | Path) -> None:
    """``rows`` as CSV with the columns ``HISTORY_FIELDS``."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def read_history(path: str | Path) -> list[NoiseInjectionRow]:
    with open(path, newline="") as handle:
        return [NoiseInjectionRow(int(r["epoch"]), r["phase"], *(float(r[k]) for k in HISTORY_FIELDS[2:]))
                for r in csv.DictReader(handle)]


# --------------------------------------------------------------------------------------------------
# The 3-D latent space
# --------------------------------------------------------------------------------------------------
def slice_latents(levels: Sequence[float] = (-2.0, -1.0, 0.0, 1.0, 2.0), *, side: int = 5,
                  extent: float = 2.0, height_dim: int = 2) -> Tensor:
    """Latents of horizontal slices of a 3-D latent space: for each level ``h`` of ``levels``, a ``side x side``
    grid over ``[-extent, extent]^2`` in the two other variables, with ``z[height_dim] = h``.

    Returns ``(len(levels), side * side, 3)`` float32; row ``r``, column ``c`` of a slice is entry ``r * side + c``
    (the first free variable runs along the columns, the second down the rows, top = largest).
    """
    if height_dim not in (0, 1, 2):
        raise ValueError(f"slice_latents: height_dim must be 0, 1 or 2, got {height_dim}")
    if side < 1 or not extent > 0:
        raise ValueError(f"slice_latents: side must be positive and extent > 0, got {side}, {extent}")
    free = [k for k in range(3) if k != height_dim]
    ticks = torch.linspace(-extent, extent, side)
    out = torch.zeros(len(levels), side * side, 3)
    for i, h in enumerate(levels):
        for r in range(side):
            for c in range(side):
                out[i, r * side + c, free[0]] = ticks[c]
                out[i, r * side + c, free[1]] = ticks[side - 1 - r]
                out[i, r * side + c, height_dim] = float(h)
    return out


def encode_means(model: nn.Module, images: Tensor) -> Tensor:
    """``mu`` of every image, ``(N, D)`` on the CPU."""
    return encode_all(model, images)[0].cpu()


def summary(rows: Sequence[NoiseInjectionRow]) -> dict:
    """What the history shows: the noise reached, the gain and KL where it stopped, and the variable's state at
    the end of recovery (active again when ``Var(mu) >= 0.05`` and ``E[sigma^2] <= 0.8``, the analysis thresholds)."""
    from .analysis import SIGMA2_MIN, VAR_MAX

    noise = [r for r in rows if r.phase == "noise"]
    last = rows[-1]
    stopped = noise[-1] if noise else rows[0]
    return {
        "start": asdict(rows[0]),
        "stopped_at": asdict(stopped),
        "gain_below_kl": bool(noise) and stopped.gain_nats < stopped.kl,
        "end": asdict(last),
        "recovery_epochs": sum(r.phase == "recovery" for r in rows),
        "inactive_when_stopped": stopped.var_mu < VAR_MAX and stopped.mean_sigma2 > SIGMA2_MIN,
        "active_at_end": not (last.var_mu < VAR_MAX and last.mean_sigma2 > SIGMA2_MIN),
        "finite": all(math.isfinite(v) for r in rows for v in (r.gain, r.kl, r.var_mu, r.mean_sigma2)),
    }


def save_summary(rows: Sequence[NoiseInjectionRow], path: str | Path, **info) -> dict:
    result = {**info, **summary(rows)}
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return result

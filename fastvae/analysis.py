"""Per-latent statistics of a trained VAE: the stationary condition, inactive variables, reconstruction gain.

For a model with ``encode(x) -> (mu, logvar)`` and ``decode(z) -> x_hat``, and data ``x`` ``(N, ...)``,
per latent variable ``j`` (``sigma^2 = exp(logvar)``, moments over the N data points):

- ``var_mu[j] = Var(mu_j)`` (population variance), ``mean_sigma2[j] = E[sigma_j^2]``;
- ``total[j] = Var(mu_j) + E[sigma_j^2]``: the stationary condition says ``total ~ 1`` for every variable,
  active or not; ``deviation[j] = |total[j] - 1|``;
- ``kl[j] = E[0.5 (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)]``;
- ``gain[j] = MSE(x, decode(mu with mu_j = 0)) - MSE(x, decode(mu))``: how much the reconstruction error
  grows when the decoder loses variable ``j`` (MSE per element, averaged over the data).

A variable is inactive when ``E[sigma_j^2] > sigma2_min`` and ``Var(mu_j) < var_max`` (defaults 0.8, 0.05).
Everything is computed in one pass over the data, in batches on the model's device; the moments of each
batch come from one fused ``fastvae.moments`` call and are merged across batches with Chan's formula.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ._util import eval_mode
from .ops import moments

SIGMA2_MIN = 0.8
VAR_MAX = 0.05
TOLERANCE = 0.1


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _check_model(model: object, name: str = "model") -> None:
    if not (callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))):
        raise TypeError(f"{name} must have encode(x) -> (mu, logvar) and decode(z) -> x_hat, "
                        f"got {type(model).__name__}")


def _check_images(images: object, name: str = "images") -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape {tuple(images.shape)}")
    return images


class _Running:
    """Per-column count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

    def __init__(self):
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        n_b = rows.shape[0]
        mean_b, var_b = moments(rows, dim=0)
        mean_b, m2_b = mean_b.double(), var_b.double() * n_b
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / n)
        self.n = n

    @property
    def var(self) -> Tensor:
        return self.m2 / self.n


@dataclass
class LatentStatistics:
    """Per-variable statistics, each a float64 ``(D,)`` tensor on the CPU; see the module docstring."""

    mean_mu: Tensor
    var_mu: Tensor
    mean_sigma2: Tensor
    kl: Tensor
    gain: Tensor | None
    mse: float | None
    count: int
    sigma2_min: float = SIGMA2_MIN
    var_max: float = VAR_MAX
    tolerance: float = TOLERANCE
    extra: dict = field(default_factory=dict)

    @property
    def latent_dim(self) -> int:
        return self.var_mu.shape[0]

    @property
    def total(self) -> Tensor:
        """``Var(mu_j) + E[sigma_j^2]``, the variance of the aggregate posterior (law of total variance)."""
        return self.var_mu + self.mean_sigma2

    @property
    def deviation(self) -> Tensor:
        return (self.total - 1.0).abs()

    @property
    def inactive(self) -> Tensor:
        """Boolean ``(D,)``: ``E[sigma^2] > sigma2_min`` and ``Var(mu) < var_max``."""
        return (self.mean_sigma2 > self.sigma2_min) & (self.var_mu < self.var_max)

    @property
    def stationary(self) -> bool:
        """Whether ``|Var(mu_j) + E[sigma_j^2] - 1| <= tolerance`` for every variable."""
        return bool((self.deviation <= self.tolerance).all())

    def with_thresholds(self, *, sigma2_min: float | None = None, var_max: float | None = None,
                        tolerance: float | None = None) -> "LatentStatistics":
        from dataclasses import replace

        return replace(self, sigma2_min=self.sigma2_min if sigma2_min is None else sigma2_min,
                       var_max=self.var_max if var_max is None else var_max,
                       tolerance=self.tolerance if tolerance is None else tolerance)

    def to_dict(self) -> dict:
        rows = []
        for j in range(self.latent_dim):
            rows.append({
                "variable": j,
                "var_mu": float(self.var_mu[j]),
                "mean_sigma2": float(self.mean_sigma2[j]),
                "sum": float(self.total[j]),
                "kl": float(self.kl[j]),
                "gain": None if self.gain is None else float(self.gain[j]),
                "active": not bool(self.inactive[j]),
            })
        return {
            "count": self.count,
            "latent_dim": self.latent_dim,
            "reconstruction_mse": self.mse,  # of decode(mu), over the gain's images
            "thresholds": {"sigma2_min": self.sigma2_min, "var_max": self.var_max},
            "inactive": [j for j in range(self.latent_dim) if bool(self.inactive[j])],
            "num_inactive": int(self.inactive.sum()),
            "max_deviation": float(self.deviation.max()),
            "stationary": {"tolerance": self.tolerance, "holds": self.stationary},
            "variables": rows,
            **self.extra,
        }

    def table(self) -> str:
        """The seed's Table 1: one line per variable, then a summary of sparsity and the stationary condition."""
        head = f"{'var':>4} {'Var(mu)':>9} {'E[s^2]':>9} {'sum':>7} {'KL':>8} {'gain':>10}  active"
        lines = [head, "-" * len(head)]
        for j in range(self.latent_dim):
            gain = "" if self.gain is None else f"{float(self.gain[j]):10.5f}"
            lines.append(
                f"{j:>4} {float(self.var_mu[j]):9.4f} {float(self.mean_sigma2[j]):9.4f} {float(self.total[j]):7.3f} "
                f"{float(self.kl[j]):8.4f} {gain:>10}  {'no' if bool(self.inactive[j]) else 'yes'}"
            )
        lines.append("")
        lines.append(f"inactive (E[s^2] > {self.sigma2_min:g} and Var(mu) < {self.var_max:g}): "
                     f"{int(self.inactive.sum())} of {self.latent_dim}")
        worst = int(self.deviation.argmax())
        lines.append(f"stationary condition |Var(mu_j) + E[s_j^2] - 1|: largest {float(self.deviation.max()):.3f} "
                     f"(variable {worst}), mean {float(self.deviation.mean()):.3f}")
        if self.stationary:
            lines.append(f"holds within {self.tolerance:g} for every variable")
        else:
            bad = int((self.deviation > self.tolerance).sum())
            lines.append(f"does not hold within {self.tolerance:g} for {bad} variable(s): "
                         "the model has not reached its stationary point (train longer)")
        return "\n".join(lines)


@torch.no_grad()
def reconstruction_errors(model: nn.Module, x: Tensor, mu: Tensor, *, chunk_rows: int = 4096) -> Tensor:
    """Summed squared reconstruction error of the batch ``x`` ``(B, ...)`` for ``decode(mu)`` and for each
    ``decode(mu with column j set to 0)``: float64 ``(D + 1,)``, entry 0 the untouched latent.

    All ``D + 1`` variants are decoded together, in chunks of at most ``chunk_rows`` rows.
    """
    b, d = mu.shape
    variants = mu.unsqueeze(0).repeat(d + 1, 1, 1)  # (D + 1, B, D)
    idx = torch.arange(d, device=mu.device)
    variants[idx + 1, :, idx] = 0.0
    flat = variants.reshape((d + 1) * b, d)
    out = []
    for start in range(0, flat.shape[0], chunk_rows):
        out.append(model.decode(flat[start:start + chunk_rows]))
    x_hat = torch.cat(out).reshape(d + 1, b, -1).double()
    target = x.reshape(1, b, -1).double()
    if x_hat.shape[-1] != target.shape[-1]:
        raise ValueError(f"decode returned {x_hat.shape[-1]} values per sample, the data have {target.shape[-1]}")
    return ((x_hat - target) ** 2).sum(dim=(1, 2))


@torch.no_grad()
def latent_statistics(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 500,
    gain: bool = True,
    gain_limit: int | None = None,
    sigma2_min: float = SIGMA2_MIN,
    var_max: float = VAR_MAX,
    tolerance: float = TOLERANCE,
) -> LatentStatistics:
    """Per-latent statistics of ``model`` over ``images`` ``(N, ...)`` (see the module docstring).

    ``gain=False`` skips the reconstruction gain (``D + 1`` decodes per batch); ``gain_limit`` computes it on the
    first ``gain_limit`` images only (the moments still use all). The model runs in eval mode on its own
    device; ``images`` may live anywhere and are moved batch by batch.
    """
    _check_model(model)
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"latent_statistics: batch_size must be positive, got {batch_size}")
    if gain_limit is not None and gain_limit < 1:
        raise ValueError(f"latent_statistics: gain_limit must be positive or None, got {gain_limit}")
    gain_count = min(images.shape[0], gain_limit or images.shape[0]) if gain else 0
    device = _model_device(model)
    running = _Running()
    squared = None
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            mu, logvar = model.encode(x)
            mu, logvar = mu.float(), logvar.float()
            running.add(torch.cat([mu, logvar.exp(), logvar], dim=1))
            if start < gain_count:
                keep = min(x.shape[0], gain_count - start)
                errors = reconstruction_errors(model, x[:keep], mu[:keep])
                squared = errors if squared is None else squared + errors
    d = running.mean.shape[0] // 3
    mean = running.mean.cpu()
    var = running.var.cpu()
    mean_mu, mean_sigma2, mean_logvar = mean[:d], mean[d:2 * d], mean[2 * d:]
    var_mu = var[:d]
    kl = 0.5 * (var_mu + mean_mu ** 2 + mean_sigma2 - mean_logvar - 1.0)
    mse = gains = None
    if gain:
        per_element = (squared / images[0].numel() / gain_count).cpu()
        mse = float(per_element[0])
        gains = per_element[1:] - per_element[0]
    return LatentStatistics(mean_mu=mean_mu, var_mu=var_mu, mean_sigma2=mean_sigma2, kl=kl, gain=gains, mse=mse,
                            count=running.n, sigma2_min=sigma2_min, var_max=var_max, tolerance=tolerance,
                            extra={"gain_count": gain_count})


@dataclass
class ZeroingCheck:
    """Samples decoded from ``z ~ N(0, I)`` with and without the inactive variables set to 0."""

    samples: Tensor
    zeroed: Tensor
    mean_abs_diff: float
    inactive: list[int]
    reference: Tensor | None = None
    reference_mean_abs_diff: float | None = None
    reference_variables: list[int] | None = None

    def to_dict(self) -> dict:
        return {"num_samples": self.samples.shape[0], "zeroed_variables": self.inactive,
                "mean_abs_diff": self.mean_abs_diff,
                "reference_zeroed_variables": self.reference_variables,
                "reference_mean_abs_diff": self.reference_mean_abs_diff}

    def summary(self) -> str:
        text = (f"zeroing the {len(self.inactive)} inactive variable(s) changes {self.samples.shape[0]} generated "
                f"samples by a mean absolute difference of {self.mean_abs_diff:.5f}")
        if self.reference_mean_abs_diff is not None:
            text += (f"\n(for scale: zeroing {len(self.reference_variables)} active variable(s) "
                     f"{self.reference_variables} changes them by {self.reference_mean_abs_diff:.5f})")
        return text


@torch.no_grad()
def zeroing_check(model: nn.Module, inactive: Tensor, *, num_samples: int = 16, seed: int = 0,
                  gain: Tensor | None = None) -> ZeroingCheck:
    """Decode ``num_samples`` latents ``z ~ N(0, I)`` as they are and with the variables where ``inactive``
    ``(D,)`` is true set to 0; report the mean absolute difference of the two decoded sets.

    For scale it also zeroes as many active variables (those of largest ``gain`` when given, else the first).
    """
    _check_model(model)
    inactive = torch.as_tensor(inactive, dtype=torch.bool).cpu()
    if inactive.dim() != 1:
        raise ValueError(f"zeroing_check: inactive must be a (D,) boolean mask, got shape {tuple(inactive.shape)}")
    if num_samples < 1:
        raise ValueError(f"zeroing_check: num_samples must be positive, got {num_samples}")
    d = inactive.shape[0]
    device = _model_device(model)
    z = torch.randn(num_samples, d, generator=torch.Generator().manual_seed(seed)).to(device)
    with eval_mode(model):
        samples = model.decode(z)
        z0 = z.clone()
        z0[:, inactive.to(device)] = 0.0
        zeroed = model.decode(z0)
        mad = float((samples - zeroed).abs().double().mean())
        active = [j for j in range(d) if not bool(inactive[j])]
        if gain is not None:
            active.sort(key=lambda j: -float(gain[j]))
        ref_vars = sorted(active[:max(1, int(inactive.sum()))]) if active else None
        reference = ref_mad = None
        if ref_vars:
            zr = z.clone()
            zr[:, ref_vars] = 0.0
            reference = model.decode(zr)
            ref_mad = float((samples - reference).abs().double().mean())
    return ZeroingCheck(samples.cpu(), zeroed.cpu(), mad, [j for j in range(d) if bool(inactive[j])],
                        None if reference is None else reference.cpu(), ref_mad, ref_vars)


@torch.no_grad()
def encode_all(model: nn.Module, images: Tensor, *, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """``(mu, logvar)`` of every image, each ``(N, D)`` float32 on the model's device."""
    _check_model(model)
    _check_images(images)
    device = _model_device(model)
    with eval_mode(model):
        parts = [model.encode(images[i:i + batch_size].to(device)) for i in range(0, images.shape[0], batch_size)]
    return torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts]).float()


class LatentTracker:
    """Training callback: every ``every`` steps, record ``Var(mu_j)`` and ``E[sigma_j^2]`` of the model on a
    fixed subset ``images`` of the data (the seed's Figure 1).

    ``history`` holds the lists ``step``, ``var_mu`` and ``mean_sigma2``. Pass it to ``fastvae.fit`` /
    ``fastvae.train.train`` as ``callbacks=[tracker]``; at each epoch end it writes ``latent_evolution.json``
    and ``latent_evolution.png`` into the run folder (``fastvae.plots.latent_evolution``). ``record(model, 0)``
    before training adds the starting point.
    """

    FILE = "latent_evolution.json"

    def __init__(self, images: Tensor, *, every: int = 100, batch_size: int = 1000):
        _check_images(images)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"LatentTracker: every must be a positive int, got {every!r}")
        self.images = images
        self.every = every
        self.batch_size = batch_size
        self.history: dict[str, list] = {"step": [], "var_mu": [], "mean_sigma2": []}

    def record(self, model: nn.Module, step: int) -> None:
        stats = latent_statistics(model, self.images, batch_size=self.batch_size, gain=False)
        self.history["step"].append(int(step))
        self.history["var_mu"].append(stats.var_mu.tolist())
        self.history["mean_sigma2"].append(stats.mean_sigma2.tolist())

    def __call__(self, *, model: nn.Module, step: int, epoch_end: bool = False, out_dir=None, **_) -> None:
        if not epoch_end and step % self.every == 0:
            self.record(model, step)
        elif epoch_end and out_dir is not None and self.history["step"]:
            self.save(Path(out_dir) / self.FILE)
            from .plots import latent_evolution

            latent_evolution(self.history, Path(out_dir) / "latent_evolution.png")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.history) + "\n")

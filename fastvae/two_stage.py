"""The two-stage VAE (Dai & Wipf 2019) with the renormalization of Asperti et al.: training and generation.

Stage one is a trained image VAE. Stage two is a ``SecondStageVAE`` trained, with the same loop and loss,
on the first stage's latent codes of the training set: fresh draws ``z ~ q(z|x)`` every epoch
(``source="sample"``) or the means ``mu`` (``source="mean"``). Generation::

    u ~ N(0, I)  ->  second.decode(u) = z  ->  renormalize(z)  ->  first.decode(z) = x

``renormalize`` is ``none``, ``per_dim`` (each dimension of the generated batch moved to the moments of the
aggregate posterior, ``E[mu_j]`` and ``Var(mu_j) + E[sigma_j^2]``, by ``fastvae.variance_law``) or ``scalar``
(the authors' code: one factor ``sqrt(mean_j target_var_j) / mean_j std_j`` for all dimensions, no shift),
computed over the whole generated batch with ``fastvae.renormalize``.

**Active latents only** (``latents="active"``): the inactive variables of the first stage carry nothing
(``Var(mu_j) ~ 0``, ``E[sigma_j^2] ~ 1``) and its decoder ignores them, so the second stage may model the
active ones alone: it is trained on the columns ``variables`` of the codes, and at generation those columns
come from it (renormalized against the active part of the aggregate posterior) while the others are filled
with prior noise ``N(0, 1)`` (``fill="noise"``, the aggregate posterior of an inactive variable) or zeros.
That second stage lives in ``RUN/two_stage_active`` with ``latents.json`` naming its variables.

The variance loss (``variance_report``): the per-dimension variance of generated latents against the
aggregate posterior's, and the per-pixel variance of generated images against the data's, for first-stage
sampling (``z ~ N(0, I)``), second-stage sampling, and second-stage sampling with each renormalization.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ._util import derive_seed, eval_mode
from .analysis import _check_images, _check_model, _model_device, encode_all
from .ops import moments, renormalize, reparameterize, variance_law
from .reference import RENORMALIZE_MODES

RENORMALIZE = ("none", *RENORMALIZE_MODES)
SOURCES = ("sample", "mean")
#: generation settings, in report order: (name, uses the second stage, renormalization)
SETTINGS = (
    ("first-stage", False, "none"),
    ("second-stage", True, "none"),
    ("second-stage + per_dim", True, "per_dim"),
    ("second-stage + scalar", True, "scalar"),
)
SUBDIR = "two_stage"
SUBDIR_ACTIVE = "two_stage_active"
LATENTS = ("all", "active")
FILLS = ("noise", "zeros")
#: settings of a second stage trained on the active variables: (name, renormalization, fill of the others)
ACTIVE_SETTINGS = (
    ("active second-stage", "none", "noise"),
    ("active second-stage + per_dim", "per_dim", "noise"),
    ("active second-stage + scalar", "scalar", "noise"),
    ("active second-stage, zeros", "none", "zeros"),
)


@dataclass
class AggregatePosterior:
    """Moments of ``q(z) = E_x q(z|x)`` over a data set: ``mean = E[mu]``, ``var = Var(mu) + E[sigma^2]``, ``(D,)``."""

    mean: Tensor
    var: Tensor

    @classmethod
    def from_latents(cls, mu: Tensor, logvar: Tensor) -> "AggregatePosterior":
        mean, var = variance_law(mu, logvar)
        return cls(mean.float(), var.float())

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "var": self.var.tolist()}


class _Resample:
    """Training callback: at each epoch end, redraw ``data = mu + sigma * eps`` in place, seeded
    ``derive_seed(seed, epoch)`` after epoch ``epoch``."""

    def __init__(self, data: Tensor, mu: Tensor, logvar: Tensor, seed: int):
        self.data, self.mu, self.logvar, self.seed = data, mu, logvar, seed
        self.draws = 1

    def __call__(self, *, epoch: int, epoch_end: bool = False, **_) -> None:
        if epoch_end:
            with torch.no_grad():
                self.data.copy_(reparameterize(self.mu, self.logvar, seed=derive_seed(self.seed, epoch)))
            self.draws += 1


def second_stage_config(first_config, out: str | Path, **overrides):
    """The ``TrainConfig`` of a second stage for a first stage trained with ``first_config``: the same loss and
    optimizer settings, model ``second-stage`` with latent dimension and hidden widths 256-256 by default."""
    from .train import TrainConfig

    base = dataclasses.asdict(first_config) if first_config is not None else {}
    keep = {k: base[k] for k in ("dataset", "data_root", "loss", "gamma_momentum", "gamma_rule", "lr", "seed",
                                 "device", "threads", "batch_size") if k in base}
    values = {**keep, "model": "second-stage", "latent": base.get("latent", 16), "hidden": [256, 256],
              "channels": None, "out": str(out), "limit": 0, "tensorboard": False, **overrides}
    return TrainConfig.from_dict({k: v for k, v in values.items() if v is not None or k in ("channels", "hidden")})


def train_second_stage(first: nn.Module, images: Tensor, config, *, source: str = "sample",
                       callbacks=None, batch_size: int = 1000, variables=None, run_dir: str | Path | None = None):
    """Encode ``images`` with ``first`` and ``fastvae.fit`` a second stage built from ``config`` (a ``TrainConfig``
    with ``model="second-stage"``) on the codes, or on their columns ``variables`` only when given.
    Returns ``(second, fit_result, aggregate_posterior)`` (the posterior over all the first stage's variables).

    The second stage's folder ``config.out`` gets ``latents.json`` (the ``variables``, when given) and, when the
    first stage is a run folder's model, ``source.json`` naming that run's checkpoint (what ``load_second_stage``
    and ``load_active_second_stage`` check): the run is ``run_dir``, or by default the parent of ``config.out``
    when that folder is ``RUN/two_stage`` or ``RUN/two_stage_active`` of a run (a folder holding a checkpoint)."""
    from .train import fit, model_from_config

    _check_model(first, "first")
    _check_images(images)
    if source not in SOURCES:
        raise ValueError(f"train_second_stage: source must be one of {SOURCES}, got {source!r}")
    if config.model != "second-stage":
        raise ValueError(f"train_second_stage: config.model must be 'second-stage', got {config.model!r}")
    run_dir = _source_run(config.out, run_dir)
    mu, logvar = encode_all(first, images, batch_size=batch_size)
    full = AggregatePosterior.from_latents(mu, logvar)
    if variables is not None:
        variables = _check_variables(variables, mu.shape[1])
        mu, logvar = mu[:, variables], logvar[:, variables]
    # the codes live on the training device, so that fit keeps this very tensor and sees every redraw
    mu, logvar = mu.detach().to(_train_device(config)), logvar.detach().to(_train_device(config))
    extra = list(callbacks or [])
    if source == "mean":
        data = mu.clone()
    else:
        data = reparameterize(mu, logvar, seed=config.seed)
        extra.insert(0, _Resample(data, mu, logvar, config.seed))
    torch.manual_seed(config.seed)  # the initial weights, as fastvae.train.train seeds the first stage's
    second = model_from_config(config, (mu.shape[1],))
    result = fit(second, data, config, callbacks=extra)
    if _is_rank_zero():
        _record_source(result.out_dir, run_dir, variables)
    return second.eval(), result, full


def _source_run(out, run_dir) -> Path | None:
    """The run folder a second stage trained into ``out`` comes from: ``run_dir`` (checked), or the parent of
    ``out`` when ``out`` is its ``two_stage`` / ``two_stage_active`` folder and the parent holds a checkpoint."""
    from .train.checkpoint import CHECKPOINT

    if run_dir is not None:
        if not (Path(run_dir) / CHECKPOINT).is_file():
            raise FileNotFoundError(f"train_second_stage: run_dir {run_dir} holds no {CHECKPOINT}")
        return Path(run_dir)
    if out is None or Path(out).name not in (SUBDIR, SUBDIR_ACTIVE):
        return None
    parent = Path(out).parent
    return parent if (parent / CHECKPOINT).is_file() else None


def _record_source(folder: Path, run_dir: Path | None, variables) -> None:
    from .train.runfolder import write_provenance

    if variables is not None:
        (folder / "latents.json").write_text(json.dumps({"variables": [int(j) for j in variables]}) + "\n")
    if run_dir is not None:
        write_provenance(folder, run_dir)


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _check_variables(variables, latent_dim: int) -> list[int]:
    variables = [int(j) for j in variables]
    if not variables or len(set(variables)) != len(variables) or not all(0 <= j < latent_dim for j in variables):
        raise ValueError(f"variables must be distinct indices in [0, {latent_dim}), at least one, got {variables}")
    return variables


def active_variables(first: nn.Module, images: Tensor, *, batch_size: int = 1000) -> list[int]:
    """The variables of ``first`` that are active over ``images`` (``fastvae.analysis`` thresholds)."""
    from .analysis import latent_statistics

    stats = latent_statistics(first, images, batch_size=batch_size, gain=False)
    return [j for j in range(stats.latent_dim) if not bool(stats.inactive[j])]


@torch.no_grad()
def generate_active_latents(second: nn.Module, variables, n: int, latent_dim: int, *, seed: int = 0,
                            mode: str = "none", target: AggregatePosterior | None = None, fill: str = "noise",
                            device=None) -> Tensor:
    """``n`` first-stage latents ``(n, latent_dim)``: columns ``variables`` from the second stage (as
    ``generate_latents``, renormalized by ``mode`` against ``target`` restricted to them), the others
    ``N(0, 1)`` draws (``fill="noise"``, seeded ``derive_seed(seed, 1)``) or zeros."""
    if fill not in FILLS:
        raise ValueError(f"generate_active_latents: fill must be one of {FILLS}, got {fill!r}")
    variables = _check_variables(variables, latent_dim)
    if second.input_shape != (len(variables),):
        raise ValueError(f"generate_active_latents: the second stage models {second.input_shape} values, "
                         f"not the {len(variables)} variables {variables}")
    sub = None if target is None else AggregatePosterior(target.mean[variables], target.var[variables])
    part = generate_latents(second, n, len(variables), seed=seed, mode=mode, target=sub)
    if fill == "noise":
        z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(derive_seed(seed, 1)))
    else:
        z = torch.zeros(n, latent_dim)
    z = z.to(part.device, part.dtype)
    z[:, variables] = part
    return z.to(device) if device is not None else z


def active_setting_latents(first: nn.Module, second: nn.Module, variables, n: int, target: AggregatePosterior, *,
                           seed: int = 0) -> dict:
    """``{setting: z}`` for every entry of ``ACTIVE_SETTINGS``, all from the same draws ``u``."""
    return {name: generate_active_latents(second, variables, n, first.latent_dim, seed=seed, mode=mode, target=target,
                                          fill=fill, device=_model_device(first))
            for name, mode, fill in ACTIVE_SETTINGS}


def _train_device(config) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def aggregate_posterior(first: nn.Module, images: Tensor, *, batch_size: int = 1000) -> AggregatePosterior:
    """The aggregate posterior's moments of ``first`` over ``images`` (the renormalization target)."""
    return AggregatePosterior.from_latents(*encode_all(first, images, batch_size=batch_size))


def renormalize_latents(z: Tensor, mode: str, target: AggregatePosterior | None) -> Tensor:
    """``z`` ``(N, D)`` renormalized over its batch by ``mode`` (one of ``RENORMALIZE``) to ``target``."""
    if mode not in RENORMALIZE:
        raise ValueError(f"renormalize_latents: mode must be one of {RENORMALIZE}, got {mode!r}")
    if mode == "none":
        return z
    if target is None:
        raise ValueError(f"renormalize_latents: mode {mode!r} needs the target aggregate posterior")
    if z.shape[0] < 2:
        raise ValueError(f"renormalize_latents: renormalizing over a batch needs at least 2 latents, got {z.shape[0]}")
    mean, var = target.mean.to(z.device, z.dtype), target.var.to(z.device, z.dtype)
    if mode == "per_dim":
        return renormalize(z, mean, var, mode="per_dim")
    return renormalize(z, 0.0, var, mode="scalar")


@torch.no_grad()
def generate_latents(second: nn.Module | None, n: int, latent_dim: int, *, seed: int = 0, mode: str = "none",
                     target: AggregatePosterior | None = None, device=None) -> Tensor:
    """``n`` first-stage latents: ``N(0, I)`` draws when ``second`` is None, else ``second.decode(u)`` for
    ``u ~ N(0, I)``, then renormalized by ``mode``. ``(n, latent_dim)`` float32."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"generate_latents: n must be a positive int, got {n!r}")
    generator = torch.Generator().manual_seed(seed)
    if second is None:
        z = torch.randn(n, latent_dim, generator=generator)
        z = z.to(device) if device is not None else z
    else:
        with eval_mode(second):
            u = torch.randn(n, second.latent_dim, generator=generator).to(_model_device(second))
            z = second.decode(u).float()
    return renormalize_latents(z, mode, target)


@torch.no_grad()
def decode_all(model: nn.Module, z: Tensor, *, batch_size: int = 1000) -> Tensor:
    """``model.decode`` of ``z`` in batches, in eval mode; float32 on the CPU."""
    device = _model_device(model)
    with eval_mode(model):
        return torch.cat([model.decode(z[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, z.shape[0], batch_size)])


@torch.no_grad()
def generate(first: nn.Module, second: nn.Module | None, n: int, *, seed: int = 0, mode: str = "none",
             target: AggregatePosterior | None = None, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """``(z, x)``: ``n`` latents from ``generate_latents`` and the first stage's images of them."""
    _check_model(first, "first")
    z = generate_latents(second, n, first.latent_dim, seed=seed, mode=mode, target=target, device=_model_device(first))
    return z, decode_all(first, z, batch_size=batch_size)


def setting_latents(first: nn.Module, second: nn.Module | None, n: int, target: AggregatePosterior, *, seed: int = 0):
    """``{setting: z}`` for every entry of ``SETTINGS`` (second-stage ones only when ``second`` is given); all
    second-stage settings start from the same draws ``u``, so they differ only by the renormalization."""
    out = {}
    for name, uses_second, mode in SETTINGS:
        if uses_second and second is None:
            continue
        out[name] = generate_latents(second if uses_second else None, n, first.latent_dim, seed=seed, mode=mode,
                                     target=target, device=_model_device(first))
    return out


def _pixel_variance(x: Tensor) -> float:
    """Per-pixel variance over the batch, averaged over the pixels."""
    return float(moments(x.reshape(x.shape[0], -1).float(), dim=0)[1].double().mean())


@torch.no_grad()
def variance_report(first: nn.Module, second: nn.Module | None, images: Tensor, *, n: int = 10000, seed: int = 0,
                    target: AggregatePosterior | None = None, latents: dict | None = None,
                    batch_size: int = 1000) -> dict:
    """The variance loss of each generation setting (see the module docstring) as a JSON-ready dict:
    ``aggregate_posterior`` (per-dimension moments), ``data_pixel_var``, and per setting ``latent_var``
    ``(D,)``, ``latent_var_mean`` and ``pixel_var``. ``images`` are the data the targets come from;
    ``latents`` (from ``setting_latents``) replaces the ``n`` draws made here."""
    _check_images(images)
    target = target or aggregate_posterior(first, images, batch_size=batch_size)
    if latents is None:
        latents = setting_latents(first, second, n, target, seed=seed)
    n = next(iter(latents.values())).shape[0]
    report = {
        "n": n,
        "aggregate_posterior": {**target.to_dict(), "var_mean": float(target.var.double().mean())},
        "data_pixel_var": _pixel_variance(images),
        "settings": {},
    }
    for name, z in latents.items():
        latent_var = moments(z.float(), dim=0)[1].cpu()
        x = decode_all(first, z, batch_size=batch_size)
        report["settings"][name] = {"latent_var": latent_var.tolist(),
                                    "latent_var_mean": float(latent_var.double().mean()),
                                    "pixel_var": _pixel_variance(x)}
    return report


def format_variance_report(report: dict) -> str:
    agg = report["aggregate_posterior"]["var_mean"]
    data = report["data_pixel_var"]
    head = f"{'setting':<26} {'latent var (mean over dims)':>28} {'pixel var':>10}"
    lines = [head, "-" * len(head),
             f"{'aggregate posterior / data':<26} {agg:28.4f} {data:10.5f}"]
    for name, row in report["settings"].items():
        lines.append(f"{name:<26} {row['latent_var_mean']:28.4f} {row['pixel_var']:10.5f}")
    lines.append(f"(n = {report['n']} generated per setting; latent var of the aggregate posterior = Var(mu) + "
                 "E[sigma^2])")
    return "\n".join(lines)


def load_second_stage(run_dir: str | Path, *, device="cpu") -> nn.Module | None:
    """The second stage saved under ``RUN/two_stage`` (by ``fastvae two-stage`` or ``train_second_stage``) for the
    run's current checkpoint (its ``source.json`` names it), or None when there is none; a second stage of
    another checkpoint (or with no ``source.json``) is ignored with a warning."""
    return _load_current(Path(run_dir), SUBDIR, device)


def save_active_variables(run_dir: str | Path, variables) -> None:
    """Write ``RUN/two_stage_active/latents.json`` naming ``variables`` (``train_second_stage`` does it itself)."""
    folder = Path(run_dir) / SUBDIR_ACTIVE
    folder.mkdir(parents=True, exist_ok=True)
    _record_source(folder, None, variables)


def load_active_second_stage(run_dir: str | Path, *, device="cpu") -> tuple[nn.Module, list[int]] | None:
    """``(second, variables)`` saved under ``RUN/two_stage_active`` (by ``fastvae two-stage --latents active`` or
    ``train_second_stage(variables=...)``) for the run's current checkpoint, or None, as ``load_second_stage``."""
    folder = Path(run_dir) / SUBDIR_ACTIVE
    if not (folder / "latents.json").is_file():
        return None
    second = _load_current(Path(run_dir), SUBDIR_ACTIVE, device)
    return None if second is None else (second, json.loads((folder / "latents.json").read_text())["variables"])


def _load_current(run_dir: Path, subdir: str, device) -> nn.Module | None:
    """The model in ``run_dir/subdir`` when its ``source.json`` names the run's current checkpoint, else None."""
    from .run import load
    from .train.runfolder import PROVENANCE, matches_checkpoint

    folder = run_dir / subdir
    if not (folder / "checkpoint.pt").is_file():
        return None
    if not matches_checkpoint(folder, run_dir):
        why = "was trained on another checkpoint of the run" if (folder / PROVENANCE).is_file() else \
            f"has no {PROVENANCE} naming the run checkpoint it came from"
        warnings.warn(f"{folder} {why}: not used (train it again)", stacklevel=3)
        return None
    second, _ = load(folder, device=device)
    return second

"""The lean training loop: ``fit(model, data, config)``, ``TrainConfig``, ``train(config)``.

API (stable): ``TrainConfig`` is a dataclass of every option (``save(path)`` / ``TrainConfig.load(path)``
round-trip through JSON). ``fit(model, data, config=None, *, test_data=None, callbacks=None, resume=False)
-> TrainResult`` trains ``model`` (``encode(x) -> (mu, logvar)``, ``decode(z) -> x_hat``,
``model(x, seed) -> (x_hat, kl)``, as in ``fastvae.models``) on ``data``, an images tensor ``(N, *input_shape)``
or an ``(images, labels)`` pair, and writes into ``config.out``: ``config.json``, ``checkpoint.pt`` (atomic,
every ``checkpoint_every`` steps and at each epoch end), ``metrics.jsonl``, ``metrics.csv`` and
``images/{samples,recon}-epochNNN.png``. ``test_data`` (same forms) is evaluated at each epoch end.
Each callback is called on rank 0 as ``callback(model=, step=, epoch=, out_dir=, metrics=, epoch_end=, config=)``
after every optimizer step (``epoch_end=False``, ``step`` counting from 1, ``epoch`` the 0-based index of the
running epoch, ``metrics`` the last logged training row) and once after each epoch's evaluation
(``epoch_end=True``, ``epoch`` the number of epochs completed, ``metrics`` the test metrics); extra keywords
may be added, so accept ``**kwargs``. Data already on the training device is used as is, never copied, so a
callback may rewrite it in place between epochs. ``resume=True`` continues from ``config.out/checkpoint.pt`` exactly: an interrupted and resumed
run ends with the same weights as an uninterrupted one. ``train(config)`` loads ``config.dataset``, builds
``config.model`` and calls ``fit``; ``fastvae.load(run_dir) -> (model, config)`` reads a run back.

The hot loop keeps the data on the device as one tensor, draws one seeded permutation per epoch
(``epoch_permutation``) and slices batches with ``index_select``; losses stay on the device in a small window
that is read once per ``log_every`` steps, which is also where a non-finite loss is caught (before any
checkpoint is written, so the last good checkpoint stays in place). Under ``torchrun`` (torch.distributed
initialized) the model and loss policy train under DDP, each rank takes its shard of every permutation,
the balanced loss's gamma is estimated from the MSE over all ranks, and only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .losses import LOSSES, Objective, build_loss
from .models import MODELS, build_model
from .reference import UPDATE_RULES
from .experiments import KL_MODES, VariantObjective

__all__ = ["TrainConfig", "TrainResult", "NonFiniteLossError", "fit", "train", "epoch_permutation",
           "model_from_config", "save_atomic", "CHECKPOINT", "METRIC_FIELDS"]

CHECKPOINT = "checkpoint.pt"
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "linear")
METRIC_FIELDS = ("split", "epoch", "step", "loss", "rec", "kl", "mse", "gamma", "lr", "samples_per_s",
                 "epoch_time_s", "time_s")
_TERMS = ("total loss", "reconstruction", "KL")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN or infinite loss; the message names the step and the loss term."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every option of a training run (each is also a ``fastvae train`` flag: ``--kl-weight`` for ``kl_weight``)."""

    # data
    dataset: str = "auto"             # fashion-mnist, mnist, cifar10, celeba, digits, a .npy/.npz path, or auto
    data_root: Optional[str] = None   # default $FASTVAE_DATA or ./data
    download: bool = True             # let torchvision download a missing dataset (needs network)
    limit: int = 0                    # train on the first LIMIT images only (0: all)
    # model
    model: str = "dense"              # dense, conv, resnet, second-stage
    latent: int = 16
    hidden: Optional[list] = None     # dense / second-stage: hidden widths; conv / resnet: [bottleneck width]
    channels: Optional[list] = None   # conv / resnet: channels per scale
    blocks_per_scale: int = 2         # resnet
    # objective
    loss: str = "balanced"            # balanced, beta, learned-gamma
    kl_weight: float = 1.0
    gamma_momentum: float = 0.99      # balanced: momentum of the running MSE
    gamma_rule: str = "min-ema"       # balanced: min-ema or ema
    kl: str = "full"                  # KL term: full, quadratic (mu^2/2 only) or none
    sampling: bool = True             # z ~ q(z|x) in training (--no-sampling: z = mu)
    # optimization
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"     # constant, cosine or linear decay to 0 over all steps
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 0.0            # max gradient norm (0: no clipping)
    drop_last: bool = False
    # machine
    device: str = "auto"              # auto: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu
    precision: str = "fp32"           # fp32, bf16 (autocast), fp16 (autocast + GradScaler, CUDA only)
    compile: bool = False             # torch.compile the model
    threads: int = 0                  # torch CPU threads (0: torch's default)
    seed: int = 0
    # output
    out: Optional[str] = None         # run folder (default runs/DATASET-MODEL-TIME)
    overwrite: bool = False           # start afresh in an out folder that already holds a run
    log_every: int = 50               # steps between metric rows (and non-finite checks)
    checkpoint_every: int = 0         # steps between checkpoints (0: at epoch ends only)
    max_steps: int = 0                # stop after this many steps in all, with a checkpoint (0: no limit)
    eval_batch_size: int = 1000
    n_samples: int = 64               # images in each sample grid
    images_every: int = 1             # epochs between sample and reconstruction grids (and always the last)
    progress: bool = True             # tqdm progress bar
    tensorboard: bool = True          # also log to TensorBoard when it is installed

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ValueError or TypeError naming the first bad field."""
        types = {f.name: f.type for f in dataclasses.fields(self)}
        for name, value in dataclasses.asdict(self).items():
            kind = types[name]
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"TrainConfig.{name} must be an int, got {value!r}")
            if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"TrainConfig.{name} must be a number, got {value!r}")
            if kind == "bool" and not isinstance(value, bool):
                raise TypeError(f"TrainConfig.{name} must be True or False, got {value!r}")
            if kind in ("str", "Optional[str]") and not (isinstance(value, str) or (value is None and kind != "str")):
                raise TypeError(f"TrainConfig.{name} must be a string, got {value!r}")
        choices = {"model": tuple(MODELS), "loss": tuple(LOSSES), "gamma_rule": UPDATE_RULES,
                   "precision": PRECISIONS, "lr_schedule": LR_SCHEDULES,
                   "kl": KL_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}")
        for name in ("latent", "epochs", "batch_size", "log_every", "eval_batch_size", "n_samples", "blocks_per_scale",
                     "images_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("limit", "warmup_steps", "checkpoint_every", "max_steps", "threads", "seed", "weight_decay", "grad_clip", "kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr}")
        if not 0 <= self.gamma_momentum <= 1:
            raise ValueError(f"TrainConfig.gamma_momentum must be in [0, 1], got {self.gamma_momentum}")
        for name in ("hidden", "channels"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, tuple):
                    value = list(value)
                    setattr(self, name, value)
                if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
                    raise ValueError(f"TrainConfig.{name} must be a non-empty list of positive ints, got {value!r}")
        if self.model in ("conv", "resnet") and self.hidden is not None and len(self.hidden) != 1:
            raise ValueError(f"TrainConfig.hidden for model {self.model!r} is the one width of the dense bottleneck, got {self.hidden}")
        if self.model in ("dense", "second-stage") and self.channels is not None:
            raise ValueError(f"TrainConfig.channels is for the conv and resnet models, not {self.model!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"TrainConfig.device: {error}") from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        save_atomic_bytes((json.dumps(self.to_dict(), indent=2) + "\n").encode(), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class TrainResult:
    """What ``fit`` returns: where the run is, how far it went, its last metrics, and the loss policy
    (``policy.gamma``; its state_dict holds ``running_mse`` or ``log_gamma``)."""

    out_dir: Path
    step: int
    epoch: int
    train_metrics: dict = field(default_factory=dict)
    test_metrics: dict = field(default_factory=dict)
    policy: Optional[nn.Module] = None


def model_from_config(config: TrainConfig, input_shape) -> nn.Module:
    """``build_model`` with the model fields of ``config`` for inputs of ``input_shape``."""
    kwargs: dict = {}
    if config.model in ("dense", "second-stage") and config.hidden is not None:
        kwargs["hidden"] = tuple(config.hidden)
    if config.model in ("conv", "resnet"):
        if config.hidden is not None:
            kwargs["hidden"] = config.hidden[0]
        if config.channels is not None:
            kwargs["channels"] = tuple(config.channels)
    if config.model == "resnet":
        kwargs["blocks_per_scale"] = config.blocks_per_scale
    return build_model(config.model, tuple(input_shape), config.latent, **kwargs)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomic_bytes(data: bytes, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_atomic(obj, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: a temporary file, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class _MetricsLog:
    """Rows appended to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard when installed), rank 0 only."""

    def __init__(self, out: Path, *, keep_until_step: int | None, tensorboard: bool):
        self.jsonl, self.csv = out / "metrics.jsonl", out / "metrics.csv"
        rows = []
        if keep_until_step is not None and self.jsonl.is_file():  # resume: drop rows written after the checkpoint
            rows = [r for r in map(json.loads, self.jsonl.read_text().splitlines()) if r.get("step", 0) <= keep_until_step]
        with open(self.jsonl, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        with open(self.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self.tb = None
        if tensorboard:
            with contextlib.suppress(Exception):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict) -> None:
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=METRIC_FIELDS, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("split", "epoch", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{row['split']}/{key}", value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------------------
def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of the ``n`` training samples in ``epoch``: a CPU permutation from a generator seeded with
    ``(seed, epoch)``, so that a resumed run and every rank draw the same one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def _as_images(data, name: str) -> Tensor:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        data = data[0]
    if not isinstance(data, Tensor):
        raise TypeError(f"fit: {name} must be a tensor of samples (N, ...) or an (images, labels) pair, got {type(data).__name__}")
    if not data.dtype.is_floating_point:
        raise TypeError(f"fit: {name} must be floating (images scaled to [0, 1]), got {data.dtype}; see fastvae.data.as_images")
    if data.dim() < 2 or data.shape[0] == 0:
        raise ValueError(f"fit: {name} must be a non-empty batch (N, ...), got shape {tuple(data.shape)}")
    return data


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _optimizer(params: list, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam, fused where torch has it for the device (CUDA, CPU), else the foreach implementation."""
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


def _lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup, schedule = config.warmup_steps, config.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _grids(model: nn.Module, test_images: Tensor, out: Path, epoch: int, config: TrainConfig, autocast) -> None:
    """A grid of samples (the same ``z`` every epoch) and a grid of test images over their reconstructions."""
    from .plots import image_grid

    images = out / "images"
    images.mkdir(exist_ok=True)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad(), autocast():
        samples = model.sample(config.n_samples, generator=generator)
        x = test_images[:32]
        recon = model.decode(model.encode(x)[0])
    image_grid(samples.float(), images / f"samples-epoch{epoch:03d}.png")
    image_grid(torch.cat([x[:16], recon[:16].float(), x[16:32], recon[16:32].float()]), images / f"recon-epoch{epoch:03d}.png",
               nrow=min(16, x.shape[0]))


@torch.no_grad()
def evaluate(model: nn.Module, policy: nn.Module, images: Tensor, *, kl_weight: float = 1.0, batch_size: int = 1000,
             seed: int = 0, autocast=contextlib.nullcontext) -> dict:
    """Loss, reconstruction, KL (per sample) and MSE (per element) of ``images`` in eval mode, with the
    reparameterization noise seeded per batch (the same every call); gamma of ``policy`` as it stands."""
    was_training = model.training, policy.training
    model.eval()
    policy.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=images.device)
    try:
        for k, start in enumerate(range(0, images.shape[0], batch_size)):
            x = images[start:start + batch_size]
            with autocast():
                x_hat, kl = model(x, seed + k)
                rec = policy(x_hat, x)
            n = x.shape[0]
            totals += torch.stack([(rec + kl_weight * kl) * n, rec * n, kl * n,
                                   (x_hat.float() - x.float()).square().sum() / x[0].numel()]).double()
    finally:
        model.train(was_training[0])
        policy.train(was_training[1])
    loss, rec, kl, mse = (totals / images.shape[0]).tolist()
    gamma = policy.gamma
    return {"loss": loss, "rec": rec, "kl": kl, "mse": mse, "gamma": float(gamma) if gamma is not None else None}


def _non_finite_message(window: Tensor, first_step: int, epoch: int, checkpoint: Path, last_good: int | None) -> str:
    finite = torch.isfinite(window)
    row = int((~finite.all(dim=1)).nonzero()[0])
    bad = [(_TERMS[j], float(window[row, j])) for j in range(3) if not bool(finite[row, j])]
    if len(bad) > 1 and bad[0][0] == "total loss":
        bad = bad[1:]
    terms = " and ".join(f"the {name} term is {value}" for name, value in bad)
    kept = (f"the last good checkpoint {checkpoint} (step {last_good}) is left in place" if last_good is not None
            else "no checkpoint had been written yet")
    return f"non-finite loss at step {first_step + row} (epoch {epoch + 1}): {terms}; training stopped, {kept}"


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def fit(model: nn.Module, data, config: TrainConfig | None = None, *, test_data=None,
        callbacks: Iterable[Callable] | None = None, resume: bool = False) -> TrainResult:
    """Train ``model`` on ``data`` as ``config`` says (see the module docstring); returns a ``TrainResult``.

    Seeds torch's generators with ``config.seed + rank`` (the reparameterization noise); the model arrives
    initialized. Raises ``NonFiniteLossError`` on a NaN or infinite loss, ``FileExistsError`` when ``config.out``
    already holds a run (unless ``resume`` or ``config.overwrite``), ValueError/TypeError on bad arguments.
    """
    config = (config or TrainConfig()).validate()
    if not (callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))):
        raise TypeError(f"fit: model must have encode(x) -> (mu, logvar) and decode(z) -> x_hat, got {type(model).__name__}")
    images = _as_images(data, "data")
    test_images = _as_images(test_data, "test_data") if test_data is not None else None
    input_shape = tuple(getattr(model, "input_shape", images.shape[1:]))
    for name, tensor in (("data", images), ("test_data", test_images)):
        if tensor is not None and tuple(tensor.shape[1:]) != input_shape:
            raise ValueError(f"fit: {name} has samples of shape {tuple(tensor.shape[1:])} but the model takes {input_shape}")
    callbacks = list(callbacks or [])
    if not all(callable(cb) for cb in callbacks):
        raise TypeError("fit: callbacks must be callables")
    if config.limit:
        images = images[:config.limit]
    rank, world = _distributed()
    out = Path(config.out) if config.out is not None else Path("runs") / f"fit-{time.strftime('%Y%m%d-%H%M%S')}"
    checkpoint_path = out / CHECKPOINT
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"fit: resume=True but {checkpoint_path} does not exist")
    if not resume and checkpoint_path.is_file() and not config.overwrite:
        raise FileExistsError(f"fit: {out} already holds a run ({CHECKPOINT}); resume it, pass overwrite=True "
                              "(--overwrite) or choose another out folder")
    if world > 1 and images.shape[0] < world:
        raise ValueError(f"fit: {images.shape[0]} samples cannot be shared among {world} ranks")

    # ---------------------------------------------------------------- set-up
    device = _device(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("TrainConfig.precision fp16 needs CUDA (a GradScaler); use bf16 on the CPU")
    torch.manual_seed(config.seed + rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.manual_seed(config.seed + rank)
        torch.backends.cudnn.benchmark = True
    channels_last = device.type == "cuda" and images.dim() == 4
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    images = images.to(device)
    if test_images is not None:
        test_images = test_images.to(device)
    policy = build_loss(config.loss, momentum=config.gamma_momentum, rule=config.gamma_rule).to(device)
    objective = (Objective(model, policy, config.kl_weight) if config.kl == "full" and config.sampling else
                 VariantObjective(model, policy, config.kl_weight, kl=config.kl, sampling=config.sampling))
    optimizer = _optimizer(list(objective.parameters()), config, device)
    per_rank = images.shape[0] // world
    steps_per_epoch = per_rank // config.batch_size if config.drop_last else math.ceil(per_rank / config.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"fit: drop_last with batch_size {config.batch_size} leaves no batch of {per_rank} samples per rank")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, config.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    step = epoch = start_batch = 0
    last_checkpoint: int | None = None
    if resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        policy.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) != world:
            raise ValueError(f"fit: the checkpoint was written by {len(rngs)} ranks, this run has {world}; "
                             "resume with the same number of processes")
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(f"fit: the checkpoint has {state['steps_per_epoch']} steps per epoch, this run "
                             f"{steps_per_epoch}; resume with the same data, batch_size and drop_last")
        _set_rng_state(rngs[rank], device)
        step, epoch, start_batch = state["step"], state["epoch"], state["batch"]
        last_checkpoint = step

    train_module: nn.Module = objective
    if config.compile:
        objective.model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in objective.parameters() if p.requires_grad]

    log: _MetricsLog | None = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.json")
        log = _MetricsLog(out, keep_until_step=step if resume else None, tensorboard=config.tensorboard)
    bar = None
    if rank == 0 and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs * steps_per_epoch, initial=step, unit="step", dynamic_ncols=True)

    def save_checkpoint(epoch_now: int, batch_now: int) -> None:
        nonlocal last_checkpoint
        rngs = [_rng_state(device)]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, _rng_state(device))
        if rank == 0:
            spec = getattr(model, "spec", None)
            save_atomic({
                "format": 1, "model": model.state_dict(), "model_spec": spec, "loss": policy.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": [{k: v.cpu() for k, v in r.items()} for r in rngs],
                "epoch": epoch_now, "batch": batch_now, "step": step, "steps_per_epoch": steps_per_epoch,
                "config": config.to_dict(),
            }, checkpoint_path)
        last_checkpoint = step

    # ---------------------------------------------------------------- the loop
    window = torch.zeros(config.log_every, 3, device=device)  # (loss, rec, kl) per step since the last flush
    slot = 0
    train_metrics: dict = {}
    test_metrics: dict = {}
    started = window_start = time.perf_counter()

    def stop(message: str) -> None:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        raise NonFiniteLossError(message)

    def flush(epoch_now: int) -> None:
        """Read the window once: stop on a non-finite loss, else log the means."""
        nonlocal slot, window_start, train_metrics
        if slot == 0:
            return
        rows = window[:slot].double()
        stats = torch.cat([rows.sum(0), (~torch.isfinite(rows)).any().double().reshape(1)])
        if world > 1:
            dist.all_reduce(stats)
        if stats[3] > 0:
            stop(_non_finite_message(rows, step - slot + 1, epoch_now, checkpoint_path, last_checkpoint)
                 if not bool(torch.isfinite(rows).all()) else
                 f"non-finite loss on another rank between steps {step - slot + 1} and {step}; training stopped")
        now = time.perf_counter()
        loss, rec, kl = (stats[:3] / (slot * world)).tolist()
        gamma = policy.gamma
        train_metrics = {"split": "train", "epoch": epoch_now + 1, "step": step, "loss": loss, "rec": rec, "kl": kl,
                         "gamma": float(gamma) if gamma is not None else None, "lr": scheduler.get_last_lr()[0],
                         "samples_per_s": slot * config.batch_size * world / max(now - window_start, 1e-9),
                         "time_s": now - started}
        if log is not None:
            log.write(train_metrics)
        if bar is not None:
            postfix = {"loss": f"{loss:.4g}", "rec": f"{rec:.4g}", "kl": f"{kl:.4g}"}
            if gamma is not None:
                postfix["gamma"] = f"{float(gamma):.4g}"
            bar.set_postfix(postfix, refresh=False)
            bar.set_description(f"epoch {epoch_now + 1}/{config.epochs}", refresh=False)
            bar.update(step - bar.n)
        slot, window_start = 0, now

    stopped = False
    B = config.batch_size
    while epoch < config.epochs and not stopped:
        order = epoch_permutation(images.shape[0], config.seed, epoch)
        order = order[rank::world][:per_rank].to(device)
        epoch_start = time.perf_counter()
        for b in range(start_batch, steps_per_epoch):
            x = images.index_select(0, order[b * B:(b + 1) * B])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            try:
                with autocast():
                    loss, rec, kl = train_module(x)
            except ValueError:
                # the ops reject a running MSE made NaN by an earlier step: report that step instead
                rows = window[:slot]
                if slot and not bool(torch.isfinite(rows).all()):
                    stop(_non_finite_message(rows, step - slot + 1, epoch, checkpoint_path, last_checkpoint))
                raise
            if scaler.is_enabled():
                scaler.scale(loss).backward()
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
                optimizer.step()
            scheduler.step()
            step += 1
            with torch.no_grad():
                torch.stack((loss, rec, kl), out=window[slot])
            slot += 1
            at_checkpoint = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            stopping = bool(config.max_steps) and step >= config.max_steps
            if slot == config.log_every or at_checkpoint or stopping:
                flush(epoch)
            if callbacks and rank == 0:
                for callback in callbacks:
                    callback(model=model, step=step, epoch=epoch, out_dir=out, metrics=train_metrics, epoch_end=False, config=config)
            if (at_checkpoint or stopping) and b + 1 < steps_per_epoch:
                save_checkpoint(epoch, b + 1)
            if stopping and b + 1 < steps_per_epoch:
                stopped = True
                break
        else:
            flush(epoch)
            epoch_time = time.perf_counter() - epoch_start
            epoch += 1
            start_batch = 0
            if rank == 0:
                eval_images = test_images if test_images is not None else images[:2048]
                test_metrics = evaluate(model, policy, eval_images, kl_weight=config.kl_weight, batch_size=config.eval_batch_size,
                                        seed=config.seed, autocast=autocast)
                test_metrics = {"split": "test" if test_images is not None else "train-subset", "epoch": epoch, "step": step,
                                **test_metrics, "epoch_time_s": epoch_time, "time_s": time.perf_counter() - started}
                log.write(test_metrics)
                if len(input_shape) == 3 and input_shape[0] in (1, 3) and (epoch % config.images_every == 0 or epoch == config.epochs):
                    _grids(model, eval_images, out, epoch, config, autocast)
                if config.progress:
                    gamma = "" if test_metrics["gamma"] is None else f", gamma {test_metrics['gamma']:.4g}"
                    (bar.write if bar is not None else print)(f"epoch {epoch}/{config.epochs}: {test_metrics['split']} loss {test_metrics['loss']:.4g}, "
                              f"rec {test_metrics['rec']:.4g}, KL {test_metrics['kl']:.4g}, MSE {test_metrics['mse']:.4g}"
                              f"{gamma} ({epoch_time:.1f} s)")
                for callback in callbacks:
                    callback(model=model, step=step, epoch=epoch, out_dir=out, metrics=test_metrics, epoch_end=True, config=config)
            save_checkpoint(epoch, 0)
            if world > 1:
                dist.barrier()
            if config.max_steps and step >= config.max_steps:
                stopped = True

    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    if config.compile:
        objective.model = model
    return TrainResult(out, step, epoch, train_metrics, test_metrics, policy)


# --------------------------------------------------------------------------------------------------
# From a config alone
# --------------------------------------------------------------------------------------------------
def train(config: TrainConfig | None = None, *, resume: bool = False, callbacks: Iterable[Callable] | None = None,
          echo: Callable[[str], None] | None = None) -> tuple[nn.Module, TrainResult]:
    """Load ``config.dataset`` (train and, where there is one, test split), build ``config.model`` for it and
    ``fit``; returns ``(model, result)``. ``echo`` receives one line on what was chosen."""
    from .data import load_dataset, resolve_dataset

    config = (config or TrainConfig()).validate()
    rank, world = _distributed()
    name = resolve_dataset(config.dataset, config.data_root)
    if name != config.dataset:
        if echo is not None and rank == 0:
            echo(f"dataset auto: {name}" + ("" if name == "fashion-mnist" else
                 " (no Fashion-MNIST found on this machine; apt-get install dataset-fashion-mnist to train on it)"))
        config = dataclasses.replace(config, dataset=name)
    if config.out is None:
        out = [f"runs/{Path(name).stem}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if world > 1:
            dist.broadcast_object_list(out, src=0)
        config = dataclasses.replace(config, out=out[0])
    images, _ = load_dataset(name, config.data_root, "train", download=config.download)
    try:
        test, _ = load_dataset(name, config.data_root, "test", download=config.download)
    except ValueError:  # a user file without a test split
        test = None
    torch.manual_seed(config.seed)  # the same initial weights on every rank and every run with this seed
    model = model_from_config(config, images.shape[1:])
    return model, fit(model, images, config, test_data=test, callbacks=callbacks, resume=resume)

"""``TrainConfig``: every option of a training run, with its help, type and choices in the field's metadata.

The ``fastvae train`` command builds one flag per field from that metadata (``--kl-weight`` for ``kl_weight``),
and ``validate`` checks the values against it, so a new option is one field here and nothing else.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..losses import KL_MODES, LOSSES
from ..models import MODELS
from ..reference import UPDATE_RULES

__all__ = ["TrainConfig", "PRECISIONS", "LR_SCHEDULES", "KL_MODES", "RESUMABLE"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "linear")
# fields that may change when a run is resumed; the others define the run and stay as saved
# the widest layer and the most channels a model may ask for: 65536 units of a 784-pixel input are 51M weights
_MAX_WIDTH = 2**16
_MAX_CHANNELS = 2**13
RESUMABLE = ("epochs", "max_steps", "progress", "tensorboard", "log_every", "checkpoint_every", "threads", "device",
             "cuda_graphs",
             "eval_batch_size", "n_samples", "images_every", "download", "data_root")


def option(default, help: str, kind: type, *, choices=None, minimum=None, maximum=None):
    """A dataclass field whose metadata carries what the CLI and ``validate`` need: ``help``, ``kind`` (int,
    float, str, bool or list: a list of positive ints), ``choices`` (allowed values), ``minimum`` and ``maximum``
    (of the value, or of each entry of a list: sizes that would allocate absurd memory are refused before)."""
    meta = {"help": help, "kind": kind, "choices": tuple(choices) if choices is not None else None, "minimum": minimum,
            "maximum": maximum}
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every option of a training run (each is also a ``fastvae train`` flag: ``--kl-weight`` for ``kl_weight``)."""

    # data
    dataset: str = option("auto", "fashion-mnist, mnist, cifar10, celeba, digits, a .npy/.npz path, folder:PATH (a "
                          "folder of images, streamed from disk), or auto", str)
    data_root: Optional[str] = option(None, "data folder (default $FASTVAE_DATA or ./data)", str)
    download: bool = option(True, "let torchvision download a missing dataset (needs network)", bool)
    limit: int = option(0, "train on the first LIMIT images only (0: all)", int, minimum=0)
    # model
    model: str = option("dense", "the architecture", str, choices=MODELS)
    latent: int = option(16, "latent dimension", int, minimum=1, maximum=_MAX_WIDTH)
    hidden: Optional[list] = option(None, "dense / second-stage: hidden widths; conv / resnet: [bottleneck width]",
                                    list, maximum=_MAX_WIDTH)
    channels: Optional[list] = option(None, "conv / resnet: channels per scale", list, maximum=_MAX_CHANNELS)
    blocks_per_scale: int = option(2, "resnet: residual blocks per scale", int, minimum=1)
    # objective
    loss: str = option("balanced", "reconstruction loss", str, choices=LOSSES)
    kl_weight: float = option(1.0, "weight of the KL term (beta)", float, minimum=0)
    kl: str = option("full", "KL term: full KL to N(0, I), quadratic (mu^2/2 only) or none", str, choices=KL_MODES)
    sampling: bool = option(True, "reparameterized sampling z = mu + sigma eps (--no-sampling: z = mu)", bool)
    gamma_momentum: float = option(0.99, "balanced: momentum of the running MSE, in [0, 1]", float, minimum=0)
    gamma_rule: str = option("min-ema", "balanced: how the running MSE is updated", str, choices=UPDATE_RULES)
    # optimization
    epochs: int = option(20, "passes over the training data", int, minimum=1)
    batch_size: int = option(128, "samples per step (per process under torchrun)", int, minimum=1)
    lr: float = option(1e-3, "Adam learning rate", float)
    lr_schedule: str = option("constant", "decay to 0 over all steps", str, choices=LR_SCHEDULES)
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up", int, minimum=0)
    weight_decay: float = option(0.0, "Adam weight decay", float, minimum=0)
    grad_clip: float = option(0.0, "max gradient norm (0: no clipping)", float, minimum=0)
    drop_last: bool = option(False, "drop each epoch's last incomplete batch", bool)
    grad_accumulation: int = option(1, "batches whose gradients add up to one optimizer step (an effective batch of "
                                    "N x batch_size; the same step as that larger batch where the math allows)", int,
                                    minimum=1)
    ema: float = option(0.0, "decay of an exponential moving average of the weights, kept on the device and saved in "
                        "the checkpoint; sample, analyze and fid use it (0: none; 0.999 is usual)", float, minimum=0)
    # machine
    device: str = option("auto", "auto: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu", str)
    precision: str = option("auto", "auto (the faster of fp32 and bf16 autocast, timed over real steps of this "
                            "model and batch on this machine and cached; the run folder's config.json keeps what it "
                            "chose and why), fp32, bf16 (autocast), fp16 (autocast + GradScaler, CUDA only)", str,
                            choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the model", bool)
    cuda_graphs: Optional[bool] = option(None, "capture the whole training step in a CUDA graph after a warm-up and "
                                         "replay it (default: on for CUDA when its replays measure faster than "
                                         "eager steps, off on the CPU)", bool)
    threads: int = option(0, "torch CPU threads (0: torch's default)", int, minimum=0)
    flush_denormal: bool = option(True, "flush subnormal floats to zero on the CPU while training, in every torch "
                                  "thread (torch.set_flush_denormal): Adam's first moments of weights whose gradient "
                                  "is zero sink into subnormals, which x86 CPUs compute 10-100x slower; "
                                  "--no-flush-denormal keeps IEEE subnormals", bool)
    seed: int = option(0, "seed of the initial weights, the data order and the noise", int, minimum=0,
                     maximum=2**63 - 1)
    # output
    out: Optional[str] = option(None, "run folder (default runs/DATASET-MODEL-TIME)", str)
    overwrite: bool = option(False, "empty an out folder that already holds a run and start afresh", bool)
    log_every: int = option(50, "steps between metric rows (and non-finite checks)", int, minimum=1,
                          maximum=10**6)
    checkpoint_every: int = option(0, "steps between checkpoints (0: at epoch ends only)", int, minimum=0)
    max_steps: int = option(0, "stop after this many steps in all, with a checkpoint (0: no limit)", int, minimum=0)
    eval_batch_size: int = option(1000, "batch size of the end-of-epoch evaluation", int, minimum=1)
    n_samples: int = option(64, "images in each sample grid", int, minimum=1)
    images_every: int = option(1, "epochs between sample and reconstruction grids (and always the last)", int,
                               minimum=1)
    progress: bool = option(True, "tqdm progress bar (only when stderr is a terminal)", bool)
    tensorboard: Optional[bool] = option(None, "also log to TensorBoard: --tensorboard needs it installed (an "
                                         "error otherwise), --no-tensorboard never; unset: when installed", bool)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ValueError or TypeError naming the first bad field."""
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name), self)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr}")
        if self.ema >= 1:
            raise ValueError(f"TrainConfig.ema must be in [0, 1), got {self.ema}")
        if self.gamma_momentum > 1:
            raise ValueError(f"TrainConfig.gamma_momentum must be in [0, 1], got {self.gamma_momentum}")
        if self.model in ("conv", "resnet") and self.hidden is not None and len(self.hidden) != 1:
            raise ValueError(f"TrainConfig.hidden for model {self.model!r} is the one width of the dense bottleneck, "
                             f"got {self.hidden}")
        if self.model in ("dense", "second-stage") and self.channels is not None:
            raise ValueError(f"TrainConfig.channels is for the conv and resnet models, not {self.model!r}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"TrainConfig.device: {error}") from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = {k: v for k, v in values.items() if k != "auto"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        return cls(**values)

    def save(self, path: str | Path, *, auto: dict | None = None) -> None:
        """Write the config as JSON; ``auto`` (what the auto choices measured) goes under the key ``"auto"``,
        which ``load`` skips."""
        from .checkpoint import save_atomic_bytes

        values = self.to_dict() if auto is None else {**self.to_dict(), "auto": auto}
        save_atomic_bytes((json.dumps(values, indent=2) + "\n").encode(), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            values = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a TrainConfig JSON file ({error})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: not a TrainConfig JSON file (a {type(values).__name__}, not an object)")
        return cls.from_dict(values)


def _check_field(f: dataclasses.Field, value, config: TrainConfig) -> None:
    """Type, choices and minimum of one field, from its metadata."""
    kind, name = f.metadata["kind"], f"TrainConfig.{f.name}"
    if value is None and f.default is None:
        return
    if kind is list:
        if isinstance(value, tuple):
            value = list(value)
            setattr(config, f.name, value)
        if not isinstance(value, list) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ValueError(f"{name} must be a non-empty list of positive ints, got {value!r}")
        maximum = f.metadata["maximum"]
        if maximum is not None and max(value) > maximum:
            raise ValueError(f"{name}: each entry must be at most {maximum}, got {max(value)}")
        return
    if kind is bool and not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if kind is str and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    minimum = f.metadata["minimum"]
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value}")
    maximum = f.metadata["maximum"]
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")

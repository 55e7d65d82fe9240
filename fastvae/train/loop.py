"""``fit(model, data, config)``: the training loop, read top to bottom.

``fit`` checks its arguments, locks the run folder, builds a ``_Run`` (device, optimizer, schedule, resume) and
runs ``_Run.train_step`` over each epoch's batches, then ``_Run.end_of_epoch`` (evaluation, grids, callbacks,
checkpoint). The data is one in-memory tensor (the fast default: float, or uint8 converted per batch on the device)
sliced along a seeded permutation, or a ``Dataset``/``DataLoader``/iterable of batches streamed through
``fastvae.data.BatchStream``. A step adds the gradients of ``grad_accumulation`` batches; ``ema`` keeps an average
of the weights beside them. Losses stay on the device in a small window read once per ``log_every`` steps (and before
each checkpoint, so that a non-finite loss never reaches a checkpoint). A Ctrl-C (SIGINT), SIGTERM, SIGHUP or
SIGUSR1 (what Slurm, Kubernetes and a dropped ssh send) lets the running step finish, writes a checkpoint at that
step and raises ``TrainingInterrupted``; under ``torchrun`` the ranks agree on that step at a log row, where a
flag of the signals each rank received travels with the window's all-reduce. Under ``torchrun`` the objective
trains under DDP, each rank takes its shard of every permutation, and only rank 0 writes files. While it
trains, subnormal floats are flushed to zero on the CPU (``flush_denormal``, ``denormals.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._util import derive_seed, eval_mode
from ..data import BatchStream, to_float
from ..losses import build_loss
from . import graphs
from .calibrate import PrecisionChoice, calibrate_precision
from .checkpoint import (CHECKPOINT, PREVIOUS, load_run_checkpoint, repair_run, rng_state, save_checkpoint,
                         set_rng_state)
from .config import TrainConfig
from .denormals import flushed_denormals
from .devices import resolve_device
from .log import MetricsLog
from .objective import TrainObjective
from .runfolder import empty_folder, make_folder, run_lock, unique_folder
from .schedule import DeviceLR

__all__ = ["TrainResult", "NonFiniteLossError", "TrainingInterrupted", "fit", "evaluate", "epoch_permutation"]

_TERMS = ("total loss", "reconstruction", "KL")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN or infinite loss; the message names the step and the loss term."""


class TrainingInterrupted(KeyboardInterrupt):
    """A stop signal (``signum``: SIGINT, SIGTERM, SIGHUP or SIGUSR1) stopped training after a checkpoint at
    ``step`` was written into ``out_dir``."""

    def __init__(self, out_dir: Path, step: int, signum: int = signal.SIGINT):
        name = signal.Signals(signum).name
        super().__init__(f"interrupted at step {step} ({name}); checkpoint written to {out_dir / CHECKPOINT}")
        self.out_dir, self.step, self.signum = out_dir, step, int(signum)


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


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of the ``n`` training samples in ``epoch``: a CPU permutation from a generator seeded with
    ``derive_seed(seed, epoch)``, so that a resumed run and every rank draw the same one."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))


def fit(model: nn.Module, data, config: TrainConfig | None = None, *, test_data=None,
        callbacks: Iterable[Callable] | None = None, resume: bool = False,
        transform: Callable[[Tensor], Tensor] | None = None) -> TrainResult:
    """Train ``model`` on ``data`` as ``config`` says (see ``fastvae.train``); returns a ``TrainResult``.

    ``data`` (and ``test_data``): a tensor of samples ``(N, ...)`` (float in [0, 1], or uint8 images divided by 255
    per batch on the device) or an ``(images, labels)`` pair, kept on the device; or a ``Dataset`` (batched here in
    the tensor path's seeded order), a ``DataLoader`` or any re-iterable of batches with a ``len()``, streamed (a
    batch is a tensor, an ``(images, labels, ...)`` tuple or a dict with ``pixel_values``). ``transform`` runs on
    every training batch on the device (augmentation); evaluation sees the data as it is.

    Seeds torch's generators with ``config.seed`` (``derive_seed(config.seed, rank)`` on each rank of a
    distributed run) for the reparameterization noise; the model arrives initialized. Raises
    ``NonFiniteLossError`` on a NaN or infinite loss, ``FileExistsError`` when ``config.out``
    already holds a run (unless ``resume`` or ``config.overwrite``), ``RunFolderBusy`` when another process
    writes into it, ``TrainingInterrupted`` after a Ctrl-C, ValueError/TypeError on bad arguments.
    """
    config = (config or TrainConfig()).validate()
    images, test_images, callbacks = _check_arguments(model, data, test_data, callbacks, config)
    if transform is not None and not callable(transform):
        raise TypeError(f"fit: transform must be a function of a batch, got {type(transform).__name__}")
    rank, world = _distributed()
    out = _out_folder(config, rank, world)
    with (run_lock(out, "fastvae train") if rank == 0 else contextlib.nullcontext(out)):
        _prepare_folder(out, config, resume, rank)
        # a stop signal during the set-up (the precision's calibration, a resume) is acted on after the first step
        with flushed_denormals(config.flush_denormal), _deferred_interrupt() as received:
            run = _Run(model, images, test_images, config, out, callbacks, rank, world, resume, transform)
            run.received = received
            try:
                while run.epoch < config.epochs and not run.stopped:
                    run.train_epoch(run.interrupted)
            finally:
                run.close()
    return TrainResult(out, run.step, run.epoch, run.train_metrics, run.test_metrics, run.policy)


class _Run:
    """The state of one training run between steps: model, optimizer, schedule, window of losses, position."""

    def __init__(self, model, images, test_images, config: TrainConfig, out: Path, callbacks, rank, world, resume,
                 transform=None):
        self.device = device = resolve_device(config.device)
        self.config, self.out, self.callbacks, self.rank, self.world = config, out, callbacks, rank, world
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.precision == "fp16" and device.type != "cuda":
            raise ValueError("TrainConfig.precision fp16 needs CUDA (a GradScaler); use bf16 on the CPU")
        self.graphs = graphs.StepGraphs(config.cuda_graphs, device, world=world, precision=config.precision,
                                        compile=config.compile, batch_size=config.batch_size)
        # one process draws from config.seed itself; each rank of a distributed run from its own derived seed
        noise_seed = config.seed if world == 1 else derive_seed(config.seed, rank)
        torch.manual_seed(noise_seed)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.manual_seed(noise_seed)
            torch.backends.cudnn.benchmark = True
        self.transform = transform
        self.input_shape = tuple(model.input_shape) if hasattr(model, "input_shape") else None
        # data: in-memory tensors on the device (self.images), or streams (self.stream) read batch by batch
        self.stream = images if isinstance(images, BatchStream) else None
        self.images = images.to(device) if self.stream is None else None
        self.test_stream = test_images if isinstance(test_images, BatchStream) else None
        self.test_images = test_images.to(device) if isinstance(test_images, Tensor) else None
        self.train_subset: Tensor | None = None  # a stream's first 2048 samples, read once for the evaluation
        image_like = (images.dim() == 4 if self.stream is None
                      else self.input_shape is not None and len(self.input_shape) == 3)
        self.channels_last = device.type == "cuda" and image_like
        self.model = model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.policy = build_loss(config.loss, momentum=config.gamma_momentum, rule=config.gamma_rule).to(device)
        self.objective = TrainObjective(model, self.policy, kl_weight=config.kl_weight, kl=config.kl,
                                        sampling=config.sampling, compile=config.compile)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = _optimizer(self.params, config, device)
        # a step takes grad_accumulation batches; in memory, it covers the samples of one batch that much larger
        N = config.grad_accumulation
        if self.stream is None:
            self.per_rank = images.shape[0] // world
            self.steps_per_epoch = (self.per_rank // (config.batch_size * N) if config.drop_last
                                    else math.ceil(self.per_rank / (config.batch_size * N)))
            self.batches_per_epoch = (self.steps_per_epoch * N if config.drop_last
                                      else math.ceil(self.per_rank / config.batch_size))
        else:
            self.per_rank = None
            self.batches_per_epoch = self.stream.batches_per_epoch
            self.steps_per_epoch = math.ceil(self.batches_per_epoch / N)
        if self.steps_per_epoch == 0:
            raise ValueError(f"fit: drop_last with batch_size {config.batch_size} x grad_accumulation {N} leaves no "
                             f"step of {self.per_rank} samples per rank")
        self.ema = _EMA(model, config.ema) if config.ema else None
        total = config.epochs * self.steps_per_epoch
        self.precision_choice: PrecisionChoice | None = None
        if config.precision == "auto":
            config = self.config = dataclasses.replace(config, precision=self._measure_precision(total))
        self.scheduler = DeviceLR(self.optimizer, config.lr, warmup=config.warmup_steps, total=total,
                                  schedule=config.lr_schedule, device=device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.step = self.epoch = self.start_batch = 0
        self.last_checkpoint: int | None = None
        if resume:
            self._resume()
        self.train_module: nn.Module = self.objective
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.objective, device_ids=ids)
        self.log = self.bar = None
        if rank == 0:
            config.save(out / "config.json", auto={"precision": dataclasses.asdict(self.precision_choice)}
                        if self.precision_choice is not None else None)
            self.log = MetricsLog(out, keep_until_step=self.step if resume else None,
                                  tensorboard=config.tensorboard is not False)
            if config.progress and sys.stderr.isatty():
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True)
        self.window = torch.zeros(config.log_every, 4, device=device)  # (loss, rec, kl, mse) per step
        # the window's next row: a device index that the step advances (a CUDA graph replays it), and its host copy
        self.slot_index = torch.zeros(1, dtype=torch.int64, device=device)
        self.slot, self.stopped = 0, False
        self.received: Callable[[], int] = lambda: 0  # the stop signal this process received (0: none)
        self.agreed_signal = 0  # under DDP: the stop signal the ranks agreed on at the last read of the window
        self.train_metrics: dict = {}
        self.test_metrics: dict = {}
        self.started = self.window_start = time.perf_counter()

    def _measure_precision(self, total_steps: int) -> str:
        """What ``precision="auto"`` stands for: timed on rank 0 over real steps of this model and batch
        (``calibrate.py``), shared with the other ranks, printed in one line. The steps timed are eager even under
        ``compile``: compiling a copy for each candidate would cost more than the calibration may."""
        choice = [None]
        if self.rank == 0:
            config = self.config
            describe = {"model": getattr(self.model, "spec", type(self.model).__name__), "loss": config.loss,
                        "kl": config.kl, "sampling": config.sampling, "compile": config.compile, "world": self.world}
            # a loader is read for it (one batch of a pass of its own): a Dataset's first items, or the tensor's;
            # not through the transforms hook, which may draw from the generators the run's results depend on
            batch = (self.images[:config.batch_size] if self.stream is None
                     else self.stream.head(config.batch_size).to(self.device))
            eager = TrainObjective(self.model, self.policy, kl_weight=config.kl_weight, kl=config.kl,
                                   sampling=config.sampling)
            choice[0] = calibrate_precision(eager, lambda params: _optimizer(params, config, self.device),
                                            to_float(batch), self.device, run_steps=total_steps, describe=describe)
            if config.progress:
                print(f"fastvae: {choice[0].message()}")
        if self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        self.precision_choice = choice[0]
        return choice[0].precision

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # a CUDA graph cannot keep autocast's cache of cast weights (it would be freed after the capture)
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not self.graphs.enabled)

    # ------------------------------------------------------------------------------------------ the epoch
    def train_epoch(self, interrupted: Callable[[], bool]) -> None:
        config = self.config
        epoch_start = time.perf_counter()
        for b, batches in enumerate(self.epoch_steps(), start=self.start_batch):
            self.train_step(batches)
            at_checkpoint = bool(config.checkpoint_every) and self.step % config.checkpoint_every == 0
            self.stopped = bool(config.max_steps) and self.step >= config.max_steps
            if self.slot == config.log_every or self.stopped:
                self.flush()
            for callback in self.callbacks if self.rank == 0 else ():
                callback(model=self.model, step=self.step, epoch=self.epoch, out_dir=self.out,
                         metrics=self.train_metrics, epoch_end=False, config=config)
            mid_epoch = b + 1 < self.steps_per_epoch
            if mid_epoch and (at_checkpoint or self.stopped or interrupted()):
                self.save_checkpoint(self.epoch, b + 1)
                if interrupted():
                    raise TrainingInterrupted(self.out, self.step, interrupted())
                if self.stopped:
                    return
        self.end_of_epoch(time.perf_counter() - epoch_start)
        if interrupted():
            raise TrainingInterrupted(self.out, self.step, interrupted())

    def interrupted(self) -> int:
        """The stop signal to act on now (0: none): this process's, or under DDP the one all ranks agreed on."""
        return self.received() if self.world == 1 else self.agreed_signal

    def epoch_steps(self):
        """This epoch's steps from ``start_batch`` on, each a list of ``grad_accumulation`` inputs (fewer at the
        epoch's end): device index slices of the seeded permutation into the in-memory images (the fast default;
        the step gathers them on the device), or the stream's batches, moved to the device."""
        config, B, N = self.config, self.config.batch_size, self.config.grad_accumulation
        if self.stream is None:
            order = epoch_permutation(self.images.shape[0], config.seed, self.epoch)
            # copied to the device once per epoch; each step takes its slices there
            order = order[self.rank::self.world][:self.per_rank].to(self.device)
            inputs = (order[b * B:(b + 1) * B] for b in range(self.start_batch * N, self.batches_per_epoch))
        else:
            inputs = (self._stream_batch(x) for x in self.stream.epoch(self.epoch, self.start_batch * N))
        step: list[Tensor] = []
        for item in inputs:
            step.append(item)
            if len(step) == N:
                yield step
                step = []
        if step:
            yield step

    def _stream_batch(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        check_sample_shape(x.shape[1:], self.input_shape, "data")
        return x

    def _batch(self, item: Tensor) -> Tensor:
        """A step input as the model's batch: gathered from the in-memory images by its device indices (or a
        stream's batch as it is), as float, through the transforms hook, channels_last on CUDA."""
        x = to_float(self.images.index_select(0, item) if self.stream is None else item)
        if self.transform is not None:
            x = self.transform(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_step(self, inputs: list[Tensor]) -> None:
        """One optimizer step on ``inputs`` (``epoch_steps``): a replay of the captured step when CUDA graphs are
        on (after the warm-up), else ``step_body`` itself. Its losses go to the window, unread."""
        self.graphs.run(self.step_body, inputs)
        self.step += 1
        self.slot += 1

    def step_body(self, inputs: list[Tensor]) -> None:
        """The whole step, device work only (what a CUDA graph captures): the summed gradients of its batches
        (each batch's loss weighted by its share of the samples, so the step is that of one batch of them all),
        the optimizer, the EMA, the rate of the next step, the losses into the window's next row."""
        self.optimizer.zero_grad(set_to_none=True)
        batches = [self._batch(item) for item in inputs]
        total = sum(x.shape[0] for x in batches)
        terms = []
        for i, x in enumerate(batches):
            last = i == len(batches) - 1
            with (self.train_module.no_sync() if self.world > 1 and not last else contextlib.nullcontext()):
                with self.autocast():
                    loss, rec, kl, mse = self.train_module(x)
                if len(batches) > 1:
                    share = x.shape[0] / total
                    loss, rec, kl, mse = loss * share, rec * share, kl * share, mse * share
                self.scaler.scale(loss).backward()
            terms.append((loss.detach().float(), rec.detach().float(), kl.detach().float(), mse.detach().float()))
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.config.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        with torch.no_grad():
            row = torch.stack(terms[0]) if len(terms) == 1 else torch.stack([torch.stack(t) for t in terms]).sum(0)
            self.window.index_copy_(0, self.slot_index, row.unsqueeze(0))
            self.slot_index.add_(1)

    def end_of_epoch(self, epoch_time: float) -> None:
        """Log the window, evaluate, draw the grids, call the callbacks and write the checkpoint."""
        self.flush()
        self.epoch += 1
        self.start_batch = 0
        config = self.config
        if self.rank == 0:
            eval_images, grid_images = self.evaluation_data()
            metrics = evaluate(self.model, self.policy, eval_images, kl_weight=config.kl_weight, kl=config.kl,
                               sampling=config.sampling, batch_size=config.eval_batch_size, seed=config.seed,
                               autocast=self.autocast)
            has_test = self.test_images is not None or self.test_stream is not None
            self.test_metrics = {"split": "test" if has_test else "train-subset",
                                 "epoch": self.epoch, "step": self.step, **metrics, "epoch_time_s": epoch_time,
                                 "time_s": time.perf_counter() - self.started}
            self.log.write(self.test_metrics)
            shape = tuple(self.model.input_shape) if hasattr(self.model, "input_shape") else grid_images.shape[1:]
            if len(shape) == 3 and shape[0] in (1, 3) and (
                    self.epoch % config.images_every == 0 or self.epoch == config.epochs):
                _grids(self.model, grid_images, self.out, self.epoch, config, self.autocast)
            if config.progress:
                self._print_epoch(epoch_time)
            for callback in self.callbacks:
                callback(model=self.model, step=self.step, epoch=self.epoch, out_dir=self.out,
                         metrics=self.test_metrics, epoch_end=True, config=config)
        self.save_checkpoint(self.epoch, 0)
        if self.world > 1:
            dist.barrier()
        self.stopped = bool(config.max_steps) and self.step >= config.max_steps

    def evaluation_data(self):
        """What the end-of-epoch evaluation reads (the test data, else the first 2048 training samples: a tensor,
        or the test stream's batches) and the images of the grids (its first 32), on the device."""
        if self.test_stream is not None:
            batches = (x.to(self.device) for x in self.test_stream.epoch(0))
            return batches, self.test_stream.head(32).to(self.device)
        if self.test_images is not None:
            return self.test_images, self.test_images[:32]
        if self.stream is not None:
            if self.train_subset is None:
                self.train_subset = self.stream.head(2048).to(self.device)
            return self.train_subset, self.train_subset[:32]
        return self.images[:2048], self.images[:32]

    # ------------------------------------------------------------------------------------------ the window
    def _read_window(self) -> Tensor:
        """Sums of the window's rows and a non-finite flag, over all ranks; stops on a non-finite loss."""
        rows = self.window[:self.slot].double()
        stats = torch.cat([rows.sum(0), (~torch.isfinite(rows[:, :3])).any().double().reshape(1)])
        if self.world > 1:
            received = torch.tensor([float(self.received() == s) for s in STOP_SIGNALS],
                                    dtype=stats.dtype, device=stats.device)
            stats = torch.cat([stats, received])
            dist.all_reduce(stats)
            agreed = [s for s, count in zip(STOP_SIGNALS, stats[5:].tolist()) if count > 0]
            self.agreed_signal = int(agreed[0]) if agreed else 0
        if stats[4] > 0:
            first = self.step - self.slot + 1
            message = (_non_finite_message(rows, first, self.epoch, self.out / CHECKPOINT, self.last_checkpoint)
                       if not bool(torch.isfinite(rows[:, :3]).all()) else
                       f"non-finite loss on another rank between steps {first} and {self.step}; training stopped")
            raise NonFiniteLossError(message)
        return stats

    def flush(self) -> None:
        """Read the window once: stop on a non-finite loss, else log the means as a training row."""
        if self.slot == 0:
            return
        stats = self._read_window()
        self.graphs.decide()  # auto: keep the graph only when its replays measured faster than eager steps
        now = time.perf_counter()
        loss, rec, kl, mse = (stats[:4] / (self.slot * self.world)).tolist()
        gamma = self.policy.gamma
        self.train_metrics = {
            "split": "train", "epoch": self.epoch + 1, "step": self.step, "loss": loss, "rec": rec, "kl": kl,
            "mse": mse, "gamma": float(gamma) if gamma is not None else None, "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": self.slot * self.config.batch_size * self.world / max(now - self.window_start, 1e-9),
            "time_s": now - self.started}
        if self.log is not None:
            self.log.write(self.train_metrics)
        if self.bar is not None:
            postfix = {k: f"{self.train_metrics[k]:.4g}" for k in ("loss", "rec", "kl")}
            if gamma is not None:
                postfix["gamma"] = f"{float(gamma):.4g}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.set_description(f"epoch {self.epoch + 1}/{self.config.epochs}", refresh=False)
            self.bar.update(self.step - self.bar.n)
        self.slot, self.window_start = 0, now
        self.slot_index.zero_()

    # ------------------------------------------------------------------------------------------ files
    def save_checkpoint(self, epoch: int, batch: int) -> None:
        """Write the checkpoint at (``epoch``, ``batch``) after checking the unread losses are finite."""
        if self.slot:
            self._read_window()
        rngs = [rng_state(self.device)]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state(self.device))
        if self.rank == 0:
            save_checkpoint({
                "format": 1, "model": self.model.state_dict(), "model_spec": getattr(self.model, "spec", None),
                "loss": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": [{k: v.cpu() for k, v in r.items()} for r in rngs], "epoch": epoch, "batch": batch,
                "step": self.step, "steps_per_epoch": self.steps_per_epoch, "config": self.config.to_dict(),
                **({"ema": self.ema.state_dict(self.model)} if self.ema is not None else {}),
            }, self.out)
        self.last_checkpoint = self.step

    def _resume(self) -> None:
        if self.rank == 0:  # under the run's lock: finish or undo a save that a killed process left half done
            for line in repair_run(self.out):
                print(f"fastvae: repaired {line}", file=sys.stderr)
        if self.world > 1:
            dist.barrier()
        state = load_run_checkpoint(self.out, map_location=self.device,
                                    on_fallback=lambda m: print(f"fastvae: {m}", file=sys.stderr))
        if len(state["rng"]) != self.world:
            raise ValueError(f"fit: the checkpoint was written by {len(state['rng'])} ranks, this run has "
                             f"{self.world}; resume with the same number of processes")
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"fit: the checkpoint has {state['steps_per_epoch']} steps per epoch, this run "
                             f"{self.steps_per_epoch}; resume with the same data, batch_size and drop_last")
        self.model.load_state_dict(state["model"])
        self.policy.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(self.model, state.get("ema"))
        set_rng_state(state["rng"][self.rank], self.device)
        self.step, self.epoch, self.start_batch = state["step"], state["epoch"], state["batch"]
        self.last_checkpoint = self.step

    def _print_epoch(self, epoch_time: float) -> None:
        m = self.test_metrics
        gamma = "" if m["gamma"] is None else f", gamma {m['gamma']:.4g}"
        line = (f"epoch {self.epoch}/{self.config.epochs}: {m['split']} loss {m['loss']:.4g}, rec {m['rec']:.4g}, "
                f"KL {m['kl']:.4g}, MSE {m['mse']:.4g}{gamma} ({epoch_time:.1f} s)")
        (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


class _EMA:
    """An exponential moving average of the model's floating parameters, on their device:
    ``ema = decay * ema + (1 - decay) * p`` after every optimizer step (one ``_foreach_lerp_``). Its state_dict is
    the model's with the averaged parameters in place of the trained ones (buffers as trained)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.dtype.is_floating_point]
        self.params = [p for p in model.parameters() if p.dtype.is_floating_point]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self.average, self.params, 1.0 - self.decay)

    def state_dict(self, model: nn.Module) -> dict:
        state = model.state_dict()
        state.update({name: value.detach().clone() for name, value in zip(self.names, self.average)})
        return state

    @torch.no_grad()
    def load_state_dict(self, model: nn.Module, state: dict | None) -> None:
        if state is None:
            raise ValueError("fit: ema is set but the checkpoint holds no EMA weights; resume with the run's own "
                             "config (ema is fixed when a run starts)")
        for name, average in zip(self.names, self.average):
            average.copy_(state[name])


# ---------------------------------------------------------------------------------------------- set-up
def _check_arguments(model, data, test_data, callbacks, config: TrainConfig):
    if not (callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))):
        raise TypeError(f"fit: model must have encode(x) -> (mu, logvar) and decode(z) -> x_hat, "
                        f"got {type(model).__name__}")
    rank, world = _distributed()
    images = _as_data(data, "data", config, rank, world, train=True)
    test_images = _as_data(test_data, "test_data", config, rank, world, train=False) if test_data is not None else None
    input_shape = _input_shape(model, images)
    for name, source in (("data", images), ("test_data", test_images)):
        # a loader is only read when training: its first pass may be the user's epoch 0
        sample = (source.dataset_sample() if isinstance(source, BatchStream) else source[0]
                  if source is not None else None)
        if sample is not None:
            check_sample_shape(sample.shape, input_shape, name)
    callbacks = list(callbacks or [])
    if not all(callable(cb) for cb in callbacks):
        raise TypeError("fit: callbacks must be callables")
    if config.tensorboard:
        _require_tensorboard()
    if isinstance(images, Tensor) and config.limit:
        images = images[:config.limit]
    if world > 1 and isinstance(images, Tensor) and images.shape[0] < world:
        raise ValueError(f"fit: {images.shape[0]} samples cannot be shared among {world} ranks")
    return images, test_images, callbacks


def _input_shape(model: nn.Module, data) -> tuple | None:
    """What the model takes: its ``input_shape``, else the data's sample shape (None: a loader's, known later)."""
    if hasattr(model, "input_shape"):
        return tuple(model.input_shape)
    sample = data.dataset_sample() if isinstance(data, BatchStream) else data[0]
    return tuple(sample.shape) if sample is not None else None


def check_sample_shape(shape, input_shape: tuple | None, name: str) -> None:
    if input_shape is not None and tuple(shape) != input_shape:
        raise ValueError(f"fit: {name} has samples of shape {tuple(shape)} but the model takes {input_shape}")


def _require_tensorboard() -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception as error:  # not installed (ModuleNotFoundError), or installed but broken
        raise ValueError(f"tensorboard=True (--tensorboard) but TensorBoard does not import ({error}); "
                         "pip install tensorboard, or train with --no-tensorboard") from None


def _as_data(data, name: str, config: TrainConfig, rank: int, world: int, *, train: bool):
    """An in-memory tensor of samples (checked), or a ``BatchStream`` over a Dataset, DataLoader or iterable."""
    if isinstance(data, Tensor) or _is_pair(data):
        return _as_images(data, name)
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__") and not hasattr(data, "__getitem__"):
        raise TypeError(f"fit: {name} must be a tensor of samples (N, ...), an (images, labels) pair, a Dataset, a "
                        f"DataLoader or an iterable of batches, got {type(data).__name__}")
    if train:
        def order(n: int, epoch: int) -> Tensor:
            return epoch_permutation(n, config.seed, epoch)[rank::world][:n // world]
        return BatchStream(data, batch_size=config.batch_size, drop_last=config.drop_last, order=order,
                           limit=config.limit, name=name)
    return BatchStream(data, batch_size=config.eval_batch_size, name=name)


def _is_pair(data) -> bool:
    """``(images, labels)``: samples and one label each (or None); a list of two batches is a stream, not a pair."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)):
        return False
    labels = data[1]
    return labels is None or (isinstance(labels, Tensor) and labels.dim() == 1 and data[0].dim() >= 2
                              and labels.shape[0] == data[0].shape[0])


def _as_images(data, name: str) -> Tensor:
    if _is_pair(data):
        data = data[0]
    if not (data.dtype.is_floating_point or data.dtype == torch.uint8):
        raise TypeError(f"fit: {name} must be floating (images scaled to [0, 1]) or uint8 images (0-255), got "
                        f"{data.dtype}; see fastvae.data.as_images")
    if data.dim() < 2 or data.shape[0] == 0:
        raise ValueError(f"fit: {name} must be a non-empty batch (N, ...), got shape {tuple(data.shape)}")
    finite = torch.isfinite(data).flatten(1).all(dim=1) if data.dtype.is_floating_point else None
    if finite is not None and not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"fit: {name} holds NaN or infinite values in {bad.numel()} sample(s), the first at index "
                         f"{int(bad[0])}; clean the data before training")
    return data


def _out_folder(config: TrainConfig, rank: int, world: int) -> Path:
    """``config.out``, or a new unique ``runs/fit-TIME`` (named on rank 0 and shared)."""
    if config.out is not None:
        return Path(config.out)
    name = [str(unique_folder(Path("runs") / f"fit-{time.strftime('%Y%m%d-%H%M%S')}")) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _prepare_folder(out: Path, config: TrainConfig, resume: bool, rank: int) -> None:
    """Refuse to train over a run unless resuming or overwriting; an overwrite starts from an empty folder."""
    has_run = (out / CHECKPOINT).is_file() or (out / PREVIOUS).is_file()
    if resume and not has_run:
        raise FileNotFoundError(f"fit: resume=True but {out / CHECKPOINT} does not exist")
    if not resume and has_run and not config.overwrite:
        raise FileExistsError(f"fit: {out} already holds a run ({CHECKPOINT}); resume it, pass overwrite=True "
                              "(--overwrite) or choose another out folder")
    if rank == 0:
        make_folder(out)
        if not resume and config.overwrite and (has_run or (out / "config.json").is_file()):
            empty_folder(out)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _optimizer(params: list, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam with a tensor learning rate on ``device`` (``DeviceLR`` writes it), fused where torch has it for the
    device (CUDA, CPU), else the foreach implementation; capturable on CUDA (its step count stays on the GPU)."""
    kwargs = dict(lr=torch.tensor(config.lr, dtype=torch.float32, device=device), weight_decay=config.weight_decay,
                  capturable=device.type == "cuda")
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


@contextlib.contextmanager
def _deferred_interrupt():
    """While training, the first of ``STOP_SIGNALS`` only records its number, which the loop reads between steps
    (so it can write a checkpoint at that step); a second one interrupts at once. Yields ``received() -> int``
    (0 until a signal came). Off the main thread, where Python cannot take signals, nothing is installed."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield lambda: received[0] if received else 0
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


# ---------------------------------------------------------------------------------------------- evaluation
def _grids(model: nn.Module, test_images: Tensor, out: Path, epoch: int, config: TrainConfig, autocast) -> None:
    """A grid of samples (the same ``z`` every epoch) and a grid of test images over their reconstructions."""
    from .grid import image_grid

    images = make_folder(out / "images")
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad(), autocast():
        samples = model.sample(config.n_samples, generator=generator)
        x = to_float(test_images[:32])
        recon = model.decode(model.encode(x)[0])
    image_grid(samples.float(), images / f"samples-epoch{epoch:03d}.png")
    image_grid(torch.cat([x[:16], recon[:16].float(), x[16:32], recon[16:32].float()]),
               images / f"recon-epoch{epoch:03d}.png", nrow=min(16, x.shape[0]))


@torch.no_grad()
def evaluate(model: nn.Module, policy: nn.Module, images, *, kl_weight: float = 1.0, kl: str = "full",
             sampling: bool = True, batch_size: int = 1000, seed: int = 0, autocast=contextlib.nullcontext) -> dict:
    """Loss, reconstruction, KL term (per sample) and MSE (per element) of ``images`` in eval mode, under the
    objective the run trains with (``TrainObjective`` with ``kl_weight``, ``kl``, ``sampling``), the
    reparameterization noise of batch ``k`` seeded with ``derive_seed(seed, k)`` (the same every call); gamma of
    ``policy`` as it stands. ``images``: a tensor (float, or uint8 converted per batch) cut into ``batch_size``
    batches, or an iterable of batches."""
    objective = TrainObjective(model, policy, kl_weight=kl_weight, kl=kl, sampling=sampling)
    batches = ((images[start:start + batch_size] for start in range(0, images.shape[0], batch_size))
               if isinstance(images, Tensor) else images)
    totals, count = 0.0, 0
    with eval_mode(model, policy):
        for k, x in enumerate(batches):
            x = to_float(x)
            with autocast():
                terms = objective(x, derive_seed(seed, k))
            totals = totals + torch.stack([t.double() for t in terms]) * x.shape[0]
            count += x.shape[0]
    loss, rec, kl_term, mse = (totals / count).tolist()
    gamma = policy.gamma
    return {"loss": loss, "rec": rec, "kl": kl_term, "mse": mse, "gamma": float(gamma) if gamma is not None else None}


def _non_finite_message(window: Tensor, first_step: int, epoch: int, checkpoint: Path, last_good: int | None) -> str:
    finite = torch.isfinite(window[:, :3])
    row = int((~finite.all(dim=1)).nonzero()[0])
    bad = [(_TERMS[j], float(window[row, j])) for j in range(3) if not bool(finite[row, j])]
    if len(bad) > 1 and bad[0][0] == "total loss":
        bad = bad[1:]
    terms = " and ".join(f"the {name} term is {value}" for name, value in bad)
    kept = (f"the last good checkpoint {checkpoint} (step {last_good}) is left in place" if last_good is not None
            else "no checkpoint had been written yet")
    return f"non-finite loss at step {first_step + row} (epoch {epoch + 1}): {terms}; training stopped, {kept}"

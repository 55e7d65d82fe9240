"""``TrainConfig.precision="auto"`` decided by measurement: real training steps of the run's own model and batch,
timed on this machine under each candidate precision, the fastest kept, the decision cached.

Which precision is faster depends on the machine, the model and the batch, not on the CPU's flags: bf16 autocast
speeds a dense VAE up on an AMD EPYC with AVX512-BF16 and slows the same step down by 7-13% on an Intel Xeon with
AMX (cast and dispatch overhead around tiny GEMMs). So ``calibrate_precision`` times both:

- the step is the training step itself (zero_grad, forward under autocast, backward, Adam), run on deep copies of
  the objective and a fresh optimizer, so the run's weights, optimizer state, running MSE and random streams are
  exactly as they would be without the calibration (the RNG states are restored afterwards);
- each candidate runs ``WARMUP`` steps, then ``ROUNDS`` rounds of ``STEPS`` timed steps, the candidates taking
  turns (A B B A ...) so that a load change on the machine hits both; the per-step median of the rounds counts;
- a candidate whose loss is not finite is dropped; bf16 must beat fp32 by ``MARGIN`` to be chosen (fp32 is the
  reference precision: a reduced one has to pay for itself);
- the calibration spends at most ``BUDGET`` of the run's steps; a shorter run trains in fp32 without measuring;
- a measurement taken while the machine was busy is used for this run but never cached: when a candidate's slowest
  round took more than ``NOISE`` times its fastest (other processes took the cores), the next run measures again
  (a conv VAE's calibration beside two other jobs once timed 658 against 757 ms a step for a 25 ms step, and the
  cache would have kept its fp32 for good);
- the decision is cached in ``calibration.json`` under ``cache_dir()`` keyed by the machine (CPU model, ISA flags,
  cores, torch threads, torch version), the device, the model's spec, the batch's shape and the objective, and
  reused by every later run with the same key.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..cache import cache_dir
from ..machine import describe_machine

__all__ = ["PrecisionChoice", "calibrate_precision", "candidate_precisions", "cache_dir", "WARMUP", "ROUNDS", "STEPS",
           "MARGIN", "BUDGET", "NOISE"]

WARMUP, ROUNDS, STEPS = 2, 3, 4  # per candidate: 2 + 3 * 4 = 14 steps
MARGIN = 0.03  # bf16 must be at least 3% faster per step than fp32
NOISE = 1.5  # a candidate's slowest round over its fastest beyond which the machine was busy: not cached
BUDGET = 0.03  # at most 3% of the run's steps


@dataclass
class PrecisionChoice:
    """What ``auto`` chose and why: ``how`` is ``measured``, ``busy`` (measured, not cached: the rounds varied by
    ``spread``, the slowest round over the fastest), ``cached``, ``too-short`` or ``only`` (one candidate);
    ``ms_per_step`` the median step time of each candidate (empty when nothing was measured)."""

    precision: str
    how: str
    ms_per_step: dict
    steps: int = 0
    key: str = ""
    date: str = ""
    spread: float = 1.0

    def message(self) -> str:
        """The one line ``fit`` prints."""
        times = ", ".join(f"{p} {ms:.3g} ms/step" for p, ms in self.ms_per_step.items())
        if self.how == "measured":
            return f"precision auto: {self.precision}, measured on this machine ({times}; {self.steps} steps each)"
        if self.how == "busy":
            return (f"precision auto: {self.precision}, measured on this machine ({times}; {self.steps} steps each) "
                    f"but not cached: step times varied {self.spread:.1f}x between rounds (a busy machine)")
        if self.how == "cached":
            return (f"precision auto: {self.precision}, as measured on {self.date} for this machine, model and batch "
                    f"({times}; cache {cache_dir() / 'calibration.json'})")
        if self.how == "only":
            return f"precision auto: {self.precision}, the only candidate on this device"
        return (f"precision auto: {self.precision}, not measured: the run's {self.steps} steps are too few "
                f"(calibration takes {_calibration_steps(2)} steps, at most {BUDGET:.0%} of a run)")


def candidate_precisions(device: torch.device) -> tuple[str, ...]:
    """fp32 and bf16 autocast (on CUDA only where the GPU supports bf16); fp16 needs a GradScaler and is never
    chosen by ``auto``."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ("fp32",)
    return ("fp32", "bf16") if device.type in ("cpu", "cuda") else ("fp32",)


def _calibration_steps(candidates: int) -> int:
    return candidates * (WARMUP + ROUNDS * STEPS)


def calibrate_precision(objective: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer], batch: Tensor,
                        device: torch.device, *, run_steps: int, describe: dict,
                        timer: Callable[[], float] | None = None) -> PrecisionChoice:
    """The precision ``auto`` stands for in a run of ``run_steps`` steps of ``objective`` (``forward(x) -> (loss,
    ...)``) on batches like ``batch``: cached, measured (see the module's docstring) or fp32 for a short run.
    ``describe`` says what else defines the step (model spec, objective options); ``timer`` is the clock
    (``time.perf_counter`` by default)."""
    candidates = candidate_precisions(device)
    if len(candidates) == 1:
        return PrecisionChoice(candidates[0], "only", {}, 0)
    key = _cache_key(device, batch, describe)
    cached = _read_cache().get(key)
    if cached is not None and cached.get("precision") in candidates:
        return PrecisionChoice(cached["precision"], "cached", cached.get("ms_per_step", {}), cached.get("steps", 0),
                               key, cached.get("date", "?"))
    if _calibration_steps(len(candidates)) > BUDGET * run_steps:
        return PrecisionChoice("fp32", "too-short", {}, run_steps)
    ms, spread = _time_candidates(objective, make_optimizer, batch, device, candidates, timer or time.perf_counter)
    finite = {p: t for p, t in ms.items() if math.isfinite(t)}
    precision = "fp32"
    if "bf16" in finite and ("fp32" not in finite or finite["bf16"] < (1 - MARGIN) * finite["fp32"]):
        precision = "bf16"
    busy = spread > NOISE
    choice = PrecisionChoice(precision, "busy" if busy else "measured", ms, ROUNDS * STEPS, key,
                             time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), round(spread, 3))
    if not busy:
        _write_cache(key, choice)
    return choice


def _time_candidates(objective: nn.Module, make_optimizer, batch: Tensor, device: torch.device,
                     candidates: Sequence[str], timer) -> tuple[dict, float]:
    """``(median ms per step of each candidate (inf where its loss was not finite), the largest slowest-over-fastest
    round of a candidate)``; the RNG states as before."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        steps = {p: _training_step(copy.deepcopy(objective), make_optimizer, batch, device, p) for p in candidates}
        finite = {p: all(math.isfinite(float(step())) for _ in range(WARMUP)) for p, step in steps.items()}
        rounds: dict = {p: [] for p in candidates}
        for r in range(ROUNDS):
            for p in candidates if r % 2 == 0 else reversed(candidates):
                _synchronize(device)
                start = timer()
                losses = [steps[p]() for _ in range(STEPS)]
                _synchronize(device)
                rounds[p].append((timer() - start) / STEPS * 1e3)
                finite[p] = finite[p] and bool(torch.isfinite(torch.stack(losses)).all())
        spread = max(max(r) / min(r) if min(r) > 0 else math.inf for r in rounds.values())
        return {p: statistics.median(rounds[p]) if finite[p] else math.inf for p in candidates}, spread
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _training_step(objective: nn.Module, make_optimizer, batch: Tensor, device: torch.device,
                   precision: str) -> Callable[[], Tensor]:
    """One real training step of (a copy of) the run's objective under ``precision``; returns its detached loss."""
    objective.train()
    optimizer = make_optimizer([p for p in objective.parameters() if p.requires_grad])
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective(batch)[0]
        loss.backward()
        optimizer.step()
        return loss.detach().float()

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- the cache
def _cache_key(device: torch.device, batch: Tensor, describe: dict) -> str:
    machine = describe_machine(str(device))
    fields = {"machine": {k: machine[k] for k in ("kind", "name", "isa", "cores", "torch_threads", "torch")},
              "device": device.type, "batch": [list(batch.shape), str(batch.dtype)], "step": describe}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_cache() -> dict:
    """The cached decisions; an unreadable or foreign file counts as empty (it is only a cache)."""
    try:
        values = json.loads((cache_dir() / "calibration.json").read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def _write_cache(key: str, choice: PrecisionChoice) -> None:
    """Add ``choice`` to the cache, atomically; a folder that cannot be written leaves the decision uncached."""
    entries = _read_cache()
    entries[key] = {k: v for k, v in asdict(choice).items() if k not in ("key", "how")}
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".calibration-")
    except OSError:
        return
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(entries, handle, indent=1, sort_keys=True)
        os.replace(temporary, folder / "calibration.json")
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)

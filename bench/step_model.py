"""Two parts of ``bench/results/static.md`` on paper (predictions, not measurements; ``python -m bench.gpu`` measures
them): the instruction-issue bound of the fused kernels, and a training step in eager mode, under
``torch.compile(mode="reduce-overhead")`` and as one CUDA graph (``fastvae train --cuda-graphs``).

**Issue bound.** A kernel cannot run faster than its instructions issue: with ``I`` SASS instructions per element
(``bench.aot``'s static count over the elements a thread handles, every branch once: an upper bound) on ``n``
elements, ``t_issue = I n / (SMs x 128 x clock)`` (4 schedulers of 32 lanes issue one warp instruction each per
clock). A forward's reduction then ends in its last program reading every partial: ``t_tail = T_LOAD + 4 programs /
(bandwidth / SMs)`` (one round trip, then 4 bytes per program at one SM's share of the bandwidth), with
``programs = ceil(n / (elements_per_thread x 32 x warps))``. The prediction is ``max(t_memory, t_issue) + t_tail``,
where ``t_memory = bytes / bandwidth``.

**A training step.** ``L`` launches (``bench.static.training_step_launches`` plus the device learning rate and
the loss row that ``fit``'s step adds), ``F`` FLOPs (``torch.utils.flop_counter`` on the meta device), ``M``
bytes:

- eager: ``max(L x t_cpu, L x t_gpu + M / bandwidth + F / peak)``;
- reduce-overhead: the model's forward and backward replay as two graphs; the loss, Adam, the rate and the row
  still launch from the host: ``max((2 + L_rest) x t_cpu, L x t_gpu + M / bandwidth + F / peak)`` (inductor's
  fusion of the model's elementwise ops would lower ``L x t_gpu`` and ``M`` further; not modelled);
- CUDA graph: one replay and the copy of the batch's indices: ``max(2 x t_cpu, L x t_gpu + M / bandwidth + F / peak)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .aot import harness as aot


@dataclass(frozen=True)
class Target:
    """One GPU of a compile target: SMs, boost clock (Hz), DRAM bandwidth (B/s), fp32 peak (FLOP/s)."""

    name: str
    sms: int
    clock: float
    bandwidth: float
    fp32: float


TARGETS: dict[int, Target] = {
    75: Target("T4", 40, 1.59e9, 320e9, 8.1e12),
    80: Target("A100 SXM", 108, 1.41e9, 2039e9, 19.5e12),
    86: Target("RTX 3090", 82, 1.70e9, 936e9, 35.6e12),
    89: Target("RTX 4090", 128, 2.52e9, 1008e9, 82.6e12),
    90: Target("H100 SXM", 132, 1.98e9, 3350e9, 67e12),
    120: Target("RTX 5090", 170, 2.41e9, 1792e9, 104.8e12),
}
"""Nominal figures per compile target (vendor data sheets): the GPU each target stands for here."""
LANES_PER_SM_CLOCK = 128
T_LOAD = 0.6e-6
"""One dependent global load round trip (an assumption, as in ``bench.static.fidelity_costs``)."""
ISSUE_ELEMENTS = 10**8
ISSUE_KERNELS = ("reparameterize_kl_fwd_kernel", "reparameterize_kl_bwd_kernel", "balanced_mse_fwd_kernel",
                 "balanced_mse_bwd_kernel")
STEP_MODELS = {"dense": ("DenseVAE", {}, 60000), "conv": ("ConvVAE", {}, 60000), "resnet": ("ResNetVAE", {}, 162770)}
"""Model, arguments, training images per epoch (Fashion-MNIST; CelebA for the ResNet at 64x64)."""
BATCH = 128


def issue_seconds(sass_per_element: float, elements: int, target: Target) -> float:
    return sass_per_element * elements / (target.sms * LANES_PER_SM_CLOCK * target.clock)


def tail_seconds(result: aot.Result, elements: int, target: Target) -> float:
    """One load round trip plus the partials (4 bytes per program) at one SM's share of the bandwidth."""
    per_program = max(1.0, result.elements_per_thread * 32 * max(1, result.num_warps))
    return T_LOAD + math.ceil(elements / per_program) * 4 / (target.bandwidth / target.sms)


def _bytes(result: aot.Result, elements: int) -> int:
    return (result.reads + result.writes) * result.element_size * elements


def issue_section(results: Sequence[aot.Result]) -> list[str]:
    """The issue bound against the memory bound, per kernel, dtype (fp32, fp16) and target, at 1e8 elements."""
    chosen = {}
    for r in results:
        if (r.error is None and r.layout == "aligned" and r.kernel in ISSUE_KERNELS
                and r.dtype in ("float32", "float16") and r.target in TARGETS and r.elements_per_thread):
            chosen.setdefault((r.kernel, r.dtype, r.target), r)
    lines = ["## Instruction issue against memory (predictions, not measurements)", "",
             f"At n = {ISSUE_ELEMENTS:.0e} elements, aligned inputs. SASS/elem from `bench.aot` (static count, an "
             "upper bound); `t_memory = (tensors read + written) x element size x n / bandwidth`; "
             "`t_issue = SASS/elem x n / "
             f"(SMs x {LANES_PER_SM_CLOCK} x clock)` (the static count includes the rare slow paths of `log`/`cos`, so "
             "this issue bound is itself an upper bound); tail (forward reductions) = one load round trip plus the "
             "last program's reads of every partial at one SM's share of the bandwidth. Predicted = max(memory, "
             "issue) + tail; the bound column names the larger.", "",
             "| kernel | dtype | target | SASS/elem | memory us | issue us | tail us | predicted us | bound |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    if not chosen:
        return lines + ["| (no compiled kernels in this run) | | | | | | | | |", ""]
    for (kernel, dtype, target), r in sorted(chosen.items()):
        gpu = TARGETS[target]
        memory = _bytes(r, ISSUE_ELEMENTS) / gpu.bandwidth
        issue = issue_seconds(r.sass_per_element(), ISSUE_ELEMENTS, gpu)
        tail = tail_seconds(r, ISSUE_ELEMENTS, gpu) if "fwd" in kernel else 0.0
        lines.append(f"| `{kernel}` | {dtype} | sm_{target} ({gpu.name}) | {r.sass_per_element():.0f} | "
                     f"{memory * 1e6:,.0f} | {issue * 1e6:,.0f} | {tail * 1e6:,.1f} | "
                     f"{(max(memory, issue) + tail) * 1e6:,.0f} | {'issue' if issue > memory else 'memory'} |")
    return lines + [""]


@dataclass
class StepCost:
    """What one training step of a model costs on paper: launches (all, and those inside the model), bytes, FLOPs."""

    launches: int
    model_launches: int
    bytes: int
    flops: int

    def seconds(self, mode: str, target: Target) -> float:
        from .static import T_CPU_ATEN, T_GPU

        device = self.launches * T_GPU + self.bytes / target.bandwidth + self.flops / target.fp32
        host = {"eager": self.launches, "reduce-overhead": 2 + self.launches - self.model_launches,
                "graphs": 2}[mode]
        return max(host * T_CPU_ATEN, device)


def _fit_extras() -> int:
    """The launches that ``fit``'s step adds to ``training_step_launches``: the device rate and the loss row."""
    from fastvae.train.schedule import DeviceLR

    from .static import TrafficCounter

    meta = torch.device("meta")
    p = torch.nn.Parameter(torch.zeros(2, device=meta))
    schedule = DeviceLR(torch.optim.Adam([p], lr=torch.tensor(1e-3)), 1e-3, warmup=10, total=100, schedule="cosine",
                        device=meta)
    window, slot = torch.zeros(8, 4, device=meta), torch.zeros(1, dtype=torch.int64, device=meta)
    terms = [torch.zeros((), device=meta) for _ in range(4)]
    with TrafficCounter() as counter:
        schedule.step()
        window.index_copy_(0, slot, torch.stack(terms).unsqueeze(0))
        slot.add_(1)
    return len(counter.launches)


def step_cost(name: str) -> StepCost:
    import fastvae.models as models
    from torch.utils.flop_counter import FlopCounterMode

    from .static import TrafficCounter, training_step_launches

    cls, kwargs, _ = STEP_MODELS[name]
    model = getattr(models, cls)(**kwargs)
    step = training_step_launches(BATCH, model=model)
    meta = torch.device("meta")
    traced = getattr(models, cls)(**kwargs).to(meta)
    x = torch.empty(BATCH, *traced.input_shape, device=meta)
    seed = torch.zeros(1, dtype=torch.int64, device=meta)
    with FlopCounterMode(display=False) as flops:
        x_hat, kl = traced(x, seed)
        (x_hat.float().sum() + kl).backward()
    traced.zero_grad(set_to_none=True)  # else the backward below adds into the gradients: one more op per parameter
    with TrafficCounter() as inside:
        x_hat, kl = traced(x, seed)
        (x_hat.sum() + kl).backward()
    model_launches = len(inside.launches) - 3  # less the sum, the add and the backward's seed
    return StepCost(step.total + _fit_extras(), model_launches, step.bytes, flops.get_total_flops())


MODES = ("eager", "reduce-overhead", "graphs")


def step_section() -> list[str]:
    lines = ["## A training step: eager, reduce-overhead compile and one CUDA graph (predictions, not measurements)",
             "", f"Batch {BATCH}, float32, balanced loss, Adam; launches per step: all of them / those inside the "
             "model (what reduce-overhead replays as its two graphs); host launches per step: eager all, "
             "reduce-overhead 2 + the rest, CUDA graph 2 (the replay and the copy of the batch's indices). "
             "Step and epoch times per target; `python -m bench.gpu` measures dense and conv on the machine it "
             "runs on.", ""]
    header = "| model | launches (all / model) | MB/step | GFLOP/step | " + " | ".join(
        f"sm_{t} {g.name}: step us eager / r-o / graph (epoch s)" for t, g in TARGETS.items()) + " |"
    lines += [header, "| --- | ---: | ---: | ---: | " + " | ".join("---" for _ in TARGETS) + " |"]
    for name, (_, _, images) in STEP_MODELS.items():
        cost = step_cost(name)
        steps = math.ceil(images / BATCH)
        cells = []
        for target in TARGETS.values():
            times = [cost.seconds(mode, target) for mode in MODES]
            cells.append(" / ".join(f"{t * 1e6:,.0f}" for t in times) + " (" + " / ".join(
                f"{t * steps:,.2f}" for t in times) + ")")
        lines.append(f"| {name} | {cost.launches} / {cost.model_launches} | {cost.bytes / 1e6:,.1f} | "
                     f"{cost.flops / 1e9:,.2f} | " + " | ".join(cells) + " |")
    return lines + [""]

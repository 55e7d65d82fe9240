"""GPU readiness without a GPU: the machine code of every fused kernel, and a cost model on paper.

Two parts, written to ``bench/results/static.md`` by ``write_static_table``:

1. Machine code (``bench.aot``): every kernel compiled ahead of time for sm_75 ... sm_120 in
   every dtype, with registers, spills, shared memory, 128-bit global accesses and SASS per element.
2. A cost model on paper for each op at a typical size: the bytes it moves and the kernels it launches,
   fused against the eager PyTorch composition of ``bench.cases`` (counted ATen op by ATen op on the meta
   device: every op that computes is one kernel that reads its inputs and writes its outputs, so each
   intermediate is written once and read again), and from those a predicted time

       t = max(launches x t_cpu, launches x t_gpu + bytes / bandwidth)

   (the CPU issues launches while the GPU runs the earlier ones; the slower of the two sets the pace).
   These are predictions. When a GPU run of ``python -m bench`` has left ``bench/results/cuda-*.csv``,
   its measured medians are shown beside them.

    python -m bench.static            # writes bench/results/static.md
"""
from __future__ import annotations

import argparse
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import step_model
from .aot import harness as aot
from .cases import OPS
from .measure import mode_callable
from .report import read_csv

RESULTS = Path(__file__).resolve().parent / "results"
GPUS: dict[str, float] = {"RTX 3090": 936e9, "RTX 4090": 1008e9, "H100 SXM": 3.35e12}
"""Nominal DRAM bandwidth in bytes/s. Kernels reach ~80-90% of it; that scales both sides alike."""
T_CPU_ATEN = 5e-6
"""CPU time to issue one eager ATen op (dispatch, autograd bookkeeping, cudaLaunchKernel): an assumption."""
T_CPU_TRITON = 10e-6
"""CPU time per Triton launch of a fused op (custom-op dispatch and Triton's Python launcher): an assumption."""
T_GPU = 2e-6
"""GPU time a kernel costs beyond its traffic (launch latency, ramp-up, tail): an assumption."""
MODES = ("forward", "backward", "full")
MODEL_DTYPE = torch.float32
HEADLINE_TARGET = 89

# Ops that launch no kernel: allocations and metadata (views are recognized by their schema).
_NO_LAUNCH = frozenset(
    "empty empty_like empty_strided new_empty new_empty_strided lift_fresh lift_fresh_copy detach alias "
    "_local_scalar_dense item is_nonzero result_type set_".split()
)
# In-place ops that overwrite their mutated argument without reading it.
_OVERWRITE = frozenset("normal_ uniform_ bernoulli_ random_ exponential_ fill_ zero_ copy_".split())


# --------------------------------------------------------------------------------------------------
# Traffic of a composition, op by op
# --------------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (an expanded dimension, stride 0, counts once)."""
    return math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0) * t.element_size()


@dataclass
class Launch:
    """One kernel of a composition: the ATen op (or fused custom op) and the bytes it reads and writes."""

    name: str
    read: int
    written: int
    fused: bool = False


class TrafficCounter(TorchDispatchMode):
    """Records each op that computes as a ``Launch`` with the bytes of its tensor inputs and outputs.
    Views and allocations are skipped. A ``fastvae::`` custom op is recorded as one ``fused`` entry
    (its kernels are described by the AOT specs, not by what runs inside it on this device)."""

    def __init__(self):
        super().__init__()
        self.launches: list[Launch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_LAUNCH:
            return out
        mutated = [a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments]
        inputs, outputs = [], [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not name.endswith("_like"):  # factories read only their argument's shape
            for i, arg in enumerate(args):
                overwritten = i < len(mutated) and mutated[i] and name in _OVERWRITE
                inputs += [t for t in tree_flatten(arg)[0] if isinstance(t, torch.Tensor) and not overwritten]
            inputs += [t for t in tree_flatten(kwargs or {})[0] if isinstance(t, torch.Tensor)]
        fused = func.namespace == "fastvae"
        self.launches.append(Launch(f"{func.namespace}::{name}" if fused else name,
                                    sum(map(tensor_bytes, inputs)), sum(map(tensor_bytes, outputs)), fused))
        return out


def count_traffic(fn: Callable, args: tuple, mode: str) -> list[Launch]:
    """The launches of one ``mode`` call (``forward``, ``backward``, ``full``) of ``fn(*args)``, as
    ``bench.measure.mode_callable`` builds it (for ``backward`` the forward runs first, uncounted)."""
    call = mode_callable(fn, args, mode)
    if call is None:
        return []
    with TrafficCounter() as counter:
        call()
    return counter.launches


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
@dataclass
class Side:
    """Launches and bytes of one provider for one op and mode; ``launches_triton`` of them are Triton."""

    launches: int
    bytes: int
    launches_triton: int = 0
    note: str = ""

    def seconds(self, bandwidth: float) -> float:
        t_cpu = (self.launches - self.launches_triton) * T_CPU_ATEN + self.launches_triton * T_CPU_TRITON
        return max(t_cpu, self.launches * T_GPU + self.bytes / bandwidth)


@dataclass
class ModelRow:
    op: str
    case: str
    mode: str
    elements: int
    element_size: int
    eager: Side
    fused: Side | None  # None where the op has no AOT spec for a kernel it launches

    def per_element(self, side: Side) -> float:
        return side.bytes / self.elements


def _fused_side(op: str, launches: list[Launch], specs: dict[tuple[str, str], aot.Spec],
                kernels: dict[tuple[str, str], int], elements: int, element_size: int) -> Side | None:
    """Launches and bytes of the fused ``op``: ATen ops as counted, each ``fastvae::`` custom op as the
    kernels of its spec for the pass (a ``*_backward`` op: the backward).
    None when there is no such spec."""
    total_launches, total_bytes, triton_launches = 0, 0, 0
    for launch in launches:
        if not launch.fused:
            total_launches += 1
            total_bytes += launch.read + launch.written
            continue
        name = launch.name.removeprefix("fastvae::")
        pass_ = "backward" if name.endswith("_backward") else "forward"
        key = (op, pass_)
        spec = specs.get(key)
        if spec is None:
            return None
        n_kernels = kernels.get(key, len(spec.traffic))
        total_launches += n_kernels + spec.memsets  # the zero fill of a reduction's workspace is a launch too
        triton_launches += n_kernels
        total_bytes += sum(r + w for r, w in spec.traffic.values()) * elements * element_size
    return Side(total_launches, total_bytes, triton_launches)


def _training_specs(modules: Sequence[str]) -> dict[tuple[str, str], aot.Spec]:
    """``{(op, pass): spec}``: the training path of each op and pass, the spec without a ``tag`` (a tagged
    spec, such as ``reparameterize_kl``'s ``clamp``, compiles another variant of the same kernels)."""
    return {(s.op, s.pass_): s for m in modules for s in importlib.import_module(m).AOT_SPECS if not s.tag}


def cost_model(results: Sequence[aot.Result] = (), modules: Sequence[str] | None = None,
               dtype: torch.dtype = MODEL_DTYPE) -> list[ModelRow]:
    """One ``ModelRow`` per op of ``bench.cases.OPS`` and mode at the op's typical case, in ``dtype``.
    ``results`` (from ``aot.compile_matrix``) give the kernels each spec launches."""
    specs = _training_specs(aot.spec_modules() if modules is None else modules)
    training = {spec.name for spec in specs.values()}
    kernels: dict[tuple[str, str], set[str]] = {}
    for r in results:
        if r.error is None and r.layout == "aligned" and r.spec in training:
            kernels.setdefault((r.op, r.pass_), set()).add(r.kernel)
    n_kernels = {k: len(v) for k, v in kernels.items()}
    rows = []
    meta = torch.device("meta")
    for name, op in OPS.items():
        case = op.typical or op.cases[-1]
        args = op.inputs(case, meta, dtype)
        elements = args[0].numel()
        size = args[0].element_size()
        for mode in MODES:
            eager = count_traffic(op.eager, args, mode)
            if not eager:
                continue
            eager_side = Side(len(eager), sum(launch.read + launch.written for launch in eager))
            fused_launches = count_traffic(op.fused, op.inputs(case, meta, dtype), mode)
            fused = _fused_side(name, fused_launches, specs, n_kernels, elements, size)
            rows.append(ModelRow(name, op.label(case), mode, elements, size, eager_side, fused))
    return rows


def measured_rows(directory: Path = RESULTS) -> dict[tuple[str, str, str], dict[str, tuple[str, float]]]:
    """Medians from GPU runs of ``python -m bench`` (``cuda-*.csv``):
    ``(op, case, mode) -> {provider: (device, ms)}``."""
    found: dict[tuple[str, str, str], dict[str, tuple[str, float]]] = {}
    for path in sorted(directory.glob("cuda-*.csv")):
        if path.stem.endswith("_loop"):
            continue
        for row in read_csv(path):
            if row.get("median_ms") is not None:
                providers = found.setdefault((row["op"], row["case"], row["mode"]), {})
                providers[row["provider"]] = (row["device"], float(row["median_ms"]))
    return found


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------
def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us" if seconds >= 1e-5 else f"{seconds * 1e6:.1f} us"


def _share(r: aot.Result, kind: str) -> str:
    vec, total = r.vector_share(kind)
    return f"{vec}/{total}"


def _per_element(r: aot.Result) -> str:
    """SASS per element, or n/a for a kernel that moves no full-size tensor (a finish kernel reads partials)."""
    return f"{r.sass_per_element():.0f}" if r.reads + r.writes else "n/a"


def _kernel_key(r: aot.Result) -> tuple[str, str, str]:
    return (r.op, r.pass_, r.kernel)


def headline(results: Sequence[aot.Result], target: int = HEADLINE_TARGET) -> list[str]:
    """The per-kernel summary on one target, aligned inputs: registers, spills, 128-bit share, SASS/element."""
    lines = [
        "| kernel | pass | variant | dtype | registers | spills (B st/ld) | 128-bit loads | 128-bit stores | "
        "SASS / element | warps/SM (reg. limit) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.error is None and r.target == target and r.layout == "aligned":
            lines.append(f"| `{r.kernel}` | {r.pass_} | {r.variant} | {r.dtype} | {r.registers} | "
                         f"{r.spill_stores}/{r.spill_loads} | "
                         f"{_share(r, 'loads')} | {_share(r, 'stores')} | {_per_element(r)} | {r.resident_warps()} |")
    return lines


def machine_code_tables(results: Sequence[aot.Result]) -> list[str]:
    lines: list[str] = []
    by_kernel: dict[tuple[str, str, str], list[aot.Result]] = {}
    for r in results:
        by_kernel.setdefault(_kernel_key(r), []).append(r)
    for (op, pass_, kernel), rows in by_kernel.items():
        lines += ["", f"### `{kernel}` ({op}, {pass_}: {rows[0].variant})", "",
                  "| dtype | layout | target | registers | spills (B st/ld) | shared (B) | 128-bit loads | "
                  "128-bit stores | SASS / element | warps/SM | 64-bit addressing |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in rows:
            if r.error is not None:
                summary = aot.error_summary(r.error)[:200].replace('|', '/')
                lines.append(f"| {r.dtype} | {r.layout} | sm_{r.target} | **failed to compile**: {summary} "
                             "| | | | | | | |")
                continue
            addressing = "yes" if not r.int32_address_ops else f"**no** ({len(r.int32_address_ops)} int32 ops)"
            lines.append(f"| {r.dtype} | {r.layout} | sm_{r.target} | {r.registers} | "
                         f"{r.spill_stores}/{r.spill_loads} | {r.shared} | {_share(r, 'loads')} | "
                         f"{_share(r, 'stores')} | {_per_element(r)} | {r.resident_warps()} | {addressing} |")
    return lines


def model_table(rows: Sequence[ModelRow], measured: dict | None = None) -> list[str]:
    gpus = list(GPUS)
    lines = [
        "| op | case | pass | eager launches | eager B/elem | fused launches | fused B/elem | "
        + " | ".join(f"predicted eager / fused, {g}" for g in gpus) + " | "
        + " | ".join(f"predicted speedup, {g}" for g in gpus)
        + " | measured on a GPU (eager / fused) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in gpus) + " | "
        + " | ".join("---:" for _ in gpus) + " | --- |",
    ]
    for row in rows:
        found = (measured or {}).get((row.op, row.case, row.mode), {})
        if "eager" in found and "fused" in found:
            (device, eager_ms), (_, fused_ms) = found["eager"], found["fused"]
            seen = f"{device}: {eager_ms * 1e3:,.0f} / {fused_ms * 1e3:,.0f} us ({eager_ms / fused_ms:.1f}x)"
        else:
            seen = "no GPU run yet"
        eager = f"| {row.op} | {row.case} | {row.mode} | {row.eager.launches} | {row.per_element(row.eager):.1f} |"
        if row.fused is None:
            lines.append(eager + " not in the AOT specs | | " + " | ".join("" for _ in gpus) + " | "
                         + " | ".join("" for _ in gpus) + f" | {seen} |")
            continue
        times = [(row.eager.seconds(bw), row.fused.seconds(bw)) for bw in GPUS.values()]
        lines.append(eager + f" {row.fused.launches} ({row.fused.launches_triton} Triton) | "
                     f"{row.per_element(row.fused):.1f} | "
                     + " | ".join(f"{_us(e)} / {_us(f)}" for e, f in times) + " | "
                     + " | ".join(f"{e / f:.1f}x" for e, f in times) + f" | {seen} |")
    return lines


# The custom ops of a training step and the AOT spec whose kernels they launch.
_STEP_SPECS = {
    "reparameterize_kl": ("reparameterize_kl", "forward"),
    "reparameterize_kl_backward": ("reparameterize_kl", "backward"),
    "balanced_mse_update_": ("balanced_mse", "forward"),
    "balanced_mse": ("balanced_mse", "forward"),
    "balanced_mse_backward": ("balanced_mse", "backward"),
    "balanced_mse_update_backward": ("balanced_mse", "backward"),
}


@dataclass
class StepLaunches:
    """Every launch of one training step on the GPU path: ATen kernels (``aten``), Triton kernels and
    the memsets that zero the reductions' workspaces."""
    aten: int
    triton: int
    memsets: int
    aten_names: dict[str, int]
    bytes: int = 0
    """DRAM traffic of the step: each launch's tensor inputs and outputs (the fused ops' as their custom op's)."""

    @property
    def total(self) -> int:
        return self.aten + self.triton + self.memsets


def training_step_launches(batch: int = 128, modules: Sequence[str] | None = None, *,
                           model: torch.nn.Module | None = None) -> StepLaunches:
    """The launches of one step of ``model`` (default: the dense 784-256-64-32-16 VAE) with the balanced loss and
    Adam (forward, backward, ``zero_grad(set_to_none)``, ``step``), traced on the meta device: each ATen op
    that computes is one launch, each fastvae custom op the kernels and memsets of its AOT spec."""
    from fastvae.losses import BalancedLoss, Objective
    from fastvae.models import DenseVAE

    specs = _training_specs(aot.spec_modules() if modules is None else modules)
    meta = torch.device("meta")
    model = DenseVAE() if model is None else model
    objective = Objective(model, BalancedLoss()).to(meta)
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-3, foreach=True)  # CUDA's default
    x = torch.empty(batch, *model.input_shape, device=meta)
    seed = torch.zeros(1, dtype=torch.int64, device=meta)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = objective(x, seed)
        loss.backward()
        optimizer.step()

    step()  # the first step allocates Adam's state
    with TrafficCounter() as counter:
        step()
    aten, triton_kernels, memsets, names = 0, 0, 0, {}
    traffic = sum(launch.read + launch.written for launch in counter.launches)
    for launch in counter.launches:
        if launch.fused:
            spec = specs[_STEP_SPECS[launch.name.removeprefix("fastvae::")]]
            triton_kernels += len(spec.traffic)
            memsets += spec.memsets
        else:
            if launch.name.startswith("_record_function"):  # profiler markers, no kernel
                continue
            aten += 1
            names[launch.name] = names.get(launch.name, 0) + 1
    return StepLaunches(aten, triton_kernels, memsets, names, traffic)


def step_section() -> list[str]:
    step = training_step_launches()
    top = ", ".join(f"`{n}` {c}" for n, c in sorted(step.aten_names.items(), key=lambda kv: -kv[1])[:8])
    return [
        "## Launches of one training step (counted, not predicted)",
        "",
        f"Dense 784-256-64-32-16 VAE, balanced loss, Adam, batch 128, float32, traced on the meta device "
        f"(`bench.static.training_step_launches`): **{step.total} launches**: {step.aten} ATen kernels, "
        f"{step.triton} Triton kernels and {step.memsets} memsets (the zeroed workspaces of the total KL and of "
        f"balanced_mse). The ATen ones: {top}, ... (the layers, their gradients and Adam's foreach updates, "
        "after its first step). The running-MSE update adds none: it runs in balanced_mse's kernel.",
        "",
    ]


def fidelity_costs() -> list[str]:
    """Predicted costs of the launch, finish-kernel and layout changes (on paper, from the model's constants)."""
    h100 = GPUS["H100 SXM"]
    chunks = 4 * 132  # 4 chunks per multiprocessor on an H100
    load_latency = 0.6e-6  # one dependent global load round trip
    block_c = 1024 // 64  # BLOCK_C for 64 columns
    image = 128 * 3 * 64 * 64 * 4  # bytes of one float32 channels_last image batch
    us = 1e6
    return [
        "## What the GPU-fidelity changes cost (predictions, not measurements)",
        "",
        f"- **Per-launch ticket workspace**: `reparameterize_kl` with a total KL and `balanced_mse` forward zero a "
        f"fresh workspace (one memset) before their kernel: +1 launch, about {T_CPU_ATEN * us:.0f} us of CPU issue "
        f"and {T_GPU * us:.0f} us of GPU per call. `renormalize`'s scalar mode needs it only when the rows fit one "
        "chunk (with several, the partials kernel zeroes the finish kernel's counter). In exchange no launch depends "
        "on another.",
        f"- **Running-MSE update in the kernel**: `balanced_mse` with `update=True` loses the clone, division and ~5 "
        f"ATen ops of the update: about 7 launches, {7 * T_CPU_ATEN * us:.0f} us of CPU issue per training step, "
        f"net of the memset {6 * T_CPU_ATEN * us:.0f} us.",
        f"- **Finish kernels as a tree**: with {chunks} chunks (4 per SM on an H100) the old finish program walked "
        f"the chunks one dependent load after another, about {chunks} x {load_latency * us:.1f} us = "
        f"{chunks * load_latency * us:.0f} us; "
        f"combining {block_c} chunks per step (64 columns) takes {-(-chunks // block_c)} steps, about "
        f"{-(-chunks // block_c) * load_latency * us:.0f} us.",
        f"- **channels_last images in place**: `balanced_mse` no longer copies a channels_last `x_hat` and `x` to "
        f"row-major (each copy reads and writes {image / 1e6:.1f} MB at 128x3x64x64 float32) nor the gradient back: "
        f"about {3 * 2 * image / h100 * us:.0f} us saved per step on an H100 "
        f"({3 * 2 * image / GPUS['RTX 4090'] * us:.0f} us on an RTX 4090).",
        "- **The short last batch compiles nothing**: tiles, `BLOCK_P` and the specialization of batch-size arguments "
        "no longer follow the batch, so an epoch whose last batch is short (60000 = 468 x 128 + 96) no longer "
        "JIT-compiles a second variant of every kernel (a few hundred ms per kernel on the first epoch of each "
        "process).",
        "",
    ]


def render(results: Sequence[aot.Result], rows: Sequence[ModelRow], measured: dict | None = None) -> str:
    targets = sorted({r.target for r in results})
    target_list = ", ".join(f"sm_{t} ({aot.TARGET_NAMES.get(t, '?')})" for t in targets)
    failed = aot.failures(results)
    spilled = [r for r in results if r.error is None and (r.spill_stores or r.spill_loads)]
    lines = [
        "# Static GPU report: machine code and a cost model on paper",
        "",
        "Generated by `python -m bench.static` (also run by `python -m bench`) on a machine without a GPU, "
        f"with Triton {triton.__version__}. Every kernel is compiled ahead of time by `bench.aot` "
        f"for {target_list}, with the specializations Triton's JIT picks for the "
        "launcher's own arguments: `aligned` is contiguous tensors from the allocator (16-byte pointers, "
        f"latents {aot.LATENT_SHAPE[0]}x{aot.LATENT_SHAPE[1]}, images {'x'.join(map(str, aot.IMAGE_SHAPE))}); "
        f"`strided` is an unaligned view (latents: `mu` the half of `h.chunk(2, -1)` with D={aot.LATENT_SHAPE_ODD[1]}, "
        "`logvar` a column-major view, "
        "images one element into a padded buffer), compiled once per kernel: float32 for "
        + ", ".join(f"sm_{t}" for t in aot.STRIDED_TARGETS) + ".",
        "",
        f"Compiles: {len(results)}, failed: {len(failed)}, with spills: {len(spilled)}.",
        "",
        "How to read the figures:",
        "- registers per thread and spill bytes come from `ptxas -v`; shared memory from Triton's metadata;",
        "- 128-bit loads / stores: `LDG.*.128` / `STG.*.128` against all `LDG` / `STG` in the SASS "
        "(`cuobjdump -sass`). The rest are scalar: the seed, broadcast gradients, per-program partials, and the "
        "constant tables of `cos`/`log` range reduction on their rare slow path;",
        "- SASS / element: static instructions (NOPs excluded, every branch counted once, slow paths included) "
        "over the elements one thread handles in one pass of its tile: an upper bound on what runs;",
        "- warps/SM: the resident warps that the register count allows (the occupancy ceiling; more "
        "warps in flight hide more memory latency);",
        "- 64-bit addressing: no index that grows with the problem is multiplied or shifted in 32 bits on its way "
        "to a global address (checked in the PTX), so offsets past 2**31 elements are safe.",
        "",
        f"## Headline: sm_{HEADLINE_TARGET} (RTX 40 series), aligned inputs",
        "",
        *headline(results),
        "",
        *step_section(),
        *step_model.step_section(),
        *step_model.issue_section(results),
        *fidelity_costs(),
        "## Cost model on paper (predictions, not measurements)",
        "",
        f"Per op at a typical size in {str(MODEL_DTYPE).removeprefix('torch.')}. Eager is the PyTorch composition of "
        "`bench/cases/`, counted ATen op by ATen op on the meta device: each op that computes is one kernel "
        "reading its inputs and writing its output, so every intermediate is written once and read again. "
        "Fused is the fastvae op: its Triton kernels move what their AOT specs state (each full-size tensor "
        "once), plus the ATen ops it runs around its custom op (the seed draw, the running-MSE update). "
        "B/elem is bytes per element of the op's main input.",
        "",
        f"Predicted time `t = max(launches x t_cpu, launches x t_gpu + bytes / bandwidth)` with "
        f"t_cpu = {T_CPU_ATEN * 1e6:.0f} us per eager ATen op and {T_CPU_TRITON * 1e6:.0f} us per Triton launch, "
        f"t_gpu = {T_GPU * 1e6:.0f} us per kernel, and nominal bandwidths "
        + ", ".join(f"{g} {bw / 1e9:,.0f} GB/s" for g, bw in GPUS.items())
        + ". The launch costs are assumptions; real kernels reach 80-90% of nominal bandwidth on both sides. "
        "The last column fills in from `bench/results/cuda-*.csv` when `python -m bench` has run on a GPU.",
        "",
        *model_table(rows, measured),
        "",
        "## Every kernel, dtype, layout and target",
        *machine_code_tables(results),
        "",
    ]
    return "\n".join(lines)


def write_static_table(path: str | Path = RESULTS / "static.md", *, targets: Sequence[int] = aot.TARGETS,
                       workers: int = 2) -> str:
    """Compile every kernel for ``targets`` (cached), build the cost model, write the markdown report to
    ``path`` and return its text. Compile failures are reported in the table, not raised."""
    results = aot.compile_matrix(targets, workers=workers)
    text = render(results, cost_model(results), measured_rows(Path(path).parent))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text


def latent_posterior_table(dtype: torch.dtype = torch.float32) -> list[str]:
    """The cost model at every case of ``bench.cases.latent_posterior``: eager counted ATen op by ATen op on
    the meta device, fused as the launches and traffic of ``reparameterize_kl``'s AOT specs per latent
    element. ``python -m bench.cases.latent_posterior``."""
    from .cases import latent_posterior as posterior

    specs = _training_specs(aot.spec_modules())
    gpus = list(GPUS)
    lines = ["| case | pass | eager launches | eager B/elem | fused launches | fused B/elem | "
             + " | ".join(f"eager / fused, {g}" for g in gpus) + " | "
             + " | ".join(f"speedup, {g}" for g in gpus) + " |",
             "| --- | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in 2 * gpus) + " |"]
    meta = torch.device("meta")
    size = torch.empty((), dtype=dtype).element_size()
    for case in posterior.CASES:
        n = math.prod(posterior.latent_shape(case))
        for mode in MODES:
            eager_launches = count_traffic(posterior.eager, posterior.inputs(case, meta, dtype), mode)
            eager_side = Side(len(eager_launches), sum(t.read + t.written for t in eager_launches))
            fused_launches = count_traffic(posterior.fused, posterior.inputs(case, meta, dtype), mode)
            fused_side = _fused_side("reparameterize_kl", fused_launches, specs, {}, n, size)
            times = [(eager_side.seconds(bw), fused_side.seconds(bw)) for bw in GPUS.values()]
            lines.append(f"| {posterior.label(case)} | {mode} | {eager_side.launches} | {eager_side.bytes / n:.1f} | "
                         f"{fused_side.launches} ({fused_side.launches_triton} Triton) | {fused_side.bytes / n:.1f} | "
                         + " | ".join(f"{e * 1e6:,.1f} / {f * 1e6:,.1f} us" for e, f in times) + " | "
                         + " | ".join(f"{e / f:.1f}x" for e, f in times) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.static", description="Write bench/results/static.md.")
    parser.add_argument("--out", type=Path, default=RESULTS / "static.md")
    parser.add_argument("--workers", type=int, default=2, help="compile processes side by side")
    args = parser.parse_args(argv)
    write_static_table(args.out, workers=args.workers)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

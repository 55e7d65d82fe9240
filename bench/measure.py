"""How the bench measures one call: time, kernel launches, bytes saved for backward, peak memory.

- time: median with the 20th and 80th percentiles, from ``torch.utils.benchmark.Timer`` on CPU and
  from ``triton.testing.do_bench`` on CUDA;
- launches: on CUDA, the CUDA kernels (and memsets/copies) that ``torch.profiler`` records for one call.
  On CPU, the ATen ops that compute (dispatched below autograd; views and empty allocations excluded),
  each of which is one kernel on a GPU, and the C++ kernels inductor generated;
- bytes saved for backward: the distinct storages packed by ``torch.autograd.graph.saved_tensors_hooks``
  during the forward, in total and beyond the inputs' own storages;
- on CUDA: peak memory allocated during one call above what was allocated before it, and the device's
  copy bandwidth (``copy_bandwidth``) against which an op's unavoidable traffic is compared.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .cases import PROVIDERS


@dataclass
class Row:
    """The figures of one (op, case, mode, provider). Times in milliseconds, sizes in bytes;
    None where a figure does not apply (peak memory and bandwidth on CPU, a mode a provider lacks)."""

    device: str
    op: str
    case: str
    mode: str
    provider: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    rounds: int | None = None
    launches: int | None = None
    triton_launches: int | None = None
    saved_bytes: int | None = None
    saved_beyond_inputs: int | None = None
    peak_bytes: int | None = None
    min_bytes: int | None = None
    gbps: float | None = None
    bw_fraction: float | None = None
    first_call_s: float | None = None
    note: str = ""

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class Settings:
    """How hard to measure. ``budget_s``: time spent on one (case, mode, provider) once calibrated;
    ``min_rounds``: rounds at least (the slowest calls get exactly this many)."""

    quick: bool = False
    budget_s: float = 0.4
    min_rounds: int = 5
    dtype: torch.dtype = torch.float32
    providers: tuple[str, ...] = PROVIDERS

    @classmethod
    def for_run(cls, quick: bool, **overrides) -> "Settings":
        base = cls(quick=True, budget_s=0.02, min_rounds=3) if quick else cls()
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def device_name(device: torch.device) -> str:
    """The results file's name, one per machine: ``cpu-`` and the CPU's slug (``cpu-amd-epyc-avx512-bf16-2c``:
    model, widest bf16/vector flag, cores; ``fastvae.machine.machine_slug``), or ``cuda-`` and the GPU's name in
    lower case with dashes. Results of different machines thus sit side by side instead of replacing each other."""
    if device.type != "cuda":
        from fastvae.machine import describe_machine, machine_slug

        return f"{device.type}-{machine_slug(describe_machine(device.type))}"
    name = torch.cuda.get_device_name(device).lower()
    return "cuda-" + "-".join("".join(ch if ch.isalnum() else " " for ch in name).split())


def _differentiable(outputs) -> list[Tensor]:
    return [o for o in outputs if isinstance(o, Tensor) and o.requires_grad]


def mode_callable(fn: Callable, args: tuple, mode: str) -> Callable[[], object] | None:
    """The closure that ``mode`` times for ``fn(*args)``, or None when no output requires grad.

    ``backward`` runs the forward here, once, and times ``torch.autograd.grad`` with the graph retained;
    it is built right before it is timed because a forward that mutates state (the running MSE of
    ``balanced_mse``) would otherwise invalidate what a retained graph saved.
    """
    if mode == "forward":
        return lambda: fn(*args)
    wrt = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
    outputs = _differentiable(fn(*args))
    if not outputs or not wrt:
        return None
    grads = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outputs]
    if mode == "backward":
        return functools.partial(torch.autograd.grad, outputs, wrt, grads, retain_graph=True)
    return lambda: torch.autograd.grad(_differentiable(fn(*args)), wrt, grads)


def _percentiles(samples: Sequence[float]) -> tuple[float, float, float]:
    import numpy as np

    p20, p50, p80 = np.percentile(np.asarray(samples, dtype=np.float64), [20, 50, 80])
    return float(p50), float(p20), float(p80)


def time_cpu(fn: Callable[[], object], settings: Settings, name: str = "case") -> tuple[float, float, float, int]:
    """``(median, p20, p80, rounds)`` in milliseconds of ``fn()``, timed by ``torch.utils.benchmark.Timer``.

    Calls under 50 ms: ``blocked_autorange`` picks the calls per block from the timer's resolution and
    runs blocks for ``settings.budget_s`` (and at least ``min_rounds`` blocks); each block gives one
    sample, the mean call time in it. Slower calls: one call per sample, ``max(min_rounds, budget / time
    of one call)`` samples, so that the slowest cases cost ``min_rounds`` calls. Timer disables the
    garbage collector while it times (``timeit``'s rule).
    """
    from torch.utils.benchmark import Timer

    start = time.perf_counter()
    fn()
    one = time.perf_counter() - start
    timer = Timer("fn()", globals={"fn": fn}, label=name, num_threads=torch.get_num_threads())
    if one < 0.05:
        samples: list[float] = []
        while len(samples) < settings.min_rounds:
            samples += timer.blocked_autorange(min_run_time=settings.budget_s).times
    else:
        rounds = max(settings.min_rounds, math.ceil(settings.budget_s / one))
        samples = [timer.timeit(1).times[0] for _ in range(rounds)]
    median, p20, p80 = _percentiles(samples)
    return median * 1e3, p20 * 1e3, p80 * 1e3, len(samples)


def time_cuda(fn: Callable[[], object], settings: Settings) -> tuple[float, float, float, int]:
    """``(median, p20, p80, rounds)`` in milliseconds from ``triton.testing.do_bench`` (L2 flushed between calls)."""
    import triton.testing

    rep = 20 if settings.quick else max(100, int(settings.budget_s * 1000))
    median, p20, p80 = triton.testing.do_bench(fn, warmup=5 if settings.quick else 25, rep=rep,
                                               quantiles=[0.5, 0.2, 0.8])
    return float(median), float(p20), float(p80), -1


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """The device's copy bandwidth in bytes/s: ``dst.copy_(src)`` of ``nbytes`` moves ``2 * nbytes``."""
    import triton.testing

    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


# ATen ops that launch no kernel: allocation, views, metadata; ``to``/``contiguous``/``reshape``
# count through their children when they copy.
_NO_KERNEL = frozenset(
    "aten::" + name for name in (
        "empty empty_like empty_strided new_empty new_empty_strided resize_ set_ view _unsafe_view "
        "reshape _reshape_alias as_strided expand expand_as t transpose permute unsqueeze squeeze "
        "slice select chunk split narrow detach detach_ alias lift_fresh to contiguous type_as "
        "result_type is_nonzero item _local_scalar_dense unbind movedim flatten unflatten"
    ).split()
)


def _count_events(events, skip_prefixes: tuple[str, ...] = ()) -> int:
    """Kernels in a CPU profile: inductor's C++ kernels and the outermost ATen ops that compute."""
    count = 0

    def visit(event):
        nonlocal count
        name = event.name
        if name.startswith(skip_prefixes):
            return
        if "cpp_fused" in name:
            count += 1
            return
        if name.startswith("aten::") and name not in _NO_KERNEL:
            count += 1
            return
        for child in event.cpu_children:
            visit(child)

    for event in events:
        if event.cpu_parent is None:
            visit(event)
    return count


def count_kernels(fn: Callable[[], object], device: torch.device, skip_prefixes: tuple[str, ...] = ()) -> int:
    """Kernels that one call of ``fn`` launches: CUDA device events (kernels, memsets, copies) on CUDA;
    on CPU the count of ``_count_events`` (set ``torch._inductor.config.cpp.enable_kernel_profile``
    before compiling so that inductor's kernels show)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet_stdout(), profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)
                   and "annotation" not in str(getattr(e, "activity_type", "")))
    return _count_events(events, skip_prefixes)


@contextlib.contextmanager
def _quiet_stdout():
    """Silence the profiler's start/stop lines, which its C++ side writes to the process's stdout/stderr."""
    saved = []
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError):
        pass
    try:
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def saved_for_backward(fn: Callable, args: tuple) -> tuple[int, int]:
    """``(total, beyond inputs)``: bytes of the distinct storages the forward of ``fn(*args)`` saves for
    backward (``saved_tensors_hooks``), and of those that are not the inputs' own storages."""
    storages: dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = fn(*args)
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, Tensor)}
    total = sum(storages.values())
    beyond = sum(n for ptr, n in storages.items() if ptr not in inputs)
    del outputs
    return total, beyond


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of one call of ``fn`` above what was allocated before it (CUDA)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return int(peak)


def load_average() -> str:
    """The 1-minute load average of the machine (others' work competes for the same cores)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        return "?"

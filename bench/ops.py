"""Op benchmarks: every fused op against its eager PyTorch composition and ``torch.compile`` of it.

Providers (``PROVIDERS``):

- ``eager``: the op written in plain PyTorch the way a user writes it (the compositions below; they
  agree with ``fastvae.reference``, except that the noise of ``reparameterize_kl`` comes from
  ``torch.randn_like`` rather than the reference's Philox emulation, which exists to reproduce the
  kernels' stream bit for bit in tests and is not what anyone would run);
- ``compile``: ``torch.compile(eager, dynamic=False, fullgraph=True)``, compiled afresh for each case;
- ``fused``: the public fastvae op (``fastvae.reparameterize_kl`` ...). On CUDA it launches the Triton
  kernels. On CPU with the default backend it is the registered custom op whose CPU implementation is
  the reference math with its hand-written backward: the CPU column measures that path (dispatch,
  reference math, a backward that saved only the inputs), not the fused kernels.

Modes (``MODES``): ``forward`` (inputs require grad, so the forward saves what backward needs),
``backward`` (``torch.autograd.grad`` of outputs computed once, graph retained), ``full`` (both).

Figures per (op, case, mode, provider), one ``Row`` each:

- time: median with the 20th and 80th percentiles, from pytest-benchmark's calibrated runner on CPU
  and from ``triton.testing.do_bench`` on CUDA;
- launches: on CUDA, the CUDA kernels (and memsets/copies) that ``torch.profiler`` records for one call.
  On CPU: ``eager``, the ATen ops that compute (dispatched below autograd; views and empty allocations
  excluded), each of which is one kernel on a GPU; ``compile``, the C++ kernels inductor generated plus
  the ATen calls it left outside them, as the profiler records one call; ``fused``, the Triton launches
  counted by ``fastvae.kernels.count_launches`` with ``FASTVAE_BACKEND=triton TRITON_INTERPRET=1`` (in a
  subprocess, at the op's smallest case) plus the ATen ops the op runs around its custom op (the seed
  draw, the running-MSE update);
- bytes saved for backward: the distinct storages packed by ``torch.autograd.graph.saved_tensors_hooks``
  during the forward, in total and beyond the inputs' own storages;
- on CUDA: peak memory allocated during one call above what was allocated before it, and the achieved
  bandwidth ``min_bytes / median`` as a fraction of the device's copy bandwidth (``copy_bandwidth``),
  where ``min_bytes`` is the traffic the op cannot avoid (the model is stated per op below).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
from torch import Tensor

import fastvae
from fastvae import reference

PROVIDERS = ("eager", "compile", "fused")
MODES = ("forward", "backward", "full")
MODE_TITLES = {"forward": "forward", "backward": "backward", "full": "forward+backward"}
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# Eager compositions: the plain PyTorch a user writes
# --------------------------------------------------------------------------------------------------
def _acc(t: Tensor) -> Tensor:
    return t.to(reference.accumulation_dtype(t.dtype))


def eager_reparameterize_kl(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """``z = mu + exp(logvar / 2) * randn_like(mu)`` and ``KL = sum(0.5 (mu^2 + e^logvar - logvar - 1)) / N``
    (pytorch/examples' VAE, with the batch mean of ``reduction="batchmean"``)."""
    mu_a, logvar_a = _acc(mu), _acc(logvar)
    std = torch.exp(0.5 * logvar_a)
    z = (mu_a + std * torch.randn_like(std)).to(mu.dtype)
    kl = 0.5 * (mu_a.pow(2) + logvar_a.exp() - logvar_a - 1).sum() / (mu.numel() // mu.shape[-1])
    return z, kl


def eager_balanced_mse(x_hat: Tensor, x: Tensor, running_mse: Tensor, momentum: float = 0.99) -> tuple[Tensor]:
    """The balanced loss as ``fastvae.reference.balanced_mse`` computes it (``batchmean``, ``min-ema``):
    ``sum((x_hat - x)^2 / (2 gamma^2) + log(gamma^2) / 2) / N`` with ``gamma^2 = running_mse``, then
    ``running_mse = min(r, m r + (1 - m) mean((x_hat - x)^2))`` in place, without gradient."""
    gamma2 = running_mse.detach()
    err = _acc(x_hat) - _acc(x)
    loss = (err.pow(2) / (2 * gamma2) + torch.log(gamma2) / 2).sum() / x.shape[0]
    with torch.no_grad():
        ema = momentum * running_mse + (1 - momentum) * err.pow(2).mean()
        running_mse.copy_(torch.minimum(running_mse, ema))
    return (loss,)


def eager_moments(z: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.var_mean(z, dim=0, correction=0)`` in the accumulation dtype, as ``(mean, var)``."""
    var, mean = torch.var_mean(_acc(z), dim=0, correction=0)
    return mean, var


def eager_renormalize(z: Tensor, target_mean: Tensor, target_var: Tensor) -> tuple[Tensor]:
    """``(z - mean) / sqrt(var + 1e-6) * sqrt(target_var) + target_mean`` with per-dimension targets."""
    z_a = _acc(z)
    var, mean = torch.var_mean(z_a, dim=0, correction=0, keepdim=True)
    return (((z_a - mean) / torch.sqrt(var + 1e-6) * torch.sqrt(target_var) + target_mean).to(z.dtype),)


def eager_variance_law(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """``(E[mu], Var(mu) + E[exp(logvar)])`` per dimension."""
    var_mu, mean = torch.var_mean(_acc(mu), dim=0, correction=0)
    return mean, var_mu + _acc(logvar).exp().mean(dim=0)


def _fused_reparameterize_kl(mu, logvar):
    return fastvae.reparameterize_kl(mu, logvar)


def _fused_balanced_mse(x_hat, x, running_mse):
    return (fastvae.balanced_mse(x_hat, x, running_mse),)


def _fused_moments(z):
    return tuple(fastvae.moments(z))


def _fused_renormalize(z, target_mean, target_var):
    return (fastvae.renormalize(z, target_mean, target_var),)


def _fused_variance_law(mu, logvar):
    return tuple(fastvae.variance_law(mu, logvar))


# --------------------------------------------------------------------------------------------------
# The ops, their cases and their traffic models
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpBench:
    """One fused op: its cases, how to build inputs, its providers and its bandwidth model.

    ``inputs(case, device, dtype)`` returns the positional arguments; tensors that require grad are
    the ones differentiated. ``min_bytes(case, mode, itemsize)`` is the traffic the op must move at
    least; ``numel(case)`` the elements of its main input.
    """

    name: str
    cases: tuple[dict, ...]
    quick_cases: tuple[dict, ...]
    inputs: Callable[[dict, torch.device, torch.dtype], tuple]
    eager: Callable
    fused: Callable
    min_bytes: Callable[[dict, str, int], int]
    label: Callable[[dict], str]
    model: str  # the bandwidth model in words, printed under the op's tables

    def providers(self) -> dict[str, Callable]:
        return {"eager": self.eager, "compile": self.eager, "fused": self.fused}


def _randn(shape, device, dtype, requires_grad=True):
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_(requires_grad)


def _latent_inputs(case, device, dtype):
    shape = (case["B"], case["D"])
    return _randn(shape, device, dtype), (0.5 * torch.randn(shape, device=device, dtype=dtype)).requires_grad_()


def _recon_inputs(case, device, dtype):
    shape = (case["B"], *case["image"])
    x = torch.rand(shape, device=device, dtype=dtype)
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    return x_hat, x, torch.ones((), device=device, dtype=torch.float32)


def _moment_inputs(case, device, dtype):
    return (3.0 + 2.0 * torch.randn(case["N"], case["D"], device=device, dtype=dtype)).requires_grad_(),


def _renorm_inputs(case, device, dtype):
    (z,) = _moment_inputs(case, device, dtype)
    target_mean = torch.zeros(case["D"], device=device, dtype=torch.float32)
    target_var = torch.full((case["D"],), 0.8, device=device, dtype=torch.float32)
    return z, target_mean, target_var


def _n(case) -> int:
    return math.prod(v if isinstance(v, int) else math.prod(v) for k, v in case.items())


# Traffic models: n elements of the main input, s bytes each; scalars and per-dimension vectors ignored.
def _bytes_reparameterize_kl(case, mode, s):
    n = _n(case)
    fwd, bwd = 3 * n * s, 5 * n * s  # read mu, logvar, write z | read g_z, mu, logvar, write 2 grads
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _bytes_balanced_mse(case, mode, s):
    n = _n(case)
    fwd, bwd = 2 * n * s, 3 * n * s  # read x_hat, x | read x_hat, x, write grad x_hat
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _bytes_moments(case, mode, s):
    n = _n(case)
    fwd, bwd = n * s, 2 * n * s  # read z | read z, write grad z
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _bytes_renormalize(case, mode, s):
    n = _n(case)
    fwd, bwd = 2 * n * s, 3 * n * s  # read z, write z' | read g, z, write grad z
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _bytes_variance_law(case, mode, s):
    n = 2 * _n(case)  # mu and logvar
    fwd, bwd = n * s, 2 * n * s  # read mu, logvar | read mu, logvar, write 2 grads
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


_LATENT_CASES = tuple({"B": b, "D": d} for b in (128, 1024, 16384) for d in (16, 64, 512))
_RECON_CASES = tuple({"B": 128, "image": im} for im in ((1, 28, 28), (3, 32, 32), (3, 64, 64)))
_MOMENT_CASES = tuple({"N": n, "D": d} for n in (10_000, 100_000) for d in (16, 64))


def _latent_label(c):
    return f"B={c['B']} D={c['D']}"


def _recon_label(c):
    return f"{c['B']}x{'x'.join(map(str, c['image']))}"


def _moment_label(c):
    return f"N={c['N']} D={c['D']}"


def _variance_law_inputs(case, device, dtype):
    return _latent_inputs({"B": case["N"], "D": case["D"]}, device, dtype)


OPS: dict[str, OpBench] = {
    op.name: op
    for op in (
        OpBench(
            "reparameterize_kl", _LATENT_CASES, ({"B": 64, "D": 8}, {"B": 256, "D": 32}), _latent_inputs,
            eager_reparameterize_kl, _fused_reparameterize_kl, _bytes_reparameterize_kl, _latent_label,
            "forward: read mu, logvar, write z (3 N s); backward: read g_z, mu, logvar, write d mu, d logvar (5 N s)",
        ),
        OpBench(
            "balanced_mse", _RECON_CASES, ({"B": 8, "image": (1, 28, 28)},), _recon_inputs,
            eager_balanced_mse, _fused_balanced_mse, _bytes_balanced_mse, _recon_label,
            "forward: read x_hat, x (2 N s); backward: read x_hat, x, write d x_hat (3 N s)",
        ),
        OpBench(
            "moments", _MOMENT_CASES, ({"N": 1000, "D": 8},), _moment_inputs,
            eager_moments, _fused_moments, _bytes_moments, _moment_label,
            "forward: read z (N s); backward: read z, write d z (2 N s)",
        ),
        OpBench(
            "renormalize", _MOMENT_CASES, ({"N": 1000, "D": 8},), _renorm_inputs,
            eager_renormalize, _fused_renormalize, _bytes_renormalize, _moment_label,
            "forward: read z, write z' (2 N s); backward: read g, z, write d z (3 N s)",
        ),
        OpBench(
            "variance_law", _MOMENT_CASES, ({"N": 1000, "D": 8},), _variance_law_inputs,
            eager_variance_law, _fused_variance_law, _bytes_variance_law, _moment_label,
            "forward: read mu, logvar (2 N s); backward: read mu, logvar, write d mu, d logvar (4 N s)",
        ),
    )
}


# --------------------------------------------------------------------------------------------------
# One measured row
# --------------------------------------------------------------------------------------------------
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
    """``cpu``, or ``cuda-`` and the GPU's name in lower case with dashes (the results file's name)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    return "cuda-" + "-".join("".join(ch if ch.isalnum() else " " for ch in name).split())


# --------------------------------------------------------------------------------------------------
# Mode closures
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------------
class _QuietLogger:
    def debug(self, *args, **kwargs):
        pass

    info = warning = warn = error = debug


def _percentiles(samples: Sequence[float]) -> tuple[float, float, float]:
    import numpy as np

    p20, p50, p80 = np.percentile(np.asarray(samples, dtype=np.float64), [20, 50, 80])
    return float(p50), float(p20), float(p80)


def time_cpu(fn: Callable[[], object], settings: Settings, name: str = "case") -> tuple[float, float, float, int]:
    """``(median, p20, p80, rounds)`` in milliseconds of ``fn()`` with pytest-benchmark's runner.

    Calls under 50 ms go through ``BenchmarkFixture.__call__``: it calibrates the iterations per round
    to the timer's precision, warms up, then runs rounds for ``settings.budget_s`` (at least
    ``min_rounds``). Slower calls go through ``pedantic`` with one iteration per round and
    ``max(min_rounds, budget / time of one call)`` rounds, so that the slowest cases cost
    ``min_rounds`` calls. GC is disabled while timing.
    """
    from pytest_benchmark.fixture import BenchmarkFixture
    from pytest_benchmark.utils import NameWrapper

    start = time.perf_counter()
    fn()
    one = time.perf_counter() - start
    collected = []
    fixture = BenchmarkFixture(
        SimpleNamespace(name=name, nodeid=name), disable_gc=True, timer=NameWrapper(time.perf_counter),
        min_rounds=settings.min_rounds, min_time=5e-6, max_time=settings.budget_s, precision=None,
        confidence=None, warmup=True, warmup_iterations=max(1, int(0.05 / max(one, 1e-9))),
        calibration_precision=10, add_stats=collected.append, logger=_QuietLogger(), warner=lambda *a, **k: None,
        disabled=False, cprofile=False, cprofile_loops=None, cprofile_dump=None,
    )
    if one < 0.05:
        fixture(fn)
    else:
        rounds = max(settings.min_rounds, math.ceil(settings.budget_s / one))
        fixture.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
    data = collected[0].stats.data
    median, p20, p80 = _percentiles(data)
    return median * 1e3, p20 * 1e3, p80 * 1e3, len(data)


def time_cuda(fn: Callable[[], object], settings: Settings) -> tuple[float, float, float, int]:
    """``(median, p20, p80, rounds)`` in milliseconds from ``triton.testing.do_bench`` (L2 flushed between calls)."""
    import triton.testing

    rep = 20 if settings.quick else max(100, int(settings.budget_s * 1000))
    median, p20, p80 = triton.testing.do_bench(fn, warmup=5 if settings.quick else 25, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return float(median), float(p20), float(p80), -1


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """The device's copy bandwidth in bytes/s: ``dst.copy_(src)`` of ``nbytes`` moves ``2 * nbytes``."""
    import triton.testing

    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


# --------------------------------------------------------------------------------------------------
# Launches, saved bytes, peak memory
# --------------------------------------------------------------------------------------------------
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
                   and not getattr(e, "is_user_annotation", False) and "annotation" not in str(getattr(e, "activity_type", "")))
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


# --------------------------------------------------------------------------------------------------
# Fused launches on CPU: the Triton kernels in interpret mode, in a subprocess
# --------------------------------------------------------------------------------------------------
def _fused_launches_here(names: Sequence[str]) -> dict[str, dict[str, list[int] | str]]:
    """In a process started with ``TRITON_INTERPRET=1 FASTVAE_BACKEND=triton``: for each op, at its
    smallest quick case, ``{mode: [total, triton]}``, where ``total`` adds the ATen ops run outside the
    custom op. An op that fails reports the error as a string."""
    from fastvae.kernels import count_launches

    torch.manual_seed(0)
    result: dict[str, dict] = {}
    for name in names:
        op = OPS[name]
        try:
            args = op.inputs(op.quick_cases[0], torch.device("cpu"), torch.float32)
            counts = {}
            for mode in MODES:
                call = mode_callable(op.fused, args, mode)
                if call is None:
                    continue
                call()  # first call: workspaces, interpreter set-up
                with count_launches() as launched:
                    other = count_kernels(call, torch.device("cpu"), skip_prefixes=("fastvae::",))
                triton = sum(launched.values())
                counts[mode] = [triton + other, triton]
            result[name] = counts
        except Exception as error:  # reported in the table, never hidden
            result[name] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
    return result


def fused_launches_cpu(names: Sequence[str], timeout_s: float = 300) -> dict[str, dict[str, list[int] | str]]:
    """``_fused_launches_here`` in a subprocess (interpret mode must be chosen before Triton imports)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTVAE_BACKEND": "triton"}
    code = (
        "import json, sys, torch; torch.set_num_threads(1); from bench import ops; "
        f"print('@@' + json.dumps(ops._fused_launches_here({list(names)!r})))"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {name: f"launch count timed out after {timeout_s:.0f} s" for name in names}
    for line in done.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {name: f"launch count failed: {tail}" for name in names}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _inductor_kernel_profile(enabled: bool):
    import torch._inductor.config as inductor_config

    previous = inductor_config.cpp.enable_kernel_profile
    inductor_config.cpp.enable_kernel_profile = enabled or previous
    try:
        yield
    finally:
        inductor_config.cpp.enable_kernel_profile = previous


def _provider_fn(op: OpBench, provider: str) -> Callable:
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards
        return torch.compile(op.eager, dynamic=False, fullgraph=True)
    return op.providers()[provider]


def run_op(
    op: OpBench, device: torch.device, settings: Settings, *, fused_launches: dict | None = None,
    bandwidth: float | None = None, log: Callable[[str], None] = print,
) -> list[Row]:
    """Every case, provider and mode of ``op``: a list of ``Row``."""
    rows: list[Row] = []
    dev = device_name(device)
    itemsize = torch.empty((), dtype=settings.dtype).element_size()
    cases = op.quick_cases if settings.quick else op.cases
    with _inductor_kernel_profile(device.type == "cpu"):
        for case in cases:
            label = op.label(case)
            for provider in settings.providers:
                torch.manual_seed(0)
                args = op.inputs(case, device, settings.dtype)
                fn = _provider_fn(op, provider)
                start = time.perf_counter()
                fn(*args)  # compiles for ``compile``
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first = time.perf_counter() - start
                saved, beyond = saved_for_backward(fn, args)
                for mode in MODES:
                    row = Row(dev, op.name, label, mode, provider, first_call_s=first)
                    rows.append(row)
                    call = mode_callable(fn, args, mode)
                    if call is None:
                        row.note = "outputs not differentiable"
                        continue
                    call()  # compiles the backward graph for ``compile``
                    row.saved_bytes, row.saved_beyond_inputs = saved, beyond
                    row.min_bytes = op.min_bytes(case, mode, itemsize)
                    if provider == "fused" and device.type == "cpu":
                        counted = (fused_launches or {}).get(op.name)
                        if isinstance(counted, dict) and mode in counted:
                            row.launches, row.triton_launches = counted[mode]
                        elif isinstance(counted, str):
                            row.note = counted
                    else:
                        row.launches = count_kernels(call, device)
                    if device.type == "cuda":
                        row.median_ms, row.p20_ms, row.p80_ms, row.rounds = time_cuda(call, settings)
                        row.peak_bytes = peak_memory(call, device)
                        row.gbps = row.min_bytes / (row.median_ms * 1e-3) / 1e9
                        if bandwidth:
                            row.bw_fraction = row.gbps * 1e9 / bandwidth
                    else:
                        row.median_ms, row.p20_ms, row.p80_ms, row.rounds = time_cpu(call, settings, f"{op.name}-{label}-{mode}-{provider}")
                    log(f"  {op.name:18s} {label:18s} {MODE_TITLES[mode]:16s} {provider:8s} {row.median_ms:10.4f} ms")
                    del call
                del fn, args
    return rows


def run_ops(
    names: Sequence[str], device: torch.device, settings: Settings, log: Callable[[str], None] = print
) -> tuple[list[Row], dict]:
    """Run the ops ``names``; returns the rows and facts about the run (copy bandwidth, launch-count notes)."""
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {sorted(OPS)}")
    facts: dict = {"dtype": str(settings.dtype).replace("torch.", "")}
    fused_launches = None
    if device.type == "cpu" and "fused" in settings.providers:
        log("counting the fused ops' Triton launches in interpret mode (subprocess) ...")
        fused_launches = fused_launches_cpu(names)
        facts["fused_launch_cases"] = {n: OPS[n].label(OPS[n].quick_cases[0]) for n in names}
    bandwidth = None
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        facts["copy_bandwidth_GBps"] = bandwidth / 1e9
    rows: list[Row] = []
    facts["wall_s"], facts["load"] = {}, {}
    for name in names:
        log(f"{name}:")
        start, load = time.perf_counter(), load_average()
        rows += run_op(OPS[name], device, settings, fused_launches=fused_launches, bandwidth=bandwidth, log=log)
        facts["wall_s"][name] = time.perf_counter() - start
        facts["load"][name] = f"{load} to {load_average()}"
    return rows, facts


def load_average() -> str:
    """The 1-minute load average of the machine (others' work competes for the same cores)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        return "?"

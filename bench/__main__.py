"""``python -m bench``: the benchmark suite, the same command on CPU and CUDA.

    python -m bench                      # every op and the training loop, full sizes -> bench/results/
    python -m bench --quick              # tiny sizes, a slice of the data (CI) -> a temporary folder
    python -m bench --only moments,loop  # a subset; the other sections of the results files are kept
    python -m bench --only static        # the static analysis of the kernels (bench/results/static.md)

Writes ``<out>/<device>.md`` (tables), ``<device>.csv``, ``<device>_loop.csv``, a PNG chart per op and
``<device>.json``; ``<device>`` is ``cpu-<machine slug>`` (``cpu-amd-epyc-avx512-bf16-2c``: one set of files per
machine, so that results of different CPUs sit side by side) or ``cuda-<gpu name>``. Nothing here asserts
anything about time.
``python -m bench.readme`` then writes README's performance tables from those files.

The ops come from ``bench/cases/`` (one module per op), the measurements from ``bench/measure.py``;
``run_op`` below runs every case, provider and mode of one op. On CPU the ``fused`` column's launch
count is that of the Triton kernels in interpret mode (in a subprocess, at the op's smallest quick
case) plus the ATen ops the op runs around its custom op.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

from .cases import MODE_TITLES, MODES, OPS, PROVIDERS, OpBench
from .measure import (
    Row, Settings, copy_bandwidth, count_kernels, device_name, load_average, mode_callable, peak_memory,
    saved_for_backward, time_cpu, time_cuda,
)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("ops", "loop", "static")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and a slice of the data, to check that the suite runs")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]",
                        help=f"run only these: op names ({', '.join(OPS)}), 'ops' (all of them), 'loop', 'static'")
    parser.add_argument("--out", default=None,
                        help="results folder (default bench/results; with --quick a temporary folder)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the op inputs")
    parser.add_argument("--budget", type=float, default=None, metavar="S",
                        help="seconds of timing per (case, mode, provider) once calibrated (default 0.4; quick 0.02)")
    parser.add_argument("--min-rounds", type=int, default=None, help="timing rounds at least (default 5; quick 3)")
    parser.add_argument("--providers", default=None, help="comma-separated subset of eager,compile,fused")
    parser.add_argument("--epochs", type=int, default=None,
                        help="loop: epochs per loop, interleaved (default 3; quick 1)")
    parser.add_argument("--loop-models", default=None, help="loop: comma-separated subset of dense,conv")
    parser.add_argument("--loop-variants", default=None,
                        help="loop: fastvae settings beside the default (precision auto), comma-separated subset of "
                             "fp32,compile, or 'none' (default fp32,compile; quick: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def _selection(only: str | None) -> tuple[list[str], bool, bool]:
    """``(op names, loop?, static?)`` from ``--only``."""
    if only is None:
        return list(OPS), True, False
    ops, loop, static = [], False, False
    for name in (n.strip() for n in only.split(",") if n.strip()):
        if name == "ops":
            ops += [o for o in OPS if o not in ops]
        elif name == "loop":
            loop = True
        elif name == "static":
            static = True
        elif name in OPS:
            ops += [name] if name not in ops else []
        else:
            raise SystemExit(f"--only: unknown name {name!r}; choose from {', '.join([*OPS, *SECTIONS])}")
    return ops, loop, static


def _static_module():
    """``bench.static`` (it writes ``static.md``: the kernels' machine code and a cost model), or None
    when it is absent from this checkout."""
    try:
        return importlib.import_module("bench.static")
    except ModuleNotFoundError as error:
        if error.name in ("bench.static",):
            return None
        raise


def run(args: argparse.Namespace) -> int:
    from . import report

    ops, loop, static = _selection(args.only)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    providers = tuple(p.strip() for p in args.providers.split(",")) if args.providers else None
    if providers and not set(providers) <= set(PROVIDERS):
        raise SystemExit(f"--providers: choose from {PROVIDERS}, got {providers}")
    quick_out = Path(tempfile.gettempdir()) / "fastvae-bench-quick"
    out = Path(args.out) if args.out else (quick_out if args.quick else RESULTS)
    dev = device_name(device)
    command = getattr(args, "command_line", None) or "python -m bench"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    settings = Settings.for_run(args.quick, budget_s=args.budget, min_rounds=args.min_rounds, providers=providers,
                                dtype=getattr(torch, args.dtype))
    print(f"fastvae bench on {dev} ({'quick' if args.quick else 'full'}) -> {out}")
    sections, facts = {}, {}
    op_rows = loop_rows = None
    loop_columns: list[str] = []
    if ops:
        start = time.perf_counter()
        rows, op_facts = run_ops(ops, device, settings)
        op_rows = report.rows_as_dicts(rows)
        facts.update({k: v for k, v in op_facts.items() if k == "copy_bandwidth_GBps"})
        wall = time.perf_counter() - start
        for name in ops:
            sections[name] = {"date": stamp, "command": command, "quick": args.quick,
                              "wall_s": op_facts["wall_s"][name], "load": op_facts["load"][name]}
        print(f"ops: {wall:.0f} s")
    if loop:
        from . import loop as loop_bench

        start, load = time.perf_counter(), load_average()
        rows, loop_note = loop_bench.run_loops(device, quick=args.quick, epochs=args.epochs,
                                               models=tuple(args.loop_models.split(",")) if args.loop_models else None,
                                               variants=_variants(args.loop_variants))
        loop_rows = report.rows_as_dicts(rows)
        loop_columns = loop_bench.LoopRow.columns()
        facts["loop_note"] = loop_note
        section = {"date": stamp, "command": command, "quick": args.quick, "wall_s": time.perf_counter() - start,
                   "load": f"{load} to {load_average()}"}
        for model in dict.fromkeys(r["model"] for r in loop_rows):  # one section per model, as the rows merge
            sections[f"loop:{model}"] = section
        print(f"loop: {section['wall_s']:.0f} s")
    if ops or loop:
        paths = report.write_all(out, dev, op_rows, loop_rows, sections, facts, loop_columns or _loop_columns())
        for path in paths.values():
            print(f"wrote {path}")
    if static:
        module = _static_module()
        if module is None:
            print("static: bench/static.py is not in this checkout; skipped")
        else:
            written = _run_static(module, out)
            print(f"wrote {written}")
    return 0


def _variants(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return () if text.strip() == "none" else tuple(v.strip() for v in text.split(",") if v.strip())


def _loop_columns() -> list[str]:
    from .loop import LoopRow

    return LoopRow.columns()


def _run_static(module, out: Path) -> Path:
    """``bench.static.write_static_table`` into ``out / "static.md"``."""
    target = out / "static.md"
    module.write_static_table(target)
    return target


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
        "import json, sys, torch; torch.set_num_threads(1); from bench.__main__ import _fused_launches_here; "
        f"print('@@' + json.dumps(_fused_launches_here({list(names)!r})))"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {name: f"launch count timed out after {timeout_s:.0f} s" for name in names}
    for line in done.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {name: f"launch count failed: {tail}" for name in names}


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
                        timing = time_cpu(call, settings, f"{op.name}-{label}-{mode}-{provider}")
                        row.median_ms, row.p20_ms, row.p80_ms, row.rounds = timing
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


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0]))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = " ".join(["python -m bench", *argv])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench`` (or ``fastvae bench``): the benchmark suite, the same command on CPU and CUDA.

    python -m bench                      # every op and the training loop, full sizes -> bench/results/
    python -m bench --quick              # tiny sizes, a slice of the data (CI) -> a temporary folder
    python -m bench --only moments,loop  # a subset; the other sections of the results files are kept
    python -m bench --only static        # the static analysis of the kernels (bench/results/static.md)

Writes ``<out>/<device>.md`` (tables), ``<device>.csv``, ``<device>_loop.csv``, a PNG chart per op and
``<device>.json``; ``<device>`` is ``cpu`` or ``cuda-<gpu name>``. Nothing here asserts anything about time.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("ops", "loop", "static")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a slice of the data, to check that the suite runs")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]",
                        help="run only these: op names (reparameterize_kl, balanced_mse, moments, renormalize, "
                             "variance_law), 'ops' (all of them), 'loop', 'static'")
    parser.add_argument("--out", default=None, help="results folder (default bench/results; with --quick a temporary folder)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="dtype of the op inputs")
    parser.add_argument("--budget", type=float, default=None, metavar="S",
                        help="seconds of timing per (case, mode, provider) once calibrated (default 0.4; quick 0.02)")
    parser.add_argument("--min-rounds", type=int, default=None, help="timing rounds at least (default 5; quick 3)")
    parser.add_argument("--providers", default=None, help="comma-separated subset of eager,compile,fused")
    parser.add_argument("--epochs", type=int, default=None, help="loop: epochs per loop, interleaved (default 3; quick 1)")
    parser.add_argument("--loop-models", default=None, help="loop: comma-separated subset of dense,conv")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser


def _selection(only: str | None) -> tuple[list[str], bool, bool]:
    """``(op names, loop?, static?)`` from ``--only``."""
    from .ops import OPS

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
    import torch

    from . import report
    from .ops import PROVIDERS, Settings, device_name, load_average, run_ops

    ops, loop, static = _selection(args.only)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    providers = tuple(p.strip() for p in args.providers.split(",")) if args.providers else None
    if providers and not set(providers) <= set(PROVIDERS):
        raise SystemExit(f"--providers: choose from {PROVIDERS}, got {providers}")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "fastvae-bench-quick" if args.quick else RESULTS)
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
                                               models=tuple(args.loop_models.split(",")) if args.loop_models else None)
        loop_rows = report.rows_as_dicts(rows)
        loop_columns = loop_bench.LoopRow.columns()
        facts["loop_note"] = loop_note
        sections["loop"] = {"date": stamp, "command": command, "quick": args.quick, "wall_s": time.perf_counter() - start,
                            "load": f"{load} to {load_average()}"}
        print(f"loop: {sections['loop']['wall_s']:.0f} s")
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


def _loop_columns() -> list[str]:
    from .loop import LoopRow

    return LoopRow.columns()


def _run_static(module, out: Path) -> Path:
    """``bench.static.write_static_table`` into ``out / "static.md"``."""
    target = out / "static.md"
    module.write_static_table(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0]))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = " ".join(["python -m bench", *argv])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

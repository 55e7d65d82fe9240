"""``python -m bench.process``: the whole ``fastvae train`` process against pytorch/examples' VAE script, start-up
included, as a user runs them: ``epochs`` epochs of each, taking turns (A B A B ...), ``rounds`` times.

    python -m bench.process [--epochs 3] [--rounds 3] [--out bench/results]

A is ``fastvae train --epochs N`` with its defaults (dataset auto, precision auto), B is
``python -m bench.examples_vae --epochs N`` (``bench/examples_vae.py``: the example's DataLoader loop on the same
model). First one cold run of each, fastvae's with an empty cache folder (``FASTVAE_CACHE_DIR``: it measures its
precision and decodes the dataset then), reported apart; then the rounds, which find that cache as a user's second
run does. Each run's wall time and CPU time (user + sys of the child, from ``os.wait4``) are recorded; the ratio A/B
is taken run pair by run pair, so a drift of the machine's speed hits both. Writes ``<out>/<device>_process.json``
(``<device>`` is ``cpu-<machine slug>``, as for ``python -m bench``); ``python -m bench.readme`` puts its table
beside that machine's other tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .measure import device_name, load_average
from .report import machine

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def commands(epochs: int, out: str) -> dict[str, list[str]]:
    """The two processes: fastvae's CLI and the example's script, ``epochs`` epochs each."""
    return {"fastvae train": [sys.executable, "-m", "fastvae", "train", "--epochs", str(epochs), "--out", out,
                              "--no-progress", "--no-tensorboard"],
            "pytorch/examples VAE": [sys.executable, "-m", "bench.examples_vae", "--epochs", str(epochs)]}


def run_process(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``argv`` to its end: ``{"wall_s", "cpu_s"}``; a failure raises with the command's last output line."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        last = output.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(argv[1:])} exited {child.returncode}: {last[0]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}


def measure(epochs: int, rounds: int, log=print) -> dict:
    """A cold run of each process, then ``rounds`` turns of both: per process its cold run and its runs, and per
    pair of the rounds the wall-time ratio A/B."""
    runs: dict[str, list[dict]] = {}
    cold: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fastvae-bench-process-") as tmp:
        env = {**os.environ, "FASTVAE_CACHE_DIR": f"{tmp}/cache"}  # empty at the cold run, kept for the rounds
        env.pop("TRITON_INTERPRET", None)  # a user's shell has no interpreter switched on
        for k in range(-1, rounds):
            for name, argv in commands(epochs, f"{tmp}/run-{k + 1}").items():
                result = run_process(argv, env)
                if k < 0:
                    cold[name] = result
                else:
                    runs.setdefault(name, []).append(result)
                when = "cold run" if k < 0 else f"round {k + 1}/{rounds}"
                log(f"  {when} {name:22s} wall {result['wall_s']:6.2f} s, cpu {result['cpu_s']:6.2f} s")
    a, b = (runs[name] for name in ("fastvae train", "pytorch/examples VAE"))
    ratios = [x["wall_s"] / y["wall_s"] for x, y in zip(a, b)]
    return {"cold": cold, "runs": runs, "ratio_wall": {"min": min(ratios), "median": statistics.median(ratios),
                                                       "max": max(ratios)}}


def table(result: dict) -> list[str]:
    """Markdown rows: each process's median wall and CPU seconds (min-max), then the paired ratio."""
    lines = ["| process | wall s (median) [min, max] | CPU s (median) | cold run: wall s, CPU s |",
             "| --- | ---: | ---: | ---: |"]
    for name, runs in result["runs"].items():
        walls, cold = [r["wall_s"] for r in runs], result["cold"][name]
        lines.append(f"| {name} | {statistics.median(walls):.2f} [{min(walls):.2f}, {max(walls):.2f}] | "
                     f"{statistics.median(r['cpu_s'] for r in runs):.2f} | {cold['wall_s']:.2f}, {cold['cpu_s']:.2f} |")
    ratio, cold = result["ratio_wall"], result["cold"]
    lines.append(f"| fastvae / examples, run pair by run pair | {ratio['median']:.2f} [{ratio['min']:.2f}, "
                 f"{ratio['max']:.2f}] | | "
                 f"{cold['fastvae train']['wall_s'] / cold['pytorch/examples VAE']['wall_s']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.process", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.rounds < 1:
        parser.error("--epochs and --rounds must be positive")
    command = "python -m bench.process" + "".join(
        f" --{k} {v}" for k, v in (("epochs", args.epochs), ("rounds", args.rounds)) if v != parser.get_default(k))
    load, started = load_average(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{command}: {args.epochs} epoch(s), {args.rounds} round(s) of each process, in turns")
    result = measure(args.epochs, args.rounds)
    device = device_name(torch.device("cpu"))
    record = {"command": command, "date": started, "load": f"{load} to {load_average()}", "epochs": args.epochs,
              "machine": machine(device), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{device}_process.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(table(result)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

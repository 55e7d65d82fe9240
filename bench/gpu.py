"""``python -m bench.gpu``: the one-command acceptance run for the day a GPU is lent (at most ~8 minutes).

    python -m bench.gpu             # on CUDA -> bench/results/cuda-<gpu>.md
    python -m bench.gpu --dry-run   # the same flow on the CPU, kernels in Triton's interpreter, tiny sizes

Four sections, each timed, each recorded even when it fails (the report says what failed, nothing aborts):

1. ``tests``: the step-sync and CUDA-graph test files with ``FASTVAE_TEST_DEVICES`` set to the device (their
   ``device`` fixture then trains there), and the op test files on the Triton backend;
2. ``ops``: ``bench``'s op benchmarks (eager, torch.compile, fused) at the bench sizes, each row beside the
   cost model's prediction: ``max(launches x T_GPU + min_bytes / bandwidth, launches x host issue)``, and the
   measured and predicted fractions of the copy bandwidth;
3. ``train``: 2-epoch dense and conv trainings in eager, CUDA-graph and ``torch.compile`` modes: measured step
   time and launches per step (the profiler's kernels on CUDA, the ATen ops on the CPU) beside the prediction;
4. ``facts``: what the run established, in words (the device, the bandwidth, the failures).

``--dry-run`` uses the CPU, the quick op cases and 1-2 tiny trainings (graphs are CUDA-only; compile is left
out for its compile time), so that CI runs this script and it cannot rot; it writes into a temporary folder
unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .measure import Settings, device_name

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TEST_FILES = ("tests/test_step_syncs.py", "tests/test_cuda_graphs.py", "tests/test_reparameterize.py",
              "tests/test_balanced_mse.py", "tests/test_moments.py")
DRY_TESTS = ("tests/test_cuda_graphs.py", "-k", "device_lr and cosine")
OPS = ("reparameterize_kl", "balanced_mse", "latent_posterior", "moments")  # latent_posterior: latent-diffusion shapes
DRY_OPS = ("balanced_mse",)


@dataclass
class TrainRow:
    model: str
    mode: str
    steps: int
    step_ms: float | None
    launches_per_step: float | None
    predicted_launches: int | None
    predicted_step_ms: float | None
    note: str = ""


def run_tests(device: torch.device, dry_run: bool) -> tuple[str, float]:
    """pytest on the device in a subprocess; returns its last line and its seconds."""
    env = dict(os.environ, FASTVAE_TEST_DEVICES=device.type)
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
        env["FASTVAE_BACKEND"] = "triton"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               *(DRY_TESTS if dry_run else TEST_FILES)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return (lines[-1] if lines else f"pytest exited {done.returncode}"), time.perf_counter() - start


def predicted_seconds(launches: int, min_bytes: int, bandwidth: float) -> float:
    """The memory roofline with a per-launch cost (``bench.static``'s constants)."""
    from .static import T_CPU_ATEN, T_GPU

    return max(launches * T_CPU_ATEN, launches * T_GPU + min_bytes / bandwidth)


def run_ops(device: torch.device, dry_run: bool, log: Callable[[str], None]) -> tuple[list[str], float]:
    from .__main__ import run_op
    from .cases import OPS as CASES
    from .measure import copy_bandwidth
    from .static import cost_model

    # 0.1 s of timing per row keeps the GPU run inside its minutes (torch.compile's compile time dominates)
    settings = Settings.for_run(dry_run, providers=("eager", "fused") if dry_run else None,
                                budget_s=None if dry_run else 0.1)
    # bench's run_ops, less the CPU's launch count of the interpreted kernels (a subprocess; the GPU counts its own)
    measured = copy_bandwidth(device) if device.type == "cuda" else None
    rows = [row for name in (DRY_OPS if dry_run else OPS)
            for row in run_op(CASES[name], device, settings, fused_launches=None, bandwidth=measured, log=log)]
    bandwidth = measured or 20e9  # the CPU: a nominal 20 GB/s
    model = {(r.op, r.mode): r for r in cost_model()}
    lines = ["| op | case | mode | provider | launches (measured / model) | time ms (measured / predicted) | "
             "bandwidth fraction (measured / predicted) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        entry = model.get((row.op, row.mode))
        side = None if entry is None else (entry.fused if row.provider == "fused" else entry.eager)
        launches = side.launches if side is not None and row.provider != "compile" else row.launches
        predicted = (predicted_seconds(launches, row.min_bytes, bandwidth) * 1e3
                     if launches and row.min_bytes else None)
        fraction = (row.min_bytes / bandwidth / (predicted / 1e3)) if predicted else None
        lines.append(f"| {row.op} | {row.case} | {row.mode} | {row.provider} | {row.launches} / "
                     f"{launches if side is not None else '-'} | {_num(row.median_ms)} / {_num(predicted)} | "
                     f"{_num(row.bw_fraction)} / {_num(fraction)} |")
    return lines, bandwidth


def _num(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _models(dry_run: bool):
    from fastvae.models import ConvVAE, DenseVAE

    if dry_run:
        return {"dense": (lambda: DenseVAE((1, 8, 8), 4, hidden=(16,)), (1, 8, 8), 64, 16)}
    return {"dense": (lambda: DenseVAE(), (1, 28, 28), 8192, 128),
            "conv": (lambda: ConvVAE(), (1, 28, 28), 8192, 128)}


def _launches_per_step(run_step: Callable[[], None], device: torch.device) -> float:
    """Kernels (CUDA) or ATen ops (CPU) of one step, counted around ``run_step``."""
    if device.type == "cuda":
        from .measure import count_kernels

        return float(count_kernels(run_step, device))
    from fastvae.train.syncs import SyncCounter

    counter = SyncCounter()
    with counter, counter.scope("step"):
        run_step()
    return float(sum(counter.ops["step"].values()))


def run_trainings(device: torch.device, dry_run: bool, out: Path, log: Callable[[str], None]) -> list[TrainRow]:
    """2-epoch trainings per model and mode; step time from the epoch's wall time over its steps."""
    from fastvae import backend
    from fastvae.train import TrainConfig, fit, loop

    from .static import T_GPU, training_step_launches

    predicted = training_step_launches().total
    modes = ("eager",) if dry_run else ("eager", "graphs", "compile")
    rows = []
    for name, (build, shape, n, batch) in _models(dry_run).items():
        images = torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))
        for mode in modes:
            config = TrainConfig(out=str(out / f"train-{name}-{mode}"), overwrite=True, epochs=2, batch_size=batch,
                                 log_every=10_000, progress=False, tensorboard=False, n_samples=4, device=str(device),
                                 cuda_graphs=mode == "graphs", compile=mode == "compile", images_every=100,
                                 precision="fp32")  # the cost model's dtype; no calibration run
            counted: list[float] = []
            step = loop._Run.train_step

            def counting_step(run, rows_, step=step, counted=counted):
                if run.step == run.steps_per_epoch + 1 and not counted:  # a settled step of the second epoch
                    counted.append(_launches_per_step(lambda: step(run, rows_), device))
                else:
                    step(run, rows_)

            loop._Run.train_step = counting_step
            try:
                with backend.use_backend("triton"):  # the kernels: compiled on CUDA, interpreted on the CPU
                    fit(build(), images, config)
                metrics = [line for line in (out / f"train-{name}-{mode}" / "metrics.jsonl").read_text().splitlines()
                           if '"test"' in line or '"train-subset"' in line]
                epoch_s = json.loads(metrics[-1])["epoch_time_s"]
                steps = n // batch
                note = "" if name == "dense" else "model: the dense step's launches"
                graph_launches = 1 if mode == "graphs" else predicted
                rows.append(TrainRow(name, mode, steps, epoch_s / steps * 1e3, counted[0] if counted else None,
                                     graph_launches, graph_launches * T_GPU * 1e3, note))
            except Exception as error:  # noqa: BLE001 - the report names it; the run goes on
                rows.append(TrainRow(name, mode, 0, None, None, None, None, f"failed: {error!r}"[:200]))
            finally:
                loop._Run.train_step = step
            log(f"train {name} {mode}: {rows[-1]}")
    return rows


def report(device: torch.device, sections: dict, dry_run: bool) -> str:
    lines = [f"# bench.gpu on {device_name(device)}{' (dry run: CPU, interpreter, tiny sizes)' if dry_run else ''}",
             "", f"torch {torch.__version__}; written by `python -m bench.gpu{' --dry-run' if dry_run else ''}`.", ""]
    tests, tests_s = sections["tests"]
    lines += ["## Tests on the device", "", f"`{tests}` ({tests_s:.0f} s)", ""]
    lines += ["## Ops: measured against predicted", ""] + sections["ops"] + [""]
    lines += ["## Training: 2 epochs", "",
              "| model | mode | steps/epoch | step ms (measured) | launches/step (measured) | launches/step "
              "(predicted) | step ms (predicted, launch bound) | note |", "|---|---|---|---|---|---|---|---|"]
    for r in sections["train"]:
        lines.append(f"| {r.model} | {r.mode} | {r.steps} | {_num(r.step_ms)} | {_num(r.launches_per_step)} | "
                     f"{r.predicted_launches if r.predicted_launches is not None else '-'} | "
                     f"{_num(r.predicted_step_ms)} | {r.note} |")
    lines += ["", "## Facts", ""] + [f"- {fact}" for fact in sections["facts"]] + [""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same flow on the CPU at tiny sizes")
    parser.add_argument("--out", default=None, help="results folder (default bench/results; dry run: a temp folder)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the pytest section")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no CUDA device here; use --dry-run to check the flow on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="fastvae-gpu-")) if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    facts = [f"device: {device_name(device)}"]
    sections: dict = {"tests": ("skipped (--skip-tests)", 0.0) if args.skip_tests else run_tests(device, args.dry_run)}
    try:
        sections["ops"], bandwidth = run_ops(device, args.dry_run, print)
        facts.append(f"copy bandwidth used by the predictions: {bandwidth / 1e9:.0f} GB/s")
    except Exception as error:  # noqa: BLE001 - reported
        sections["ops"] = [f"failed: {error!r}"]
    with tempfile.TemporaryDirectory(prefix="fastvae-gpu-runs-") as runs:
        sections["train"] = run_trainings(device, args.dry_run, Path(runs), print)
    facts.append(f"wall time {time.perf_counter() - start:.0f} s")
    if not args.dry_run:
        facts.append("machine code (ex2.approx bound, 128-bit accesses): bench.aot checks the SASS it compiles; "
                     "run `python -m bench.aot` on this machine to check them against this device")
    sections["facts"] = facts
    path = out / f"{device_name(device)}.md"
    path.write_text(report(device, sections, args.dry_run))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

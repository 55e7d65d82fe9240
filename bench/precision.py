"""Does bf16 keep the seed's results? ``fastvae train`` in fp32 and in bf16 on this machine, side by side.

    python -m bench.precision [--out bench/results] [--dense-epochs 20] [--conv-epochs 5] [--device cpu]

Trains the default dense VAE (784-256-64-32-16) and the conv VAE on Fashion-MNIST in fp32 with seeds 0 and 1
(how far a result moves with the seed alone) and in bf16 with seed 0, and writes the test MSE and gamma of the last
epoch, the inactive latent variables over the test split (``fastvae.analysis.latent_statistics``: small
``Var(mu)`` and ``E[sigma^2]`` near 1) and the median epoch time to ``precision-<device>.md`` and ``.json``
(``<device>``: ``cpu-<machine slug>``; a pair of files per machine, every row naming the machine).
``TrainConfig.precision="auto"`` picks bf16 only where it measures faster (``fastvae/train/calibrate.py``); this
table says what that choice costs in results. README quotes it (``python -m bench.readme``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastvae.analysis import latent_statistics
from fastvae.data import load_dataset
from fastvae.train import TrainConfig
from fastvae.train.from_config import train

from .measure import device_name
from .report import machine

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = (("fp32", 0), ("fp32", 1), ("bf16", 0))  # (precision, seed): the second fp32 seed is the yardstick


def run_one(model: str, precision: str, seed: int, epochs: int, device: str, folder: Path,
            test_images: torch.Tensor) -> dict:
    """One training run and what it ended with."""
    epoch_times: list[float] = []

    def on_epoch(epoch_end: bool, metrics: dict, **_) -> None:
        if epoch_end:
            epoch_times.append(metrics["epoch_time_s"])

    config = TrainConfig(dataset="fashion-mnist", model=model, epochs=epochs, precision=precision, seed=seed,
                         device=device, out=str(folder / f"{model}-{precision}-{seed}"), progress=False,
                         tensorboard=False)
    trained, result = train(config, callbacks=[on_epoch])
    stats = latent_statistics(trained, test_images, gain=False)
    return {"model": model, "precision": precision, "seed": seed, "epochs": epochs,
            "test_mse": result.test_metrics["mse"], "gamma": result.test_metrics["gamma"],
            "inactive": int(stats.inactive.sum()), "latent_dim": stats.latent_dim,
            "epoch_s": statistics.median(epoch_times)}


def table(rows: list[dict], machine_name: str) -> list[str]:
    """The rows of one machine, its name (``machine_name``: the CPU model) in every row."""
    lines = ["| machine | model | epochs | precision | seed | test MSE | gamma | inactive latents | epoch s (median) |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {machine_name} | {r['model']} | {r['epochs']} | {r['precision']} | {r['seed']} | "
                     f"{r['test_mse']:.5f} | {r['gamma']:.4f} | {r['inactive']} of {r['latent_dim']} | "
                     f"{r['epoch_s']:.2f} |")
    return lines


def results_name(device: str) -> str:
    """The results files' stem on this machine: ``precision-cpu-<machine slug>`` (one pair of files per machine)."""
    return f"precision-{device_name(torch.device(device))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument("--dense-epochs", type=int, default=20)
    parser.add_argument("--conv-epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    command = "python -m bench.precision" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("dense_epochs", args.dense_epochs),
                                                      ("conv_epochs", args.conv_epochs)) if v != parser.get_default(k))
    test_images, _ = load_dataset("fashion-mnist", split="test")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model, epochs in (("dense", args.dense_epochs), ("conv", args.conv_epochs)):
            for precision, seed in RUNS:
                rows.append(run_one(model, precision, seed, epochs, args.device, Path(folder), test_images))
                print(table(rows, "this machine")[-1], flush=True)
    described = machine(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    text = ["# bf16 against fp32 in `fastvae train`", "",
            f"Machine: {described}. Measured {started} with `{command}`.", "",
            "Fashion-MNIST, the default settings of `fastvae train` (balanced loss, batch 128, Adam lr 1e-3) but the "
            "precision and the seed (fp32 with a second seed shows how far a result moves with the seed alone); "
            "the MSE and gamma of the last epoch's test evaluation, the inactive variables "
            "(Var(mu) < 0.05 and E[sigma^2] > 0.8) over the 10000 test images.", "",
            *table(rows, described.split(" (")[0]), ""]
    name = results_name(args.device)
    (args.out / f"{name}.md").write_text("\n".join(text))
    (args.out / f"{name}.json").write_text(json.dumps({"machine": described, "date": started, "command": command,
                                                       "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out / name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

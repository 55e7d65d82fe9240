"""``python -m fastvae.science_table``: the seed's claims against what fastvae measures, as ``docs/science.md``.

Reads only what the commands wrote into run folders under ``--runs`` (``analysis/latents.json``,
``latent_evolution.json``, ``metrics.jsonl``, ``fid.json``, ``noise_injection/summary.json``,
``two_stage*/report.json``) and writes one Markdown table per claim, each with the commands that produce its
numbers. ``--commands`` prints those commands as one shell script (``COMMANDS``), so the whole table is
rerun by::

    python -m fastvae.science_table --runs RUNS --commands > science.sh && bash science.sh
    python -m fastvae.science_table --runs RUNS --out docs/science.md

A missing file leaves its cell as "not run" rather than failing.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

#: a variable whose zeroing raises the per-element MSE by more than this is counted as used by the decoder
USED_GAIN = 1e-4
T = "--threads 1 --no-progress --no-tensorboard"
#: every command behind the table, in order; RUNS stands for the runs folder
COMMANDS = (
    # the default dense run, with the seed's Figure 1 tracker (Var(mu_j), E[sigma_j^2] every 100 steps)
    "python -m fastvae.science_table --train-tracked RUNS/dense",
    "fastvae analyze RUNS/dense",
    f"fastvae train --loss beta --out RUNS/dense-beta {T}",
    "fastvae analyze RUNS/dense-beta",
    f"fastvae train --model conv --epochs 5 --out RUNS/conv {T}",
    "fastvae analyze RUNS/conv",
    f"fastvae train --kl none --out RUNS/dense-kl-none {T}",
    f"fastvae train --kl quadratic --out RUNS/dense-kl-quadratic {T}",
    f"fastvae train --no-sampling --epochs 10 --out RUNS/dense-no-sampling {T}",
    "fastvae analyze RUNS/dense-kl-none",
    "fastvae analyze RUNS/dense-kl-quadratic --gain-samples 2000",
    "fastvae analyze RUNS/dense-no-sampling --gain-samples 2000",
    f"fastvae train --latent 3 --hidden 256 64 16 --epochs 10 --out RUNS/dense3d {T}",
    "fastvae train --latent 3 --hidden 256 64 16 --epochs 10 --no-sampling --kl quadratic --out "
    f"RUNS/dense3d-nosampling-quadratic {T}",
    "fastvae analyze RUNS/dense3d --gain-samples 2000",
    "fastvae analyze RUNS/dense3d-nosampling-quadratic --gain-samples 2000",
    "fastvae noise-injection RUNS/dense --limit 15000 --increment 0.5 --recovery-epochs 3",
    "fastvae fid-features --dataset fashion-mnist",
    "fastvae two-stage RUNS/dense --no-progress",
    "fastvae two-stage RUNS/dense --latents active --no-progress",
    "fastvae fid RUNS/dense",
    # the same first stage, its second stages trained with another seed: the seed-to-seed spread of FID
    "mkdir -p RUNS/dense-seed1 && cp RUNS/dense/checkpoint.pt RUNS/dense/config.json RUNS/dense-seed1/",
    "fastvae two-stage RUNS/dense-seed1 --seed 1 --no-progress",
    "fastvae two-stage RUNS/dense-seed1 --latents active --seed 1 --no-progress",
    "fastvae fid RUNS/dense-seed1",
    "fastvae two-stage RUNS/dense-beta --no-progress",
    "fastvae fid RUNS/dense-beta",
    "fastvae two-stage RUNS/conv --no-progress",
    "fastvae two-stage RUNS/conv --latents active --no-progress",
    "fastvae fid RUNS/conv",
)


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_test(run: Path) -> dict | None:
    try:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    tests = [r for r in rows if r.get("split") in ("test", "train-subset")]
    return tests[-1] if tests else None


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "not run"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _cmd(*lines: str) -> str:
    return "<br>".join(f"`{line}`" for line in lines)


def _inactive(runs: Path, name: str) -> str:
    report = _json(runs / name / "analysis" / "latents.json")
    if report is None:
        return "not run"
    gains = [v.get("gain") for v in report.get("variables", [])]
    used = "" if not gains or None in gains else f"; {sum(g > USED_GAIN for g in gains)} with gain > {USED_GAIN:g}"
    deviation = report["max_deviation"]
    return f"{report['num_inactive']} of {report['latent_dim']} (largest \\|Var+E-1\\| {deviation:.3f}{used})"


def stationary_over_training(history: dict) -> list[tuple[int, float, float]]:
    """``(step, max_j |Var(mu_j) + E[sigma_j^2] - 1|, mean_j of it)`` for each record of a ``LatentTracker``."""
    out = []
    for step, var_mu, sigma2 in zip(history["step"], history["var_mu"], history["mean_sigma2"]):
        dev = [abs(a + b - 1.0) for a, b in zip(var_mu, sigma2)]
        out.append((int(step), max(dev), sum(dev) / len(dev)))
    return out


#: figures copied next to the table by ``--out`` (source under RUNS, file name in the figures folder)
FIGURES = (
    ("dense/noise_injection/noise_injection.png", "noise_injection.png"),
    ("dense3d/analysis/latent_3d.png", "latent_3d-sampling.png"),
    ("dense3d/analysis/latent_slices.png", "latent_slices-sampling.png"),
    ("dense3d-nosampling-quadratic/analysis/latent_3d.png", "latent_3d-nosampling-quadratic.png"),
    ("dense3d-nosampling-quadratic/analysis/latent_slices.png", "latent_slices-nosampling-quadratic.png"),
    ("dense/latent_evolution.png", "latent_evolution.png"),
)
FIGURE_DIR = "science"


def copy_figures(runs: Path, out_dir: Path) -> list[str]:
    """Copy the ``FIGURES`` that exist under ``runs`` into ``out_dir/science``; their names."""
    import shutil

    copied = []
    for source, name in FIGURES:
        if (runs / source).is_file():
            (out_dir / FIGURE_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(runs / source, out_dir / FIGURE_DIR / name)
            copied.append(name)
    return copied


def _figure(name: str, figures, alt: str) -> list[str]:
    return [f"![{alt}]({FIGURE_DIR}/{name})", ""] if name in figures else []


def build(runs: Path, figures=()) -> str:
    """docs/science.md from the run folders under ``runs`` (``figures``: the figure files copied beside it)."""
    sections = (_sparsity(runs), _stationary(runs, figures), _balanced(runs), _causes(runs, figures),
                _noise_injection(runs, figures), _two_stage_fid(runs))
    return "\n".join(_HEADER + [line for section in sections for line in section])


_HEADER = ["# The seed's claims, measured", "",
             "Generated by `python -m fastvae.science_table --runs RUNS --out docs/science.md` from the run folders "
             "that the commands below write (RUNS: the runs folder; all on Fashion-MNIST, CPU, default settings "
             "unless the command says otherwise). `python -m fastvae.science_table --commands` prints every "
             "command as one script. \"not run\" marks a number whose run folder is missing.", ""]


def _sparsity(runs: Path) -> list[str]:
    return ["## Sparsity: inactive variables (E[sigma^2] > 0.8 and Var(mu) < 0.05)", "",
              "Beside the count: the largest deviation from the stationary condition and the number of variables "
              "whose zeroing raises the reconstruction MSE by more than 1e-4 (used by the decoder whatever their "
              "moments: without sampling, a tiny Var(mu) can still carry information).", "",
              "| model | seed | fastvae | commands |", "| --- | --- | --- | --- |",
              f"| dense 784-256-64-32-16, balanced loss, 20 epochs | 8 of 16 inactive | {_inactive(runs, 'dense')} | "
              f"{_cmd('fastvae train', 'fastvae analyze RUN')} |",
              f"| conv (32-64 channels), balanced loss, 5 epochs (CPU time) | inactive variables also in conv VAEs | "
              f"{_inactive(runs, 'conv')} | {_cmd('fastvae train --model conv --epochs 5', 'fastvae analyze RUN')} |",
              ""]


def _stationary(runs: Path, figures) -> list[str]:
    lines = ["## The stationary condition over training: Var(mu_j) + E[sigma_j^2] -> 1", "",
              "| step | max_j \\|Var(mu_j) + E[sigma_j^2] - 1\\| | mean_j |", "| --- | --- | --- |"]
    history = _json(runs / "dense" / "latent_evolution.json")
    if history is None:
        lines.append("| not run | | |")
    else:
        track = stationary_over_training(history)
        picks = sorted({0, len(track) // 4, len(track) // 2, 3 * len(track) // 4, len(track) - 1})
        lines += [f"| {track[i][0]} | {track[i][1]:.3f} | {track[i][2]:.3f} |" for i in picks]
    lines += ["", "Seed: the sum tends to 1 for every variable, active or not, as training reaches its stationary "
              "point. Dense run, 2,000 training images, every 100 steps: "
              f"{_cmd('python -m fastvae.science_table --train-tracked RUN')} (a `fastvae.LatentTracker` callback; "
              "figure: `RUN/latent_evolution.png`).", ""]
    return lines + _figure("latent_evolution.png", figures, "Var(mu_j) and E[sigma_j^2] over training")


def _balanced(runs: Path) -> list[str]:
    lines = ["## Balanced loss against a fixed KL weight (equal epochs: 20)", "",
              "| loss | test MSE | FID first-stage | FID second-stage + per_dim | inactive | commands |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, flag in (("dense", "balanced (default)"), ("dense-beta", "beta, kl weight 1 (fixed)")):
        test = _last_test(runs / name)
        fid = _json(runs / name / "fid.json") or {}
        rows = fid.get("settings", {})
        train = "fastvae train" + (" --loss beta" if name == "dense-beta" else "")
        first_fid = _fmt(rows.get("first-stage", {}).get("fid"))
        lines.append(f"| {flag} | {_fmt(test and test.get('mse'), 4)} | {first_fid} | "
                     f"{_fmt(rows.get('second-stage + per_dim', {}).get('fid'))} | {_inactive(runs, name)} | "
                     f"{_cmd(train, 'fastvae two-stage RUN', 'fastvae fid RUN')} |")
    lines += ["", "Seed: balancing the reconstruction against the KL through gamma^2 = running MSE (the balanced "
              "loss) does better than a fixed KL weight; here, test MSE and FID of the two runs at equal epochs.", ""]
    return lines


def _causes(runs: Path, figures) -> list[str]:
    lines = ["## What causes sparsity: the KL term and the sampling (dense, 20 epochs unless said)", "",
              "| objective | seed | inactive (fastvae) | command |", "| --- | --- | --- | --- |"]
    for name, what, seed, flags in (
            ("dense", "full KL, sampling", "sparse", ""),
            ("dense-kl-none", "no KL", "no inactive variable", " --kl none"),
            ("dense-kl-quadratic", "quadratic penalty mu^2/2 only", "no inactive variable", " --kl quadratic"),
            ("dense-no-sampling", "full KL, z = mu (10 epochs)", "(not stated)", " --no-sampling --epochs 10")):
        lines.append(f"| {what} | {seed} | {_inactive(runs, name)} | "
                     f"{_cmd('fastvae train' + flags, 'fastvae analyze RUN')} |")
    lines += ["",
              "3-D latent space (784-256-64-16-3, 10 epochs), figures `RUN/analysis/latent_3d.png` and "
              "`latent_slices.png`:", "",
              "| run | inactive | command |", "| --- | --- | --- |",
              f"| sampling, full KL | {_inactive(runs, 'dense3d')} | "
              f"{_cmd('fastvae train --latent 3 --hidden 256 64 16 --epochs 10')} |",
              f"| no sampling, quadratic KL | {_inactive(runs, 'dense3d-nosampling-quadratic')} | "
              f"{_cmd('fastvae train --latent 3 --hidden 256 64 16 --epochs 10 --no-sampling --kl quadratic')} |", ""]
    for kind, label in (("sampling", "sampling, full KL"), ("nosampling-quadratic", "no sampling, quadratic KL")):
        lines += _figure(f"latent_3d-{kind}.png", figures, f"latent means, {label}")
        lines += _figure(f"latent_slices-{kind}.png", figures, f"generation from five slices, {label}")
    return lines


def _noise_injection(runs: Path, figures) -> list[str]:
    lines = ["## Noise injection and its reversal (dense run, trained on its first 15,000 images)", ""]
    summary = _json(runs / "dense" / "noise_injection" / "summary.json")
    if summary is None:
        lines.append("not run")
    else:
        s, e = summary["stopped_at"], summary["end"]
        lines += ["| | noise std | gain (nats) | KL | Var(mu) | E[sigma^2] |", "| --- | --- | --- | --- | --- | --- |"]
        for label, row in (("start", summary["start"]), ("noise stopped", s),
                           (f"after {summary['recovery_epochs']} epochs without noise", e)):
            lines.append(f"| {label} | {row['noise_std']:g} | {row['gain_nats']:.3g} | {row['kl']:.3g} | "
                         f"{row['var_mu']:.3g} | {row['mean_sigma2']:.3g} |")
        lines += ["", f"Variable {summary['variable']} (the active one with the smallest gain), variables "
                  f"{summary['held']} held inactive. The gain "
                  f"{'fell below' if summary['gain_below_kl'] else 'did not fall below'} "
                  f"the KL; the variable was {'inactive' if summary['inactive_when_stopped'] else 'still active'} when "
                  f"the noise stopped and is {'active' if summary['active_at_end'] else 'inactive'} after the "
                  "recovery (inactive: Var(mu) < 0.05 and E[sigma^2] > 0.8). Seed: growing noise makes an active "
                  "variable inactive once its gain falls below its KL; the reversal asks whether it comes back when "
                  "the noise is removed. "
                  f"{_cmd('fastvae noise-injection RUN --limit 15000 --increment 0.5 --recovery-epochs 3')} "
                  "(`RUN/noise_injection/history.csv`, `noise_injection.png`)."]
    lines.append("")
    return lines + _figure("noise_injection.png", figures, "noise injection and reversal")


def _two_stage_fid(runs: Path) -> list[str]:
    lines = ["## Two-stage generation: FID (fastvae classifier features, 10,000 samples)", "",
              "| setting | dense (20 epochs) | dense, second stages with seed 1 | conv (5 epochs) |",
              "| --- | --- | --- | --- |"]
    fids = {name: (_json(runs / name / "fid.json") or {}).get("settings", {})
            for name in ("dense", "dense-seed1", "conv")}
    for k in dict.fromkeys(list(fids["dense"]) + list(fids["dense-seed1"]) + list(fids["conv"])):
        lines.append("| " + " | ".join([k] + [_fmt(fids[n].get(k, {}).get("fid")) for n in fids]) + " |")
    spread = _spread(runs / "conv", fids["conv"])
    if spread is not None and spread > 0:
        lines += ["", f"Run-to-run spread: every variable of the conv run is active, so its `--latents active` second "
                  f"stage has the plain one's model and settings; trained a second time (before the second stage's "
                  f"initial weights were seeded) it ended with other weights, and the two differ by up to {spread:.3g} "
                  "FID over the three renormalization modes. Differences smaller than that are not evidence."]
    elif spread == 0:
        lines += ["",
                  "The conv run's `--latents active` second stage covers every variable and is the same model as the "
                  "plain one (same seed): these tables hold no estimate of the seed-to-seed spread of FID."]
    lines += ["", "Active second stage: trained on the active variables only, inactive ones filled with N(0, 1) noise "
              "(or zeros) at generation. Commands: "
              + _cmd("fastvae fid-features --dataset fashion-mnist", "fastvae two-stage RUN",
                   "fastvae two-stage RUN --latents active", "fastvae fid RUN") + ".", ""]
    return lines


def _spread(run: Path, rows: dict) -> float | None:
    """The largest |FID(second-stage X) - FID(active second-stage X)| over the modes X when the active second
    stage of ``run`` covers every variable (then both are the same model trained twice), else None."""
    active = _json(run / "two_stage_active" / "latents.json")
    report = _json(run / "analysis" / "latents.json")
    if not active or not report or len(active["variables"]) != report["latent_dim"]:
        return None
    pairs = [("second-stage" + m, "active second-stage" + m) for m in ("", " + per_dim", " + scalar")]
    diffs = [abs(rows[a]["fid"] - rows[b]["fid"]) for a, b in pairs if a in rows and b in rows]
    return max(diffs) if diffs else None


def train_tracked(out: str) -> None:
    """The default ``fastvae train`` with a ``LatentTracker`` on 2,000 training images every 100 steps."""
    from .analysis import LatentTracker
    from .data import load_dataset, resolve_dataset
    from .train import TrainConfig, train

    name = resolve_dataset("auto", None)
    images, _ = load_dataset(name, None, "train")
    train(TrainConfig(out=out, dataset=name, threads=1, progress=False, tensorboard=False),
          callbacks=[LatentTracker(images[:2000], every=100)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvae.science_table", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="the folder holding the run folders (default: runs)")
    parser.add_argument("--out", default=None, help="Markdown file to write (default: print)")
    parser.add_argument("--commands", action="store_true", help="print the commands that make the runs, as a script")
    parser.add_argument("--train-tracked", metavar="RUN", help="train the default run into RUN with the latent tracker")
    args = parser.parse_args(argv)
    if args.train_tracked:
        train_tracked(args.train_tracked)
        return 0
    if args.commands:
        print("set -e")
        print("\n".join(c.replace("RUNS", args.runs) for c in COMMANDS))
        return 0
    if args.out:
        figures = copy_figures(Path(args.runs), Path(args.out).parent)
        Path(args.out).write_text(build(Path(args.runs), figures))
    else:
        text = build(Path(args.runs))
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fastvae.science_table``: the seed's claims against what fastvae measures, as ``docs/science.md``.

Each row of the table (``ROWS``) is one setting trained with every seed of ``SEEDS`` through the CLI commands it
lists; seed ``k``'s run folder is ``RUNS/<row>/s<k>``. ``collect`` reads what those commands wrote
(``metrics.jsonl``, ``latent_evolution.json``, ``analysis/latents.json``, ``fid.json``,
``noise_injection/summary.json``) into one record per row: the per-seed values and, over the seeds whose runs
are complete, their mean and sample standard deviation (``summarize``). ``render`` turns that record into
``docs/science.md``; the record itself is ``docs/science.json`` (per-epoch test metrics and stationary
deviations of every seed included, so the table is rebuilt without rerunning: ``--json docs/science.json``).
A difference is called out only where it exceeds the seed spread (``exceeds_spread``)::

    python -m fastvae.science_table --runs RUNS --run         # or: --commands > science.sh && bash science.sh
    python -m fastvae.science_table --runs RUNS --out docs/science.md      # also writes docs/science.json

``--run`` (``--rows ROW ...`` for some rows, in that order) records each command's CPU seconds in
``RUNS/cputime.jsonl``; the table reports them per row and seed.

A missing run leaves its cells as "not run" rather than failing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

#: a variable whose zeroing raises the per-element MSE by more than this is counted as used by the decoder
USED_GAIN = 1e-4
#: the seeds every row is trained with; seed k's run of row NAME is RUNS/NAME/s{k}
SEEDS = (0, 1, 2)
#: every training of the table runs in bf16 autocast on one thread, so that its rows compare whatever machine (and
#: whatever ``precision="auto"`` would measure there) rebuilds them
RESUMED = "--threads 1 --no-progress --no-tensorboard"
T = f"--precision bf16 {RESUMED}"
#: the default dense training, its latent moments recorded on the whole training set after each epoch
TRACKED = "python -m fastvae.science_table --train-tracked"
TRAIN_IMAGES = 60000


@dataclass(frozen=True)
class Row:
    """One row of the table: what is trained, how long, on how many images, and the commands of one seed.

    ``commands`` are templates: ``{run}`` is the seed's run folder (``RUNS/<run>/s{seed}``, ``run`` defaulting
    to ``name``), ``{seed}`` the seed, ``RUNS`` the runs folder."""

    name: str
    model: str
    epochs: int
    commands: tuple[str, ...]
    images: int = TRAIN_IMAGES
    run: str = ""
    #: what its runs measure: "train" (a training and its analysis), "noise", "fid" or "setup" (nothing)
    kind: str = "train"

    def folder(self, runs, seed: int) -> Path:
        return Path(runs) / (self.run or self.name) / f"s{seed}"

    def seed_commands(self, seed: int, runs: str = "RUNS") -> list[str]:
        run = f"RUNS/{self.run or self.name}/s{seed}"
        return [c.format(run=run, seed=seed).replace("RUNS", runs) for c in self.commands]


DENSE = "dense 784-256-64-32-16"
CONV = "conv: 4x4 stride-2 convolutions 1-32-64 channels (28-14-7), dense 256, latent 16; mirrored decoder"
CONV_WIDE = "conv, wider: 4x4 stride-2 convolutions 1-64-128 channels (28-14-7), dense 512, latent 16; mirrored decoder"
TWO_STAGE = ("fastvae two-stage {run} --seed {seed} --no-progress",
             "fastvae two-stage {run} --latents active --seed {seed} --no-progress",
             "fastvae fid {run} --seed {seed}")
DENSE_100_FILES = "checkpoint.pt,checkpoint.pt.sha256,config.json,metrics.jsonl,metrics.csv,latent_evolution.json"
#: every row, in the order its runs are queued (the cheapest complete rows first)
ROWS = (
    Row("fid-features", "the FID feature extractor (Fashion-MNIST classifier, shared by every FID)", 3,
        ("fastvae fid-features --dataset fashion-mnist",), kind="setup"),
    Row("dense", f"{DENSE}, balanced loss", 30,
        (f"{TRACKED} --epochs 30 --seed {{seed}} --out {{run}} {T}", "fastvae analyze {run}")),
    Row("dense-beta", f"{DENSE}, beta loss, fixed KL weight 1", 30,
        (f"fastvae train --loss beta --epochs 30 --seed {{seed}} --out {{run}} {T}", "fastvae analyze {run}")),
    Row("noise", f"{DENSE}, balanced loss, 30 epochs; noise injection on its first 15,000 images", 30,
        ("fastvae noise-injection {run} --limit 15000 --increment 0.5 --max-increments 20 --recovery-epochs 3 "
         "--seed {seed}",),
        images=15000, run="dense", kind="noise"),
    Row("fid-dense", f"{DENSE}, balanced loss", 30, TWO_STAGE, run="dense", kind="fid"),
    Row("fid-dense-beta", f"{DENSE}, beta loss, fixed KL weight 1", 30, TWO_STAGE, run="dense-beta", kind="fid"),
    Row("dense-100", f"{DENSE}, balanced loss (the dense row's runs, resumed)", 100,
        ("mkdir -p {run}", f"cp RUNS/dense/s{{seed}}/{{{{{DENSE_100_FILES}}}}} {{run}}/",
         f"{TRACKED} --resume {{run}} --epochs 100 {RESUMED}", "fastvae analyze {run}")),
    Row("conv", CONV, 30,
        (f"fastvae train --model conv --epochs 30 --seed {{seed}} --out {{run}} {T}", "fastvae analyze {run}")),
    Row("fid-conv", CONV, 30, TWO_STAGE, run="conv", kind="fid"),
    Row("conv-wide", CONV_WIDE, 30,
        (f"fastvae train --model conv --channels 64 128 --hidden 512 --epochs 30 --seed {{seed}} --out {{run}} {T}",
         "fastvae analyze {run}")),
    Row("dense-kl-none", f"{DENSE}, balanced loss, no KL", 20,
        (f"fastvae train --kl none --seed {{seed}} --out {{run}} {T}", "fastvae analyze {run}")),
    Row("dense-kl-quadratic", f"{DENSE}, balanced loss, KL replaced by mu^2/2", 20,
        (f"fastvae train --kl quadratic --seed {{seed}} --out {{run}} {T}",
         "fastvae analyze {run} --gain-samples 2000")),
    Row("dense-no-sampling", f"{DENSE}, balanced loss, z = mu", 10,
        (f"fastvae train --no-sampling --epochs 10 --seed {{seed}} --out {{run}} {T}",
         "fastvae analyze {run} --gain-samples 2000")),
    Row("dense3d", "dense 784-256-64-16-3, balanced loss", 10,
        (f"fastvae train --latent 3 --hidden 256 64 16 --epochs 10 --seed {{seed}} --out {{run}} {T}",
         "fastvae analyze {run} --gain-samples 2000")),
    Row("dense3d-nosampling-quadratic", "dense 784-256-64-16-3, balanced loss, z = mu, KL replaced by mu^2/2", 10,
        (f"fastvae train --latent 3 --hidden 256 64 16 --epochs 10 --no-sampling --kl quadratic --seed {{seed}} "
         f"--out {{run}} {T}", "fastvae analyze {run} --gain-samples 2000")),
)
ROW = {row.name: row for row in ROWS}


def commands(runs: str = "RUNS", names=None) -> list[str]:
    """The commands of the rows ``names`` in that order (default: every row of ``ROWS``), seed by seed (one seed
    for a setup row)."""
    out = []
    for row in ROWS if names is None else [ROW[name] for name in names]:
        for seed in SEEDS[:1] if row.kind == "setup" else SEEDS:
            out += row.seed_commands(seed, runs)
    return out



# --------------------------------------------------------------------------------------------------
# Statistics over seeds
# --------------------------------------------------------------------------------------------------
def summarize(values) -> dict | None:
    """``{"mean", "sd", "n", "values"}`` of the per-seed ``values`` (None entries dropped; booleans count as
    0/1): ``mean = sum v / n`` and the sample standard deviation ``sd = sqrt(sum (v - mean)^2 / (n - 1))``
    (correction 1, as ``torch.std``; None for a single value). None when no value is left."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    mean = math.fsum(kept) / len(kept)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in kept) / (len(kept) - 1)) if len(kept) > 1 else None
    return {"mean": mean, "sd": sd, "n": len(kept), "values": kept}


def exceeds_spread(a: dict | None, b: dict | None) -> bool | None:
    """Whether two ``summarize`` results differ by more than the seed spread, ``|mean_a - mean_b| > sd_a + sd_b``;
    None when either has fewer than two seeds (no spread to compare with)."""
    if a is None or b is None or a["sd"] is None or b["sd"] is None:
        return None
    return abs(a["mean"] - b["mean"]) > a["sd"] + b["sd"]


def stationary_over_training(history: dict) -> list[tuple[int, float, float]]:
    """``(epoch or step, max_j |Var(mu_j) + E[sigma_j^2] - 1|, mean_j of it)`` per record of a latent tracker."""
    out = []
    for t, var_mu, sigma2 in zip(history.get("epoch", history["step"]), history["var_mu"], history["mean_sigma2"]):
        dev = [abs(a + b - 1.0) for a, b in zip(var_mu, sigma2)]
        out.append((int(t), max(dev), sum(dev) / len(dev)))
    return out


def log_slope(points) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` over ``(x, y)`` points with ``x, y > 0``: the exponent
    ``a`` of ``y ~ x^a`` (how fast a deviation falls with the epoch); None for fewer than two points."""
    pairs = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    mx = math.fsum(p[0] for p in pairs) / len(pairs)
    my = math.fsum(p[1] for p in pairs) / len(pairs)
    sxx = math.fsum((p[0] - mx) ** 2 for p in pairs)
    return math.fsum((p[0] - mx) * (p[1] - my) for p in pairs) / sxx if sxx > 0 else None


# --------------------------------------------------------------------------------------------------
# Reading the run folders
# --------------------------------------------------------------------------------------------------
def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


TEST_FIELDS = ("epoch", "loss", "kl", "mse", "gamma", "epoch_time_s")
NOISE_FIELDS = ("noise_std", "gain_nats", "kl", "var_mu", "mean_sigma2")
NOISE_PHASES = (("start", "start"), ("stopped_at", "stopped"), ("end", "end"))
NOISE_FLAGS = ("gain_below_kl", "inactive_when_stopped", "active_at_end")


def _test_rows(run: Path) -> list[dict]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("split") in ("test", "train-subset"):
            rows.append({k: row[k] for k in TEST_FIELDS if k in row})
    return rows


def run_values(run: Path, kind: str) -> dict:
    """What one seed's run folder holds for a row of ``kind`` (module docstring); missing files are left out."""
    out: dict = {}
    tests = _test_rows(run)
    if tests:
        out["epochs_done"] = tests[-1]["epoch"]
    config = _json(run / "config.json")
    if config is not None and kind == "train":
        out["precision"] = config.get("precision")
    if kind == "train":
        if tests:
            out["test_mse"] = tests[-1]["mse"]
            out["per_epoch"] = tests
        report = _json(run / "analysis" / "latents.json")
        if report is not None:
            sums = [abs(v["sum"] - 1.0) for v in report["variables"]]
            gains = [v.get("gain") for v in report["variables"]]
            out.update(inactive=report["num_inactive"], latent_dim=report["latent_dim"],
                       max_deviation=report["max_deviation"], mean_deviation=sum(sums) / len(sums))
            if gains and None not in gains:
                out["used"] = sum(g > USED_GAIN for g in gains)
            out["variables"] = [[v["var_mu"], v["mean_sigma2"], v.get("gain")] for v in report["variables"]]
        history = _json(run / LATENT_EVOLUTION)
        if history is not None and "epoch" in history:
            out["stationary"] = [list(t) for t in stationary_over_training(history)]
    elif kind == "noise":
        summary = _json(run / "noise_injection" / "summary.json")
        if summary is not None:
            out["variable"], out["held"] = summary["variable"], summary["held"]
            for phase, label in NOISE_PHASES:
                out.update({f"{label}.{k}": summary[phase][k] for k in NOISE_FIELDS})
            out.update({k: bool(summary[k]) for k in NOISE_FLAGS})
            if (run / "noise_injection" / "history.csv").is_file():
                from .experiments import read_history

                out["history"] = [dataclasses.asdict(r) for r in read_history(run / "noise_injection" / "history.csv")]
    elif kind == "fid":
        fid = _json(run / "fid.json")
        if fid is not None:
            out["fid"] = {k: v["fid"] for k, v in fid.get("settings", {}).items()}
    return out


def _complete(row: Row, values: dict) -> bool:
    if values.get("epochs_done", 0) < row.epochs:
        return False
    return {"train": "inactive", "noise": "active_at_end", "fid": "fid"}.get(row.kind, "epochs_done") in values


def _cpu_seconds(runs: Path) -> dict[str, float]:
    """user + sys CPU seconds per command that succeeded, from ``RUNS/cputime.jsonl`` (``run_commands``)."""
    out: dict[str, float] = {}
    try:
        lines = (runs / CPU_TIME).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        entry = json.loads(line)
        if entry.get("rc") == 0:
            out[_unpinned(entry["command"])] = entry["user_s"] + entry["sys_s"]
    return out


def _unpinned(command: str) -> str:
    """``command`` without ``T``'s precision: the first runs of the table predate it, made with the default
    ``auto``, which chose bf16 there (each run's config.json records the precision it trained in)."""
    return command.replace(T, RESUMED)


def _scalar_metrics(values: dict) -> dict:
    flat = {k: v for k, v in values.items() if isinstance(v, (int, float)) and k not in ("epochs_done", "variable")}
    flat.update({f"fid.{k}": v for k, v in values.get("fid", {}).items()})
    return flat


def collect(runs: Path) -> dict:
    """The table's record: per row its settings, the commands of one seed, the per-seed values (each seed's
    per-epoch test metrics and stationary deviations included), the CPU seconds per seed where known, the seeds
    whose runs are complete, and ``summary``: ``summarize`` of every number over those seeds."""
    runs = Path(runs)
    cpu = _cpu_seconds(runs)
    rows = []
    for row in ROWS:
        seeds = SEEDS[:1] if row.kind == "setup" else SEEDS
        per_seed, done, cpu_s = {}, [], {}
        for seed in seeds:
            values = run_values(row.folder(runs, seed), row.kind) if row.kind != "setup" else {}
            if values:
                per_seed[str(seed)] = values
            # the commands as the queue wrote them: with the runs folder as given, or as "runs" from the repository
            spent = [cpu.get(_unpinned(c), cpu.get(_unpinned(r)))
                     for c, r in zip(row.seed_commands(seed, str(runs)), row.seed_commands(seed, "runs"))]
            if any(s is not None for s in spent):
                cpu_s[str(seed)] = sum(s for s in spent if s is not None)
            if row.kind == "setup" and len(cpu_s) or row.kind != "setup" and _complete(row, values):
                done.append(seed)
        metrics = sorted({k for s in done for k in _scalar_metrics(per_seed[str(s)])}) if row.kind != "setup" else []
        summary = {k: summarize([_scalar_metrics(per_seed[str(s)]).get(k) for s in done]) for k in metrics}
        rows.append({"name": row.name, "model": row.model, "kind": row.kind, "epochs": row.epochs,
                     "images": row.images, "seeds": done, "seeds_planned": list(seeds),
                     "command": row.seed_commands("{seed}"), "per_seed": per_seed, "cpu_s": cpu_s,
                     "summary": summary})
    return {"seeds": list(SEEDS), "spread_rule": "|mean_a - mean_b| > sd_a + sd_b (sample sd, correction 1)",
            "rows": rows}


# --------------------------------------------------------------------------------------------------
# The Markdown
# --------------------------------------------------------------------------------------------------
def _num(value: float, digits: int) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


def fmt(summary: dict | None, digits: int = 3) -> str:
    """``mean ± sd (v_0, v_1, ...)`` of a ``summarize`` result (no ``± sd`` for one value); "not run" for None."""
    if summary is None:
        return "not run"
    values = ", ".join(_num(v, digits) for v in summary["values"])
    sd = "" if summary["sd"] is None else f" ± {_num(summary['sd'], 2)}"
    return f"{_num(summary['mean'], digits)}{sd} ({values})"


def _flag_count(summary: dict | None) -> str:
    return "not run" if summary is None else f"{round(sum(summary['values']))} of {summary['n']} seeds"


def _seeds(row: dict) -> str:
    missing = [s for s in row["seeds_planned"] if s not in row["seeds"]]
    done = ", ".join(map(str, row["seeds"])) or "none"
    partial = [f"{s} at epoch {row['per_seed'][str(s)]['epochs_done']}" for s in missing
               if row["per_seed"].get(str(s), {}).get("epochs_done", row["epochs"]) < row["epochs"]]
    return done + (f" (missing: {', '.join(map(str, missing))}" + "".join(f"; {p}" for p in partial) + ")"
                   if missing else "")


def _rule(columns: int) -> str:
    return "|" + " --- |" * columns


def _cmd(lines) -> str:
    return "<br>".join(f"`{line}`" for line in lines)


def _verdict(name_a: str, a: dict | None, name_b: str, b: dict | None, what: str) -> str:
    differs = exceeds_spread(a, b)
    if differs is None:
        return f"{what}: fewer than two seeds on one side, no verdict"
    lower = name_a if a["mean"] < b["mean"] else name_b
    if differs:
        return f"{what}: {lower} is lower by {abs(a['mean'] - b['mean']):.3g}, beyond the seed spread"
    return (f"{what}: {name_a} {a['mean']:.3g} and {name_b} {b['mean']:.3g} lie within the seed spread "
            "(no difference shown)")


def render(data: dict, figures=()) -> str:
    """``docs/science.md`` from a ``collect`` record (``figures``: the figure files copied beside it)."""
    rows = {row["name"]: row for row in data["rows"]}
    sections = (_header(data), _sparsity(rows), _stationary(rows, figures), _balanced(rows), _causes(rows, figures),
                _noise_injection(rows, figures), _two_stage_fid(rows), _cost(rows))
    return "\n".join(line for section in sections for line in section)


def _s(row: dict | None, metric: str) -> dict | None:
    return None if row is None else row["summary"].get(metric)


def _header(data: dict) -> list[str]:
    precisions = sorted({str(v["precision"]) for row in data["rows"] for v in row["per_seed"].values()
                         if "precision" in v})
    return ["# The seed's claims, measured", "",
            "Generated by `python -m fastvae.science_table --runs RUNS --out docs/science.md` from the run folders "
            "that the commands below write (RUNS: the runs folder; Fashion-MNIST, CPU, one thread per run); "
            "`--json docs/science.json` rebuilds it from the record alone. `python -m fastvae.science_table "
            "--commands` prints every command as one script (`--run` runs them, recording their CPU time); seed k"
            "'s run of a row is `RUNS/<row>/s<k>`.", "",
            f"Every number is over the seeds {', '.join(map(str, data['seeds']))} of its row: mean ± sample "
            "standard deviation, then the per-seed values in seed order. A seed counts once its run reached "
            "the row's epochs; the `seeds` column lists those. Two numbers are called different only where "
            f"{data['spread_rule']}."
            + (f" Training precision as the runs' config.json records it: {', '.join(precisions)} (the rows pin "
               "`--precision bf16`; the first runs, made before that, trained with `auto`, which chose bf16)."
               if precisions else ""), ""]


SPARSITY_ROWS = (("dense", "8 of 16 inactive"), ("dense-100", "8 of 16 inactive"),
                 ("conv", "inactive variables also in conv VAEs (3 of 16 in its Table)"),
                 ("conv-wide", "inactive variables also in conv VAEs (3 of 16 in its Table)"))


def _train_cells(row: dict | None) -> str:
    return " | ".join(fmt(_s(row, m), d) for m, d in (("inactive", 3), ("used", 3), ("max_deviation", 3),
                                                        ("mean_deviation", 3), ("test_mse", 4)))


def _sparsity(rows) -> list[str]:
    lines = ["## Sparsity: inactive variables (E[sigma^2] > 0.8 and Var(mu) < 0.05)", "",
             "Beside the count: the variables whose zeroing raises the reconstruction MSE by more than "
             f"{USED_GAIN:g} (used by the decoder whatever their moments), the largest and the mean "
             "|Var(mu_j) + E[sigma_j^2] - 1| over the variables, and the test MSE.", "",
             "| model | epochs | seeds | seed's claim | inactive of 16 | used | largest \\|Var+E-1\\| "
             "| mean \\|Var+E-1\\| | test MSE | commands (seed k) |", _rule(10)]
    for name, claim in SPARSITY_ROWS:
        row = rows[name]
        lines.append(f"| {row['model']} | {row['epochs']} | {_seeds(row)} | {claim} | {_train_cells(row)} | "
                     f"{_cmd(row['command'])} |")
    lines.append("")
    dense = _s(rows["dense"], "inactive")
    if dense is not None and dense["sd"] is not None:
        inside = abs(dense["mean"] - 8) <= dense["sd"]
        lines.append(f"- Dense, 30 epochs: the seed's 8 {'lies within' if inside else 'lies outside'} the mean ± sd "
                     f"{fmt(dense)}; per seed the count ranges over {min(dense['values']):g}-{max(dense['values']):g}.")
    for name in ("conv", "conv-wide"):
        s = _s(rows[name], "inactive")
        if s is not None:
            sparse = sum(v > 0 for v in s["values"])
            lines.append(f"- {rows[name]['model']}: inactive variables in {sparse} of {s['n']} seeds"
                         + (". The seed's claim of inactive variables in conv VAEs does not reproduce here."
                            if not sparse else "."))
        else:
            lines.append(f"- {rows[name]['model']}: not run to {rows[name]['epochs']} epochs.")
    return lines + [""]


STATIONARY_EPOCHS = (1, 2, 5, 10, 20, 30, 50, 75, 100)


def _stationary(rows, figures) -> list[str]:
    row = rows["dense-100"]
    lines = ["## The stationary condition over training: Var(mu_j) + E[sigma_j^2] -> 1", "",
             f"{row['model']}; after every epoch on the whole training set ({row['images']:,} images). Seeds with "
             f"100 epochs: {_seeds(row)}; the dense row's 30-epoch runs are the first 30 epochs of the same runs. "
             f"{_cmd(row['command'])}.", "",
             "| epoch | seeds | max_j \\|Var(mu_j) + E[sigma_j^2] - 1\\| | mean_j |", "| --- | --- | --- | --- |"]
    tracks = stationary_tracks(rows)
    for epoch in STATIONARY_EPOCHS:
        at = {seed: t[epoch - 1] for seed, t in sorted(tracks.items()) if len(t) >= epoch}
        if not at:
            continue
        lines.append(f"| {epoch} | {', '.join(at)} | {fmt(summarize(p[1] for p in at.values()))} | "
                     f"{fmt(summarize(p[2] for p in at.values()))} |")
    if not tracks:
        lines.append("| not run | | | |")
    end = next((e for e in (100, 30) if sum(len(t) >= e for t in tracks.values()) >= 2), None)
    if end is not None:
        full = {seed: t for seed, t in tracks.items() if len(t) >= end}
        slopes = summarize(log_slope([(p[0], p[1]) for p in t[:end] if p[0] >= 10]) for t in full.values())
        first = {seed: next((p[0] for p in t[:end] if p[1] <= 0.1), None) for seed, t in full.items()}
        start = 30 if end == 100 else 10
        before = summarize(t[start - 1][1] for t in full.values())
        after = summarize(t[end - 1][1] for t in full.values())
        lines += ["", "Seed: the sum tends to 1 for every variable, active or not, as training reaches its "
                  f"stationary point. Here (seeds {', '.join(full)}) the largest deviation goes from {fmt(before)} at "
                  f"epoch {start} to {fmt(after)} at epoch {end} "
                  f"({_change(exceeds_spread(before, after), after['mean'] < before['mean'])}); fitted as "
                  f"max ~ epoch^a over epochs 10-{end}, a = {fmt(slopes)}. First epoch with every deviation <= 0.1, "
                  "per seed: " + ", ".join(f"s{seed}: {'never' if e is None else e}" for seed, e in first.items())
                  + "."]
    lines.append("")
    return (lines + _figure("stationary_deviation.png", figures, "largest and mean deviation per epoch, every seed")
            + _figure("latent_evolution.png", figures, "Var(mu_j) and E[sigma_j^2] per epoch, seed 0, its longest run"))


def _change(differs: bool | None, fell: bool) -> str:
    if differs is None:
        return "fewer than two seeds, no verdict"
    if not differs:
        return "no change beyond the seed spread"
    return "a fall beyond the seed spread" if fell else "a rise beyond the seed spread"


def stationary_tracks(rows) -> dict[str, list]:
    """Per seed the longest record of ``(epoch, max, mean)`` deviations: the dense-100 run's, else the dense one's
    (its first 30 epochs)."""
    tracks: dict[str, list] = {}
    for source in ("dense-100", "dense"):
        for seed, values in rows[source]["per_seed"].items():
            if "stationary" in values and len(values["stationary"]) > len(tracks.get(seed, [])):
                tracks[seed] = values["stationary"]
    return dict(sorted(tracks.items()))


def _balanced(rows) -> list[str]:
    lines = ["## Balanced loss against a fixed KL weight (equal epochs: 30)", "",
             "| loss | epochs | seeds | test MSE | FID first-stage | FID second-stage + per_dim | inactive of 16 "
             "| commands (seed k) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    pairs = (("dense", "fid-dense", "balanced (default)"),
             ("dense-beta", "fid-dense-beta", "beta, kl weight 1 (fixed)"))
    for train, fid, label in pairs:
        t, f = rows[train], rows[fid]
        lines.append(f"| {label} | {t['epochs']} | {_seeds(t)}; FID: {_seeds(f)} | {fmt(_s(t, 'test_mse'), 4)} | "
                     f"{fmt(_s(f, 'fid.first-stage'))} | {fmt(_s(f, 'fid.second-stage + per_dim'))} | "
                     f"{fmt(_s(t, 'inactive'))} | {_cmd(t['command'] + f['command'])} |")
    lines += ["", "Seed: balancing the reconstruction against the KL through gamma^2 = running MSE (the balanced loss) "
              "does better than a fixed KL weight."]
    for metric, source, what in (("test_mse", "", "test MSE"), ("fid.first-stage", "fid-", "FID first-stage"),
                                 ("fid.second-stage + per_dim", "fid-", "FID second-stage + per_dim")):
        balanced, beta = _s(rows[source + "dense"], metric), _s(rows[source + "dense-beta"], metric)
        lines.append(f"- {_verdict('balanced', balanced, 'beta', beta, what)}.")
    return lines + [""]


CAUSE_ROWS = (("dense", "full KL, sampling", "sparse"), ("dense-kl-none", "no KL", "no inactive variable"),
              ("dense-kl-quadratic", "quadratic penalty mu^2/2 only", "no inactive variable"),
              ("dense-no-sampling", "full KL, z = mu", "(not stated)"))


def _causes(rows, figures) -> list[str]:
    lines = ["## What causes sparsity: the KL term and the sampling", "",
             "| objective | epochs | seeds | seed's claim | inactive | used | largest \\|Var+E-1\\| "
             "| mean \\|Var+E-1\\| | test MSE | commands (seed k) |", _rule(10)]
    for name, what, claim in CAUSE_ROWS:
        row = rows[name]
        lines.append(f"| {what} | {row['epochs']} | {_seeds(row)} | {claim} | {_train_cells(row)} | "
                     f"{_cmd(row['command'])} |")
    lines += ["", "3-D latent space (784-256-64-16-3), figures `RUN/analysis/latent_3d.png` and `latent_slices.png` "
              "(seed 0's below):", "",
              "| run | epochs | seeds | inactive of 3 | used | largest \\|Var+E-1\\| | mean \\|Var+E-1\\| | test MSE | "
              "commands (seed k) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, what in (("dense3d", "sampling, full KL"), ("dense3d-nosampling-quadratic", "no sampling, quadratic KL")):
        row = rows[name]
        lines.append(f"| {what} | {row['epochs']} | {_seeds(row)} | {_train_cells(row)} | {_cmd(row['command'])} |")
    lines.append("")
    for kind, label in (("sampling", "sampling, full KL"), ("nosampling-quadratic", "no sampling, quadratic KL")):
        lines += _figure(f"latent_3d-{kind}.png", figures, f"latent means, {label}")
        lines += _figure(f"latent_slices-{kind}.png", figures, f"generation from five slices, {label}")
    return lines


def _noise_injection(rows, figures) -> list[str]:
    row = rows["noise"]
    lines = ["## Noise injection and its reversal", "",
             f"{row['model']}; seeds {_seeds(row)}. {_cmd(row['command'])} (`RUN/noise_injection/history.csv`, "
             "`noise_injection.png`). The injected variable is, per seed, the active one with the smallest gain; "
             "the inactive ones are held inactive.", "",
             "| | noise std | gain (nats) | KL | Var(mu) | E[sigma^2] |", "| --- | --- | --- | --- | --- | --- |"]
    for phase, label in (("start", "start"), ("stopped", "noise stopped"), ("end", "after 3 epochs without noise")):
        lines.append(f"| {label} | " + " | ".join(fmt(_s(row, f"{phase}.{k}")) for k in NOISE_FIELDS) + " |")
    variables = {seed: v.get("variable") for seed, v in row["per_seed"].items() if int(seed) in row["seeds"]}
    lines += ["", "Injected variable per seed: " + (", ".join(f"s{s}: {v}" for s, v in variables.items()) or "not run")
              + f". The gain fell below the KL in {_flag_count(_s(row, 'gain_below_kl'))}; the variable was inactive "
              f"when the noise stopped in {_flag_count(_s(row, 'inactive_when_stopped'))} and active after the "
              f"recovery in {_flag_count(_s(row, 'active_at_end'))} (inactive: Var(mu) < 0.05 and E[sigma^2] > 0.8). "
              "Seed: growing noise makes an active variable inactive once its gain falls below its KL; the reversal "
              "asks whether it comes back when the noise is removed.", ""]
    return (lines + _figure("noise_injection_seeds.png", figures, "noise injection and reversal, every seed")
            + _figure("noise_injection.png", figures, "noise injection and reversal, seed 0"))


FID_COLUMNS = ("fid-dense", "fid-dense-beta", "fid-conv")
#: the comparisons the seed's two-stage claims rest on: (better?, than, what it tests)
FID_CLAIMS = (("second-stage", "first-stage", "a second stage against sampling the first stage's prior"),
              ("second-stage + per_dim", "second-stage", "per-dimension renormalization"),
              ("second-stage + scalar", "second-stage + per_dim", "scalar against per-dimension renormalization"),
              ("active second-stage + scalar", "second-stage + per_dim",
               "the active-only second stage + scalar against the plain one + per_dim"),
              ("active second-stage", "active second-stage, zeros", "inactive variables filled with noise or zeros"))


def _two_stage_fid(rows) -> list[str]:
    cols = [rows[c] for c in FID_COLUMNS]
    lines = ["## Two-stage generation: FID (fastvae classifier features, 10,000 samples)", "",
             "| setting | " + " | ".join(f"{c['model']}, {c['epochs']} epochs, "
                                         f"seeds {_seeds(c)}" for c in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    settings = dict.fromkeys(k[4:] for c in cols for k in c["summary"] if k.startswith("fid."))
    for k in settings:
        lines.append(f"| {k} | " + " | ".join(fmt(_s(c, "fid." + k)) for c in cols) + " |")
    if not settings:
        lines.append("| not run |" + " |" * len(cols))
    lines += ["", "Differences beyond the seed spread (lower FID is better):"]
    for c in cols:
        for a, b, what in FID_CLAIMS:
            sa, sb = _s(c, "fid." + a), _s(c, "fid." + b)
            if sa is not None and sb is not None:
                lines.append(f"- {c['name'][4:]}, {what}: {_verdict(a, sa, b, sb, 'FID')}.")
    lines += ["", "Active second stage: trained on the active variables only, inactive ones filled with N(0, 1) noise "
              "(or zeros) at generation. Commands (seed k): " + _cmd(cols[0]["command"]) + "; once: "
              + _cmd(rows["fid-features"]["command"]) + ".", ""]
    return lines


def _cost(rows) -> list[str]:
    lines = ["## The runs behind each row", "",
             "Seeds complete (and how far the others got), and the user + sys CPU seconds of each seed's commands "
             "(one thread each, on a machine shared with other work; blank where the run was not timed):", "",
             "| row | what | epochs | training images | seeds | CPU s per seed | total CPU s |", _rule(7)]
    total = 0.0
    for row in rows.values():
        spent = row["cpu_s"]
        total += sum(spent.values())
        per_seed = ", ".join(f"s{seed}: {value:.0f}" for seed, value in spent.items())
        lines.append(f"| {row['name']} | {row['model']} | {row['epochs']} | {row['images']:,} | {_seeds(row)} | "
                     f"{per_seed} | {sum(spent.values()):.0f} |")
    return lines + ["", f"Total: {total:.0f} CPU s ({total / 3600:.2f} CPU h).", ""]


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
#: figures copied next to the table by ``--out`` (source under RUNS, file name in the figures folder)
FIGURES = (
    ("dense/s0/noise_injection/noise_injection.png", "noise_injection.png"),
    ("dense3d/s0/analysis/latent_3d.png", "latent_3d-sampling.png"),
    ("dense3d/s0/analysis/latent_slices.png", "latent_slices-sampling.png"),
    ("dense3d-nosampling-quadratic/s0/analysis/latent_3d.png", "latent_3d-nosampling-quadratic.png"),
    ("dense3d-nosampling-quadratic/s0/analysis/latent_slices.png", "latent_slices-nosampling-quadratic.png"),
    ("dense-100/s0/latent_evolution.png", "latent_evolution.png"),
    ("dense/s0/latent_evolution.png", "latent_evolution.png"),  # when the 100-epoch run is missing
)
FIGURE_DIR = "science"


def write_figures(runs: Path, data: dict, out_dir: Path) -> list[str]:
    """Copy the ``FIGURES`` that exist under ``runs`` into ``out_dir/science`` and draw the stationary deviation
    of every seed (``stationary_deviation.png``) from ``data``; the names of the figures written."""
    written = []
    for source, name in FIGURES:
        if name not in written and (Path(runs) / source).is_file():
            (out_dir / FIGURE_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(runs) / source, out_dir / FIGURE_DIR / name)
            written.append(name)
    from . import experiment_plots

    rows = {row["name"]: row for row in data["rows"]}
    tracks = {f"seed {s}": track for s, track in stationary_tracks(rows).items()}
    noise = rows["noise"]
    histories = {f"seed {s}": noise["per_seed"][str(s)]["history"] for s in noise["seeds"]
                 if "history" in noise["per_seed"][str(s)]}
    for name, values, draw in (("stationary_deviation.png", tracks, experiment_plots.stationary_deviation),
                               ("noise_injection_seeds.png", histories, experiment_plots.noise_injection_seeds)):
        if values:
            (out_dir / FIGURE_DIR).mkdir(parents=True, exist_ok=True)
            draw(values, out_dir / FIGURE_DIR / name)
            written.append(name)
    return written


def _figure(name: str, figures, alt: str) -> list[str]:
    return [f"![{alt}]({FIGURE_DIR}/{name})", ""] if name in figures else []


# --------------------------------------------------------------------------------------------------
# The tracked training
# --------------------------------------------------------------------------------------------------
class EpochLatentTracker:
    """Training callback: after each epoch, ``Var(mu_j)`` and ``E[sigma_j^2]`` of the model on ``images`` (the
    whole training set), appended to ``RUN/latent_evolution.json`` (the ``fastvae.LatentTracker`` format plus
    ``epoch``). A resumed run's earlier records are kept, so a run resumed from 30 to 100 epochs holds all 100."""

    def __init__(self, images, history: dict | None = None, *, batch_size: int = 1000):
        self.images, self.batch_size = images, batch_size
        self.history = history or {"epoch": [], "step": [], "var_mu": [], "mean_sigma2": []}

    def __call__(self, *, model, step: int, epoch: int, out_dir=None, epoch_end: bool = False, **_) -> None:
        if not epoch_end:
            return
        from .analysis import latent_statistics
        from .plots import latent_evolution

        stats = latent_statistics(model, self.images, batch_size=self.batch_size, gain=False)
        for key, value in (("epoch", int(epoch)), ("step", int(step)), ("var_mu", stats.var_mu.tolist()),
                           ("mean_sigma2", stats.mean_sigma2.tolist())):
            self.history[key].append(value)
        if out_dir is not None:
            (Path(out_dir) / LATENT_EVOLUTION).write_text(json.dumps(self.history) + "\n")
            latent_evolution(self.history, Path(out_dir) / "latent_evolution.png")


LATENT_EVOLUTION = "latent_evolution.json"


def train_tracked(argv: list[str]) -> int:
    """``fastvae train ARGV`` (``--resume RUN`` included) with an ``EpochLatentTracker`` on its training set."""
    from .cli import build_parser
    from .cli.train import _config
    from .data import load_dataset
    from .train import train
    from .train.config import TrainConfig
    from .train.from_config import resolved_dataset

    args = build_parser().parse_args(["train", *argv])
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    config, state = _config(args, fields)
    name, _ = resolved_dataset(config.validate())
    images, _ = load_dataset(name, config.data_root, "train", download=config.download)
    images = images[:config.limit] if config.limit else images
    history = _json(Path(config.out) / LATENT_EVOLUTION) if state is not None else None
    if history is not None:  # keep only the records up to the checkpoint being resumed
        keep = sum(e <= state["epoch"] for e in history["epoch"])
        history = {k: v[:keep] for k, v in history.items()}
    train(config, resume=state is not None, callbacks=[EpochLatentTracker(images, history)], echo=print)
    return 0


CPU_TIME = "cputime.jsonl"


def run_commands(lines, runs: Path, *, log=print) -> int:
    """Run each shell command of ``lines`` with bash, one after another (on past a failure), appending
    ``{"command", "user_s", "sys_s", "wall_s", "rc", "end"}`` per command to ``RUNS/cputime.jsonl`` (the CPU
    seconds of its children, from ``resource.getrusage``); the number of commands that failed."""
    import resource
    import subprocess
    import time

    failed = 0
    Path(runs).mkdir(parents=True, exist_ok=True)
    for line in lines:
        log(f"science_table: {line}")
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        rc = subprocess.call(["bash", "-c", line])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        failed += rc != 0
        entry = {"command": line, "user_s": round(after.ru_utime - before.ru_utime, 2),
                 "sys_s": round(after.ru_stime - before.ru_stime, 2), "wall_s": round(time.perf_counter() - start, 2),
                 "rc": rc, "end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(Path(runs) / CPU_TIME, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvae.science_table", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="the folder holding the run folders (default: runs)")
    parser.add_argument("--out", default=None,
                        help="Markdown file to write, the JSON record beside it (.json; default: print the Markdown)")
    parser.add_argument("--json", default=None, metavar="JSON",
                        help="render from this record (a docs/science.json) instead of reading --runs")
    parser.add_argument("--commands", action="store_true", help="print the commands that make the runs, as a script")
    parser.add_argument("--run", action="store_true",
                        help="run the commands (of --rows, default all) one by one, their CPU time into "
                             f"RUNS/{CPU_TIME}")
    parser.add_argument("--rows", nargs="+", metavar="ROW", choices=list(ROW),
                        help="with --commands or --run: only these rows' commands, in this order")
    parser.add_argument("--train-tracked", action="store_true",
                        help="as the first argument, then fastvae train's options: train with the per-epoch "
                             "latent tracker")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--train-tracked"]:
        return train_tracked(argv[1:])
    args = parser.parse_args(argv)
    if args.commands:
        print("set -e")
        print("\n".join(commands(args.runs, args.rows)))
        return 0
    if args.run:
        return 1 if run_commands(commands(args.runs, args.rows), Path(args.runs)) else 0
    data = json.loads(Path(args.json).read_text()) if args.json else collect(Path(args.runs))
    if args.out:
        out = Path(args.out)
        figures = write_figures(Path(args.runs), data, out.parent)
        if args.json:  # figures copied from run folders by an earlier build stay where they are
            figures += [name for _, name in FIGURES if (out.parent / FIGURE_DIR / name).is_file()]
        out.write_text(render(data, figures))
        if not args.json:
            out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    else:
        sys.stdout.write(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

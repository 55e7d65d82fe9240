"""``python -m bench.readme``: README's performance tables, generated from ``bench/results/``.

The tables sit between ``<!-- bench:cpu:begin -->`` and ``<!-- bench:cpu:end -->`` in README.md:
the training loop (``cpu_loop.csv``) and, per op and mode, fused time over eager time from
``cpu.csv``: the geometric mean over the sizes and the largest ratio of any size. ``--check`` writes
nothing and exits 1 when README differs from what the results files say (the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .cases import MODE_TITLES, MODES, OPS
from .report import geomean, read_csv

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- bench:cpu:begin -->", "<!-- bench:cpu:end -->"
_LOOP_NAMES = {
    "fastvae": "fastvae `fit` (as `fastvae train`)",
    "fastvae-bf16": "fastvae `fit`, `--precision bf16`",
    "fastvae-compile": "fastvae `fit`, `--compile`",
    "tensors": "hand-written loop over in-memory tensors",
    "plain": "pytorch/examples style (DataLoader, PIL + ToTensor per image)",
    "pythae": "pythae 0.1.2 `BaseTrainer`",
}
_MODEL_NAMES = {"dense": "dense 784-256-64-32-16", "conv": "conv"}


def _ratios(rows: list[dict], op: str, mode: str) -> list[float]:
    """fused/eager per case of ``op`` in ``mode``."""
    by = {(r["case"], r["provider"]): r.get("median_ms") for r in rows if r["op"] == op and r["mode"] == mode}
    cases = dict.fromkeys(case for case, _ in by)
    return [by[(c, "fused")] / by[(c, "eager")] for c in cases if by.get((c, "fused")) and by.get((c, "eager"))]


def ops_table(rows: list[dict]) -> list[str]:
    head = " | ".join(f"{MODE_TITLES[m]}" for m in MODES)
    lines = [f"| op | {head} |", "| --- |" + " ---: |" * len(MODES)]
    for op in OPS:
        cells = []
        for mode in MODES:
            ratios = _ratios(rows, op, mode)
            cells.append(f"{geomean(ratios):.2f} (max {max(ratios):.2f})" if ratios else "–")
        if any(c != "–" for c in cells):
            lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    return lines


def loop_table(rows: list[dict]) -> list[str]:
    lines = ["| model | loop | epoch s | steps s | CPU s | images/s | time / plain | time / tensors |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r.get("epoch_s")]
        tensors = next((r["epoch_s"] for r in mine if r["loop"] == "tensors"), None)
        for k, r in enumerate(mine):
            ratio = f"{r['vs_plain']:.2f}" if r.get("vs_plain") else "–"
            vs_tensors = f"{r['epoch_s'] / tensors:.2f}" if tensors else "–"
            steps, cpu = (f"{r[key]:.2f}" if r.get(key) else "–" for key in ("train_s", "cpu_s"))
            lines.append(f"| {_MODEL_NAMES.get(model, model) if k == 0 else ''} | {_LOOP_NAMES.get(r['loop'], r['loop'])} | "
                         f"{r['epoch_s']:.2f} | {steps} | {cpu} | {r['images_per_s']:,.0f} | {ratio} | {vs_tensors} |")
    return lines


def block(results: Path = RESULTS) -> str:
    """The generated text between the markers (markers included)."""
    meta = json.loads((results / "cpu.json").read_text()) if (results / "cpu.json").is_file() else {}
    sections = meta.get("sections", {})
    commands = sorted({f"`{s['command']}` ({s['date']}, load average {s.get('load', '?')})"
                       for s in sections.values() if s.get("command")})
    lines = [BEGIN, "", f"Machine: {meta.get('machine', '?')}. Runs: {'; '.join(commands) or '–'}.", "",
             "Training loop, Fashion-MNIST train split, batch 128, Adam, interleaved epochs of each loop, each "
             "epoch ending with the same work as `fastvae train`'s (test-split evaluation, two image grids, a "
             "checkpoint). Epoch s: wall time of the whole epoch (median); steps s: the training steps alone; "
             "CPU s: the process's CPU seconds per epoch:", ""]
    lines += loop_table(read_csv(results / "cpu_loop.csv"))
    lines += ["", "Fused ops on the CPU: fused time over eager time, the geometric mean over the sizes and, in parentheses, "
              "the largest ratio of any size (below 1 the fused op is faster):", ""]
    lines += ops_table(read_csv(results / "cpu.csv"))
    return "\n".join(lines + ["", END])


def render(readme: str, generated: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    return pattern.sub(lambda _: generated, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README's tables differ from the results files")
    args = parser.parse_args(argv)
    current = README.read_text()
    updated = render(current, block())
    if args.check:
        if updated != current:
            print("README.md's performance tables differ from bench/results/: run python -m bench.readme")
            return 1
        return 0
    README.write_text(updated)
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.readme``: the generated blocks of README and its docs pages: performance tables, accuracy,
machine code, layout.

Each block sits in one page of ``PAGES`` (README.md and the docs/ pages it links); ``render_all`` writes afresh
every block a page holds. The tables sit between ``<!-- bench:cpu:begin -->`` and ``<!-- bench:cpu:end -->``
(docs/performance.md), one part per machine that has results (``cpu-<machine slug>.json``, ``.csv``,
``_loop.csv``): the training loop and, per op and mode, fused time over eager time: the geometric mean over the sizes
and the largest ratio of any size. The layout tree sits between ``<!-- layout:begin -->`` and
``<!-- layout:end -->``: every package and module of ``fastvae/``, ``kernels/`` and ``bench/``, each with the first
sentence of its docstring. The machine-code headline and the
predicted speedups come from ``static.md`` (``<!-- bench:static:begin/end -->``), the largest kernel errors
per dtype from ``accuracy.md`` (``<!-- bench:accuracy:begin/end -->``), bf16 against fp32 in ``fastvae train``
from ``precision-<device>.json`` (``<!-- bench:precision:begin/end -->``). ``--check`` writes nothing and
exits 1 when a page differs from what the results files and the modules say, or a block is in no page (the test
suite runs it).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

from .cases import MODE_TITLES, MODES, OPS
from .precision import table as precision_table
from .process import table as process_table
from .report import careful_best, geomean, read_csv

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PERFORMANCE, OPS_PAGE, LAYOUT = DOCS / "performance.md", DOCS / "ops.md", DOCS / "layout.md"
#: the pages that hold generated blocks (README links each docs page)
PAGES = (README, OPS_PAGE, PERFORMANCE, LAYOUT)
BEGIN, END = "<!-- bench:cpu:begin -->", "<!-- bench:cpu:end -->"
LAYOUT_BEGIN, LAYOUT_END = "<!-- layout:begin -->", "<!-- layout:end -->"
STATIC_BEGIN, STATIC_END = "<!-- bench:static:begin -->", "<!-- bench:static:end -->"
ACCURACY_BEGIN, ACCURACY_END = "<!-- bench:accuracy:begin -->", "<!-- bench:accuracy:end -->"
PRECISION_BEGIN, PRECISION_END = "<!-- bench:precision:begin -->", "<!-- bench:precision:end -->"
#: the trees the layout draws, and the folders without Python modules it names in one line
_TREES = ("fastvae", "kernels", "bench")
_FOLDERS = {
    "bench/results": "measured numbers (csv, json, md, png); README's tables are generated from them",
    "docs": "the pages README links (training, ops, performance, layout) and science.md with its figures",
}
_LOOP_NAMES = {
    "fastvae": "fastvae `fit` (as `fastvae train`: precision auto)",
    "fastvae-fp32": "fastvae `fit`, `--precision fp32`",
    "fastvae-bf16": "fastvae `fit`, `--precision bf16`",
    "fastvae-compile": "fastvae `fit`, `--compile`",
    "tensors": "careful hand-written loop over in-memory tensors",
    "tensors-bf16": "the same careful loop, bf16 autocast",
    "tensors-ftz": "the same careful loop, fp32, subnormals flushed to zero as fit flushes them",
    "bare": "that careful loop around fastvae's own step (its ops, its precision)",
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
    lines = ["| model | loop | precision | epoch s | steps s | CPU s | images/s | time / plain | "
             "time / best careful (epoch, steps) | step GFLOP/s (of GEMM) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r.get("epoch_s")]
        best_epoch, best_steps = careful_best(mine, model), careful_best(mine, model, "train_s")
        for k, r in enumerate(mine):
            ratio = f"{r['vs_plain']:.2f}" if r.get("vs_plain") else "–"
            careful = (f"{r['epoch_s'] / best_epoch:.2f}, {r['train_s'] / best_steps:.2f}"
                       if best_epoch and best_steps and r.get("train_s") else "–")
            steps, cpu = (f"{r[key]:.2f}" if r.get(key) else "–" for key in ("train_s", "cpu_s"))
            measured = r.get("step_gflops") and r.get("of_gemm")
            gflops = f"{r['step_gflops']:.0f} ({r['of_gemm']:.0%})" if measured else "–"
            name = _MODEL_NAMES.get(model, model) if k == 0 else ""
            lines.append(f"| {name} | {_LOOP_NAMES.get(r['loop'], r['loop'])} | {r.get('precision') or '–'} | "
                         f"{r['epoch_s']:.2f} | {steps} | {cpu} | {r['images_per_s']:,.0f} | {ratio} | {careful} | "
                         f"{gflops} |")
    return lines


def _load_range(sections: list[dict]) -> str:
    """The load averages written beside the sections of one run (``"a to b"`` each) as one range."""
    loads = [float(x) for s in sections for x in str(s.get("load", "")).split(" to ") if x.replace(".", "").isdigit()]
    return f"{min(loads)} to {max(loads)}" if loads else "?"


def loop_overhead(rows: list[dict]) -> list[str]:
    """Per model, ``fastvae``'s steps seconds over ``bare``'s, as ``"dense 1.04x"``."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        steps = {r["loop"]: r.get("train_s") for r in rows if r["model"] == model}
        if steps.get("fastvae") and steps.get("bare"):
            out.append(f"{_MODEL_NAMES.get(model, model)} {steps['fastvae'] / steps['bare']:.2f}x")
    return out


def machine_files(results: Path = RESULTS) -> list[str]:
    """The CPU machines with results in ``results``: the names ``cpu-<machine slug>`` of their files, sorted (a
    machine's other records, such as ``cpu-<slug>_process.json``, are not machines)."""
    return sorted(path.stem for path in results.glob("cpu-*.json") if "_" not in path.stem)


def machine_block(results: Path, name: str) -> list[str]:
    """One machine's tables: where and how they were measured, the training loop, the ops' ratios."""
    meta = json.loads((results / f"{name}.json").read_text())
    sections = meta.get("sections", {})
    runs: dict[str, list[dict]] = {}  # one entry per command: the ops of one run share it
    for s in sections.values():
        if s.get("command"):
            runs.setdefault(s["command"], []).append(s)
    commands = sorted(f"`{command}` ({min(s['date'] for s in parts)}, load average {_load_range(parts)})"
                      for command, parts in runs.items())
    lines = [f"#### {meta.get('machine', name).split(';')[0]}", "",
             f"Machine: {meta.get('machine', '?')} ([`bench/results/{name}.md`](../bench/results/{name}.md)). "
             f"Runs: {'; '.join(commands) or '–'}.", ""]
    loop_rows = read_csv(results / f"{name}_loop.csv")
    if loop_rows:
        lines += ["Training loop, Fashion-MNIST train split, batch 128, Adam, interleaved epochs of each loop, each "
                  "epoch ending with the same work as `fastvae train`'s (test-split evaluation, two image grids, a "
                  "checkpoint). Epoch s: wall time of the whole epoch (median); steps s: the training steps alone; "
                  "CPU s: the process's CPU seconds per epoch; best careful: the faster of the two careful "
                  "hand-written loops; step GFLOP/s: the steps' matmul and convolution FLOPs per second and, in "
                  "parentheses, that over this machine's measured GEMM rate in the loop's precision:", "",
                  *loop_table(loop_rows), ""]
        overhead = loop_overhead(loop_rows)
        if overhead:
            lines += ["What fastvae's loop adds around its ops, its steps' seconds over the bare step's (`bare`: the "
                      "careful loop around the same ops, in the same precision): " + "; ".join(overhead) + ".", ""]
    process = results / f"{name}_process.json"
    if process.is_file():
        record = json.loads(process.read_text())
        lines += [f"The whole process, start-up included, {record['epochs']} epochs of each, in turns "
                  f"(`{record['command']}`, {record['date']}, load average {record['load']}): `fastvae train` with "
                  "its defaults (precision auto, measured afresh in every run) against pytorch/examples' VAE script "
                  "on the same model (`bench/examples_vae.py`):", "", *process_table(record), ""]
    op_rows = read_csv(results / f"{name}.csv")
    if op_rows:
        lines += ["Fused ops on the CPU: fused time over eager time, the geometric mean over the sizes and, in "
                  "parentheses, the largest ratio of any size (below 1 the fused op is faster):", "",
                  *ops_table(op_rows), ""]
    return lines


def block(results: Path = RESULTS) -> str:
    """The generated text between the markers (markers included): every machine's tables, one after another."""
    names = machine_files(results)
    lines = [BEGIN, "", f"Measured on {len(names)} machine(s), each in its own results file; a number holds for the "
             "machine named above its table.", ""]
    for name in names:
        lines += machine_block(results, name)
    return "\n".join(lines + [END])


def summary(path: Path, limit: int = 90) -> str:
    """The first sentence of the module's docstring without its reST backquotes, at most ``limit`` characters."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = " ".join(doc.split("\n\n")[0].replace("``", "").split())
    end = text.find(". ")
    text = text if end < 0 else text[:end + 1]
    if len(text) > limit:
        text = text[:text.rfind(" ", 0, limit - 3)] + " ..."
    return text


def _tree(folder: Path, root: Path, depth: int) -> list[tuple[str, str]]:
    """``(indented name, summary)`` for ``folder`` (its ``__init__``'s summary) and, below it, its modules
    and subpackages in name order."""
    init = folder / "__init__.py"
    rows = [("  " * depth + folder.name + "/", summary(init) if init.is_file() else "")]
    relative = folder.relative_to(root).as_posix()
    if relative in _FOLDERS:
        rows[0] = (rows[0][0], _FOLDERS[relative])
    for child in sorted(folder.iterdir()):
        if child.is_dir() and ((child / "__init__.py").is_file() or child.relative_to(root).as_posix() in _FOLDERS):
            rows += _tree(child, root, depth + 1)
        elif child.suffix == ".py" and child.name != "__init__.py":
            rows.append(("  " * (depth + 1) + child.name, summary(child)))
    return rows


def layout_block(root: Path = ROOT) -> str:
    """The generated layout tree between its markers (markers included)."""
    rows = [row for name in _TREES for row in _tree(root / name, root, 0)]
    tests = sorted((root / "tests").glob("test_*.py"))
    rows.append(("tests/", f"pytest suite, {len(tests)} modules; conftest.py runs the kernels in Triton's interpreter"))
    rows += [(name + "/", text) for name, text in _FOLDERS.items() if "/" not in name]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{name:<{width}}{text}".rstrip() for name, text in rows]
    return "\n".join([LAYOUT_BEGIN, "", "```text", *lines, "```", "", LAYOUT_END])


def markdown_table(text: str, heading: str | None = None) -> list[dict[str, str]]:
    """The rows of the first table of a markdown report (under its ``## heading...`` when given), as dicts
    by column."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## " + heading)) + 1 if heading else 0
    end = next((i for i, line in enumerate(lines[start:], start) if line.startswith("## ")), len(lines))
    rows = [line for line in lines[start:end] if line.startswith("|")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def static_block(results: Path = RESULTS) -> str:
    """The machine-code headline (sm_89, float32, aligned) and the predicted speedups of each op's forward +
    backward, from ``static.md`` (``python -m bench --only static``)."""
    text = (results / "static.md").read_text()
    lines = [STATIC_BEGIN, "",
             "| kernel | pass | variant | registers | spills (B st/ld) | 128-bit loads / all | 128-bit stores / all |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for row in markdown_table(text, "Headline"):
        if row["dtype"] == "float32":
            lines.append(f"| {row['kernel']} | {row['pass']} | {row['variant']} | {row['registers']} | "
                         f"{row['spills (B st/ld)']} | "
                         f"{row['128-bit loads']} | {row['128-bit stores']} |")
    lines += ["", "**Predicted** (a cost model on paper, not a measurement; `static.md` states its assumptions), "
              "forward + backward:", "",
              "| op | case | eager B/element | fused B/element | predicted speedup, RTX 4090 | H100 SXM |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in markdown_table(text, "Cost model"):
        if row["pass"] == "full" and row.get("predicted speedup, RTX 4090"):
            lines.append(f"| `{row['op']}` | {row['case']} | {row['eager B/elem']} | {row['fused B/elem']} | "
                         f"{row['predicted speedup, RTX 4090']} | {row['predicted speedup, H100 SXM']} |")
    return "\n".join(lines + ["", STATIC_END])


def accuracy_block(results: Path = RESULTS) -> str:
    """The largest error of any output per dtype, from ``accuracy.md`` (``python -m bench.accuracy``)."""
    rows = markdown_table((results / "accuracy.md").read_text())
    worst = {dtype: max(float(row[dtype]) for row in rows) for dtype in ("float32", "float16", "bfloat16", "float64")}
    return "".join([ACCURACY_BEGIN, f"at most {worst['float32']:.1e} in float32, {worst['float16']:.1e} in float16, "
                    f"{worst['bfloat16']:.1e} in bfloat16 and {worst['float64']:.1e} in float64", ACCURACY_END])


def precision_block(results: Path = RESULTS) -> str:
    """bf16 against fp32 in ``fastvae train``, from every machine's ``precision-<device>.json``
    (``python -m bench.precision``), one table each."""
    lines = [PRECISION_BEGIN, ""]
    for path in sorted(results.glob("precision-*.json")):
        meta = json.loads(path.read_text())
        lines += [f"`{meta['command']}` ({meta['date']}; {meta['machine']}):", "",
                  *precision_table(meta["rows"], meta["machine"].split(" (")[0].split(",")[0]), ""]
    return "\n".join(lines + [PRECISION_END])


def render(readme: str, generated: str, begin: str = BEGIN, end: str = END) -> str:
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {begin} ... {end} block")
    return pattern.sub(lambda _: generated, readme)


def _blocks(results: Path, root: Path):
    """``(begin, end, make)`` of every generated block; ``make()`` writes it."""
    return ((BEGIN, END, lambda: block(results)), (STATIC_BEGIN, STATIC_END, lambda: static_block(results)),
            (ACCURACY_BEGIN, ACCURACY_END, lambda: accuracy_block(results)),
            (PRECISION_BEGIN, PRECISION_END, lambda: precision_block(results)),
            (LAYOUT_BEGIN, LAYOUT_END, lambda: layout_block(root)))


def render_all(page: str, results: Path = RESULTS, root: Path = ROOT) -> str:
    """A page with every generated block it holds written afresh."""
    for begin, end, make in _blocks(results, root):
        if begin in page:
            page = render(page, make(), begin, end)
    return page


def missing_blocks(pages: dict[Path, str]) -> list[str]:
    """The blocks that no page holds."""
    return [begin for begin, _, _ in _blocks(RESULTS, ROOT) if not any(begin in text for text in pages.values())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when README's generated blocks differ from the results files and modules")
    args = parser.parse_args(argv)
    current = {page: page.read_text() for page in PAGES}
    missing = missing_blocks(current)
    if missing:
        print(f"no page of {[str(p.relative_to(ROOT)) for p in PAGES]} holds {', '.join(missing)}")
        return 1
    updated = {page: render_all(text) for page, text in current.items()}
    stale = [str(page.relative_to(ROOT)) for page in PAGES if updated[page] != current[page]]
    if args.check:
        if stale:
            print(f"the generated blocks of {', '.join(stale)} (performance tables, layout) differ from "
                  "bench/results/ and the modules: run python -m bench.readme")
            return 1
        return 0
    for page in PAGES:
        if updated[page] != current[page]:
            page.write_text(updated[page])
            print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writing the results: ``<out>/<device>.md`` (tables), ``<device>.csv`` (every op row),
``<device>_loop.csv`` (every loop epoch summary), ``<device>_<op>.png`` (one chart per op, drawn by
``fastvae.plots.benchmark_bars``) and ``<device>.json`` (when and how each section was measured).

A run of a subset (``--only``) replaces that subset's rows and keeps the others from the files already
in ``out``, so ``bench/results/<device>.md`` always shows every section, each dated.

Ratios are times, fused over the other provider: below 1 the fused op is faster.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from .cases import MODE_TITLES, MODES, OPS, PROVIDERS
from .measure import Row

# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
_INT_COLUMNS = {"rounds", "launches", "triton_launches", "saved_bytes", "saved_beyond_inputs", "peak_bytes",
                "min_bytes", "epochs", "images"}


def _parse(value: str):
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return number


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = []
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                text = key in ("case", "note", "op", "mode", "provider", "device", "model", "loop")
                parsed = value if text else _parse(value)
                row[key] = int(parsed) if key in _INT_COLUMNS and isinstance(parsed, float) else parsed
            rows.append(row)
        return rows


def merge(old: Iterable[dict], new: Iterable[dict], key: str, replaced: set[str]) -> list[dict]:
    """``old`` without the rows whose ``key`` is in ``replaced``, then ``new``."""
    return [r for r in old if r.get(key) not in replaced] + list(new)


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------
def fmt_ms(ms) -> str:
    if ms is None:
        return "–"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_time(row: dict) -> str:
    if row.get("median_ms") is None:
        return "–"
    return f"{fmt_ms(row['median_ms'])} [{fmt_ms(row.get('p20_ms'))}, {fmt_ms(row.get('p80_ms'))}]"


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "–"
    return f"{a / b:.2f}"


def _fmt_int(n) -> str:
    return "–" if n is None else str(int(n))


def geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


# --------------------------------------------------------------------------------------------------
# Op tables
# --------------------------------------------------------------------------------------------------
def _by_key(rows: Sequence[dict]) -> dict[tuple[str, str, str, str], dict]:
    return {(r["op"], r["case"], r["mode"], r["provider"]): r for r in rows}


def _cases(rows: Sequence[dict], op: str) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["op"] == op and r["case"] not in seen:
            seen.append(r["case"])
    return seen


def summary(rows: Sequence[dict]) -> list[dict]:
    """Per op and mode: the geometric means over cases of fused/eager and fused/compile, and how many
    cases the fused op wins against each (a lower median)."""
    index = _by_key(rows)
    out = []
    for op in [o for o in OPS if any(r["op"] == o for r in rows)]:
        for mode in MODES:
            vs = {"eager": [], "compile": []}
            wins = {"eager": 0, "compile": 0}
            for case in _cases(rows, op):
                fused = index.get((op, case, mode, "fused"), {}).get("median_ms")
                for other in vs:
                    theirs = index.get((op, case, mode, other), {}).get("median_ms")
                    if fused and theirs:
                        vs[other].append(fused / theirs)
                        wins[other] += fused < theirs
            if vs["eager"] or vs["compile"]:
                out.append({"op": op, "mode": mode, "cases": max(len(vs["eager"]), len(vs["compile"])),
                            "vs_eager": geomean(vs["eager"]), "vs_compile": geomean(vs["compile"]),
                            "wins_eager": wins["eager"], "wins_compile": wins["compile"],
                            "n_eager": len(vs["eager"]), "n_compile": len(vs["compile"])})
    return out


def _summary_table(rows: Sequence[dict]) -> list[str]:
    lines = ["| op | mode | fused/eager (geomean) | fused wins vs eager | fused/compile (geomean) "
             "| fused wins vs compile |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for s in summary(rows):
        ge = "–" if s["vs_eager"] is None else f"{s['vs_eager']:.2f}"
        gc = "–" if s["vs_compile"] is None else f"{s['vs_compile']:.2f}"
        lines.append(f"| {s['op']} | {MODE_TITLES[s['mode']]} | {ge} | {s['wins_eager']}/{s['n_eager']} | {gc} | "
                     f"{s['wins_compile']}/{s['n_compile']} |")
    return lines


def _launches(index, op, case, mode) -> str:
    parts = []
    for p in PROVIDERS:
        r = index.get((op, case, mode, p))
        if r is None:
            parts.append("–")
            continue
        text = _fmt_int(r.get("launches"))
        if p == "fused" and r.get("triton_launches") is not None:
            text += f" ({_fmt_int(r['triton_launches'])} T)"
        parts.append(text)
    return " / ".join(parts)


def op_table(rows: Sequence[dict], op: str, mode: str, cuda: bool) -> list[str]:
    """One markdown table: a line per case of ``op`` in ``mode``."""
    index = _by_key(rows)
    header = ["case", "eager ms [p20, p80]", "compile ms [p20, p80]", "fused ms [p20, p80]", "fused/eager",
              "fused/compile",
              "launches e / c / f"]
    if mode == "forward":
        header += ["saved for backward e / c / f", "beyond inputs e / c / f"]
    if cuda:
        header += ["peak mem e / c / f", "bandwidth e / c / f (of copy)"]
    lines = ["| " + " | ".join(header) + " |", "| --- " + "| ---: " * (len(header) - 1) + "|"]
    for case in _cases(rows, op):
        r = {p: index.get((op, case, mode, p), {}) for p in PROVIDERS}
        if not any(x.get("median_ms") is not None for x in r.values()):
            continue
        cells = [case, fmt_time(r["eager"]), fmt_time(r["compile"]), fmt_time(r["fused"]),
                 fmt_ratio(r["fused"].get("median_ms"), r["eager"].get("median_ms")),
                 fmt_ratio(r["fused"].get("median_ms"), r["compile"].get("median_ms")),
                 _launches(index, op, case, mode)]
        if mode == "forward":
            cells.append(" / ".join(fmt_bytes(r[p].get("saved_bytes")) for p in PROVIDERS))
            cells.append(" / ".join(fmt_bytes(r[p].get("saved_beyond_inputs")) for p in PROVIDERS))
        if cuda:
            cells.append(" / ".join(fmt_bytes(r[p].get("peak_bytes")) for p in PROVIDERS))
            fractions = [r[p].get("bw_fraction") for p in PROVIDERS]
            cells.append(" / ".join("–" if f is None else f"{f:.0%}" for f in fractions))
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{x['provider']}: {x['note']}" for x in rows
                    if x["op"] == op and x["mode"] == mode and x.get("note")})
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return lines


# --------------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------------
def machine(device: str) -> str:
    """The machine that produced a result, in one line: CPU model, ISA flags, cores, torch threads, versions."""
    from fastvae.machine import describe_machine, machine_label

    return machine_label(describe_machine(device.split("-")[0]))  # "cpu-<slug>" or "cuda-<gpu>": the kind


_CPU_NOTE = (
    "**What the CPU columns measure.** `fused` on CPU is fastvae's public op: in eager mode it runs the engine "
    "`fastvae/ops/engine/` through a small `torch.autograd.Function` built from the op's declaration "
    "(`fastvae/ops/_op.py`; under torch.compile the registered custom op), with a hand-written backward "
    "(the Triton kernels run on CUDA; on CPU they only "
    "run in Triton's interpreter, which is no speed path). So on CPU the fused column is input checks + the "
    "engine + a hand-written backward; for `reparameterize_kl` the engine is one numba-compiled loop forward, which "
    "draws Triton's Philox stream (the same words and uniforms, Box-Muller within 4 ulp: the same `z` for a seed on "
    "CPU and GPU to float32 rounding) and keeps the float32 noise for the backward, and one loop backward that "
    "reads it (`fastvae/ops/engine/loops.py`); the Triton kernels save only the inputs and the seed and draw the "
    "noise again in the backward. The eager composition calls `torch.randn_like` once and keeps the noise too. "
    "**Launches**: eager and compile count, from one profiled call, the ATen ops that compute (views and "
    "allocations excluded) and inductor's generated C++ kernels — each would be one kernel launch on a GPU; "
    "fused counts the Triton launches of the CUDA path (`fastvae.kernels.count_launches` with "
    "`FASTVAE_BACKEND=triton TRITON_INTERPRET=1`, at the op's smallest quick case, marked `T`) plus the ATen ops "
    "the op runs around its custom op (seed draw, running-MSE update). "
    "**Saved for backward**: distinct storages packed by `torch.autograd.graph.saved_tensors_hooks` in one forward; "
    "*beyond inputs* leaves out the inputs' own storages (which the caller holds anyway)."
)

_CUDA_NOTE = (
    "**Launches**: CUDA kernels, memsets and copies recorded by `torch.profiler` for one call. **Peak mem**: "
    "`torch.cuda.max_memory_allocated` during one call above what was allocated before it. **Bandwidth**: the "
    "bytes the op must move at least (model under each op) over the median time, as a fraction of this "
    "device's measured copy bandwidth. **Saved for backward** as on CPU."
)


def render(device: str, op_rows: Sequence[dict], loop_rows: Sequence[dict], meta: dict) -> str:
    cuda = device.startswith("cuda")
    lines = [f"# fastvae benchmarks: {device}", "", f"Machine: {meta.get('machine') or machine(device)}.", ""]
    for section, info in meta.get("sections", {}).items():
        lines.append(f"- `{section}`: measured {info.get('date', '?')} with `{info.get('command', '?')}`"
                     + (f" ({info['wall_s']:.0f} s)" if info.get("wall_s") else "")
                     + (f", load average {info['load']}" if info.get("load") else "")
                     + (" — quick sizes" if info.get("quick") else ""))
    lines.append("")
    lines += ["Times are milliseconds: the median, with the 20th and 80th percentiles in brackets "
              + ("(`triton.testing.do_bench`)." if cuda else "(pytest-benchmark's runner, GC off)."),
              "Ratios are times, fused over the other provider: **below 1 the fused op is faster**.",
              "Providers: `eager` is the op written in plain PyTorch (bench/cases/<op>.py), `compile` is "
              "`torch.compile(eager, dynamic=False, fullgraph=True)`, `fused` is fastvae's op.", ""]
    lines += [_CUDA_NOTE if cuda else _CPU_NOTE, ""]
    if meta.get("copy_bandwidth_GBps"):
        lines += [f"Copy bandwidth of this device: {meta['copy_bandwidth_GBps']:.0f} GB/s.", ""]
    if loop_rows:
        lines += ["## Training loop", ""] + loop_table(loop_rows) + [""]
        if meta.get("loop_note"):
            lines += [meta["loop_note"], ""]
    if op_rows:
        lines += ["## Ops: summary", "", *_summary_table(op_rows), ""]
        for op in [o for o in OPS if any(r["op"] == o for r in op_rows)]:
            lines += [f"## {op}", "", f"Traffic model (N elements of s bytes): {OPS[op].model}.",
                      f"Chart: `{device}_{op}.png`.", ""]
            for mode in MODES:
                table = op_table(op_rows, op, mode, cuda)
                if len(table) > 2:
                    lines += [f"### {op}: {MODE_TITLES[mode]}", "", *table, ""]
    return "\n".join(lines).rstrip() + "\n"


def careful_best(rows: Sequence[dict], model: str, key: str = "epoch_s") -> float | None:
    """The faster careful hand-written loop's ``key`` (epoch or steps seconds) on ``model``: the yardstick of
    fastvae's default loop (``bench.loop.CAREFUL``)."""
    from .loop import CAREFUL

    times = [r[key] for r in rows if r["model"] == model and r["loop"] in CAREFUL and r.get(key)]
    return min(times) if times else None


def _ratio(value, base) -> str:
    return f"{value / base:.2f}" if value and base else "–"


def loop_table(rows: Sequence[dict]) -> list[str]:
    lines = ["| model | loop | precision | epoch s [p20, p80] | images/s | time / plain | time / best careful "
             "(epoch, steps) | step GFLOP/s | of GEMM | first epoch s | epochs | note |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        t = r.get("epoch_s")
        cell = "–" if t is None else f"{t:.2f} [{r['p20_s']:.2f}, {r['p80_s']:.2f}]"
        ips = "–" if r.get("images_per_s") is None else f"{r['images_per_s']:,.0f}"
        ratio = "–" if r.get("vs_plain") is None else f"{r['vs_plain']:.2f}"
        careful = (f"{_ratio(t, careful_best(rows, r['model']))}, "
                   f"{_ratio(r.get('train_s'), careful_best(rows, r['model'], 'train_s'))}")
        gflops = "–" if not r.get("step_gflops") else f"{r['step_gflops']:.0f}"
        of_gemm = "–" if not r.get("of_gemm") else f"{r['of_gemm']:.0%}"
        first = "–" if r.get("first_epoch_s") is None else f"{r['first_epoch_s']:.2f}"
        lines.append(f"| {r['model']} | {r['loop']} | {r.get('precision') or '–'} | {cell} | {ips} | {ratio} | "
                     f"{careful} | {gflops} | {of_gemm} | {first} | {_fmt_int(r.get('epochs'))} | "
                     f"{r.get('note') or ''} |")
    return lines


def write_all(out: Path, device: str, op_rows: list[dict] | None, loop_rows: list[dict] | None,
              sections: dict, facts: dict, loop_columns: Sequence[str]) -> dict[str, Path]:
    """Merge the new rows into ``out``'s files for ``device`` and write them all; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{device}.md", "meta": out / f"{device}.json"}
    csv_path, loop_csv_path = out / f"{device}.csv", out / f"{device}_loop.csv"
    meta = json.loads(paths["meta"].read_text()) if paths["meta"].is_file() else {}
    meta.setdefault("sections", {}).update(sections)
    meta.update({k: v for k, v in facts.items() if v is not None})
    meta["machine"] = machine(device)
    all_ops = read_csv(csv_path)
    if op_rows is not None:
        all_ops = merge(all_ops, op_rows, "op", {r["op"] for r in op_rows})
        write_csv(csv_path, all_ops, Row.columns())
        paths["csv"] = csv_path
    all_loop = read_csv(loop_csv_path)
    if loop_rows is not None:
        all_loop = merge(all_loop, loop_rows, "model", {r["model"] for r in loop_rows})
        write_csv(loop_csv_path, all_loop, loop_columns)
        paths["loop_csv"] = loop_csv_path
    from fastvae.plots import benchmark_bars

    for op in sorted({r["op"] for r in op_rows or []}):
        path = out / f"{device}_{op}.png"
        benchmark_bars([r for r in all_ops if r["op"] == op], path, title=f"{op} on {device}",
                       modes=[(m, MODE_TITLES[m]) for m in MODES], providers=PROVIDERS)
        paths[f"png_{op}"] = path
    paths["meta"].write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    paths["md"].write_text(render(device, all_ops, all_loop, meta))
    return paths


def rows_as_dicts(rows: Iterable) -> list[dict]:
    return [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows]

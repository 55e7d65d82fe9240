"""One metrics sink: every row goes to ``metrics.jsonl``; ``metrics.csv`` and TensorBoard are writers over it."""
from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

__all__ = ["METRIC_FIELDS", "MetricsLog"]

METRIC_FIELDS = ("split", "epoch", "step", "loss", "rec", "kl", "mse", "gamma", "lr", "samples_per_s",
                 "epoch_time_s", "time_s")


class _CsvWriter:
    def __init__(self, path: Path, rows: list[dict]):
        self.path = path
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=METRIC_FIELDS, extrasaction="ignore").writerow(row)

    def close(self) -> None:
        pass


class _TensorBoardWriter:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def write(self, row: dict) -> None:
        for key, value in row.items():
            if key not in ("split", "epoch", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{row['split']}/{key}", value, row["step"])

    def close(self) -> None:
        self.writer.close()


class MetricsLog:
    """Rows appended to ``out/metrics.jsonl`` and handed to the writers (CSV, and TensorBoard when installed
    and asked for). On resume (``keep_until_step``) the rows written after the checkpoint are dropped."""

    def __init__(self, out: Path, *, keep_until_step: int | None, tensorboard: bool):
        self.jsonl = out / "metrics.jsonl"
        rows = []
        if keep_until_step is not None and self.jsonl.is_file():
            rows = [r for r in map(json.loads, self.jsonl.read_text().splitlines())
                    if r.get("step", 0) <= keep_until_step]
        with open(self.jsonl, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        self.writers: list = [_CsvWriter(out / "metrics.csv", rows)]
        if tensorboard:
            with contextlib.suppress(Exception):  # TensorBoard not installed
                self.writers.append(_TensorBoardWriter(out / "tensorboard"))

    def write(self, row: dict) -> None:
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        for writer in self.writers:
            writer.write(row)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

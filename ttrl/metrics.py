"""One metrics writer: each row goes to `metrics.jsonl` (flushed and fsynced, so a crash loses
nothing already logged) and to TensorBoard; plus a progress bar with ETA."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a null is honest and keeps the file parseable
    return value


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None):
        """`purge_step`: on resume, TensorBoard hides events of the killed run from this step on."""
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.n_rows = len(read_metrics(run_dir))
        """Rows in the file, counting those of earlier (resumed) sessions; a checkpoint records it."""
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge_step)
            except ImportError:  # TensorBoard is optional; metrics.jsonl is the record
                self._tb = None

    def log(self, row: dict) -> None:
        """Append one row; `row["step"]` is the x-axis, keys are grouped like `train/reward`."""
        row = {k: _clean(v) for k, v in row.items()}
        self._file.write(json.dumps(row, sort_keys=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.n_rows += 1
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, row.get("step", 0))
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a hard kill is skipped
                continue
    return rows


def truncate_metrics(run_dir: str | Path, n_rows: int) -> int:
    """Keep the first `n_rows` rows of metrics.jsonl (a resumed run drops what was logged after
    its checkpoint, and any torn last line); atomic. Returns how many rows were kept."""
    path = Path(run_dir) / METRICS_FILE
    rows = read_metrics(run_dir)[:n_rows]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(rows)


def progress_bar(disable: bool = False):
    """A rich progress bar with ETA and a free-text `info` field for live metrics."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), disable=disable)

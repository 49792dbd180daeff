"""One metrics writer: each row goes to `metrics.jsonl` (flushed and fsynced, so a crash loses
nothing already logged), to TensorBoard and, when asked, to Weights & Biases; `metrics.csv` for
spreadsheets; and one progress display for every phase (a live bar on a terminal, plain lines in
a log file)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

METRICS_FILE, CSV_FILE = "metrics.jsonl", "metrics.csv"
WANDB_ID_FILE = "ttrl-run-id"
"""RUN_DIR/wandb/ttrl-run-id: the W&B run a resumed run continues."""


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a null is honest and keeps the file parseable
    return value


def is_number(value) -> bool:
    """A metric value: a finite int or float (not a bool, a string, null, NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None,
                 wandb_project: str = "", config: dict | None = None):
        """`purge_step`: on resume, TensorBoard hides events of the killed run from this step on.
        `wandb_project`: also log to this Weights & Biases project (`config` is the run's settings)."""
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
        self._wandb = _wandb_run(Path(run_dir), wandb_project, config, purge_step is not None) \
            if wandb_project else None

    def log(self, row: dict) -> None:
        """Append one row; `row["step"]` is the x-axis, keys are grouped like `train/reward`."""
        row = {k: _clean(v) for k, v in row.items()}
        self._file.write(json.dumps(row, sort_keys=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.n_rows += 1
        scalars = {k: v for k, v in row.items() if k != "step" and is_number(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, row.get("step", 0))
            self._tb.flush()
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=row.get("step", 0))

    def close(self) -> None:
        """W&B's service process completes its offline file after this returns: at the latest when
        this process exits (wandb's exit hook waits for it), or at `wandb.teardown()`."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(run_dir: Path, project: str, config: dict | None, resume: bool):
    """A W&B run writing under RUN_DIR/wandb/ (WANDB_MODE=offline needs no network; `wandb sync`
    uploads later). A resumed ttrl run continues the W&B run it started."""
    try:
        import wandb
    except ImportError:
        from ttrl.config import ConfigError

        raise ConfigError("config key 'train.wandb_project' is set but Weights & Biases is not installed: "
                          "pip install 'ttrl[wandb]', or leave train.wandb_project empty") from None
    id_file = run_dir / "wandb" / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(6)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    # console="off": W&B would otherwise wrap stdout/stderr, under rich's live bar.
    return wandb.init(project=project, name=run_dir.resolve().name, dir=str(run_dir), config=config or {},
                      id=run_id, resume="allow", settings=wandb.Settings(console="off"))


def read_metrics(run_dir: str | Path, problems: list[str] | None = None) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl (see `read_rows`)."""
    return read_rows(Path(run_dir) / METRICS_FILE, problems)


def read_rows(path: Path, problems: list[str] | None = None) -> list[dict]:
    """The rows of a run's JSON-lines file. A line that is not a JSON object with a whole-number
    `step` (a torn last line after a hard kill, stray bytes, `[1, 2]`, `"step": "nine"`) is skipped;
    `problems`, when given, gets one "file:line: why" per skipped line."""
    if not path.is_file():
        return []
    try:
        data = path.read_bytes()
    except OSError as e:
        if problems is not None:
            problems.append(f"{path}: cannot be read ({e.strerror or e}); no training rows")
        return []
    rows = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        why = None
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            why = "bytes that are not UTF-8 text"
        except json.JSONDecodeError:
            why = "not a complete JSON row (torn by a kill, or garbled)"
        else:
            if not isinstance(row, dict):
                why = f"a JSON {type(row).__name__}, not an object ({snippet(row)})"
            elif "step" in row and not (isinstance(row["step"], int) and not isinstance(row["step"], bool)
                                        and row["step"] >= 0):
                why = f"step is {snippet(row['step'])}, not a whole number"
        if why is None:
            rows.append(row)
        elif problems is not None:
            problems.append(f"{path}:{n}: {why}; line skipped")
    return rows


def snippet(value) -> str:
    """A value as it appeared in a JSON file, cut to 40 characters, for a warning."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:39] + "…"


def truncate_metrics(run_dir: str | Path, n_rows: int) -> int:
    """Keep the first `n_rows` rows of metrics.jsonl (a resumed run drops what was logged after
    its checkpoint, and any torn last line); atomic. Returns how many rows were kept."""
    return _rewrite(Path(run_dir) / METRICS_FILE, read_metrics(run_dir)[:n_rows])


ROLLOUTS_FILE = "rollouts.jsonl"


def log_rollouts(run_dir: str | Path, rows: list[dict]) -> None:
    """Append rows to RUN_DIR/rollouts.jsonl: per trained prompt, its vote and a few samples, to
    see what the model did. Written from the training path, so they hold no gold answer."""
    with open(Path(run_dir) / ROLLOUTS_FILE, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def truncate_rollouts(run_dir: str | Path, last_step: int) -> int:
    """On resume, drop rollouts.jsonl rows of steps after the checkpoint (they will be redone)."""
    path = Path(run_dir) / ROLLOUTS_FILE
    if not path.is_file():
        return 0
    return _rewrite(path, [r for r in read_rows(path) if r.get("step", 0) <= last_step])


def _rewrite(path: Path, rows: list[dict]) -> int:
    """Replace a JSON-lines file by `rows`, atomically (a kill leaves the old file or the new one)."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a synced temporary file and a rename: a kill leaves the old
    file or the new one, never half of one (a torn summary.json would read as a finished run)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_csv(run_dir: str | Path) -> Path:
    """RUN_DIR/metrics.csv: the rows of metrics.jsonl as a table (one column per key, `step`
    first, empty where a row lacks the key), for spreadsheets and `pandas.read_csv`."""
    rows = read_metrics(run_dir)
    keys = list(dict.fromkeys(["step"] + [k for row in rows for k in row]))
    path = Path(run_dir) / CSV_FILE
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, keys, restval="")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return path


# ---------------------------------------------------------------- progress

def progress_bar(disable: bool = False, interval: float = 10.0, stream=None):
    """Progress of any phase, with an ETA, on stderr:

        with progress_bar(disable=quiet) as bar:
            task = bar.add_task("eval adapt", total=n, info="")
            bar.update(task, advance=1, info="avg@16 0.41")

    On a terminal, rich's live bar. Otherwise (output redirected to a log file) a plain line at
    the first update, then at most every `interval` seconds, and when the task completes or the
    block ends. `disable`: nothing at all."""
    stream = stream or sys.stderr
    if disable:
        return PlainProgress(None)
    if stream.isatty():
        from rich.console import Console

        return rich_progress(Console(file=stream))
    return PlainProgress(stream, interval)


NARROW = 100
"""Terminal columns under which the live bar drops its bar graphic and the word "eta", so that the
description, counts, times and info still fit on one line (an 80-column terminal)."""


def rich_progress(console):
    """rich's live bar on `console`, laid out for its width: on a narrow terminal no bar graphic,
    counts and times never cut, and the info wrapped rather than cut."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.table import Column

    if console.width >= NARROW:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), console=console)
    whole = {"table_column": Column(no_wrap=True)}  # a count or a time is never cut
    return Progress(TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis")),
                    MofNCompleteColumn(**whole), TimeElapsedColumn(**whole), TextColumn("eta", **whole),
                    TimeRemainingColumn(compact=True, **whole),
                    TextColumn("{task.fields[info]}", table_column=Column(overflow="fold")), console=console)


_DECODE_WATCHERS: list = []


@contextlib.contextmanager
def watch_decoding(callback):
    """While inside, `callback(tokens_done, max_new_tokens)` is told after each decoded token of
    the sampling engine, so a progress display moves within a long decode batch."""
    _DECODE_WATCHERS.append(callback)
    try:
        yield
    finally:
        _DECODE_WATCHERS.remove(callback)


def tell_decoding(done: int, total: int) -> None:
    """Called by the sampling engine after each decoding step (cheap when nobody watches)."""
    for callback in _DECODE_WATCHERS:
        callback(done, total)


def _count(x: float) -> str:
    """A progress count: whole numbers as such, a fraction (part of a batch decoded) to one decimal."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """rich's Progress.add_task / update, written as plain lines for a log file:
    `ttrl train 3/30 (10%) reward 0.41 majority ratio 0.20 · elapsed 0:00:31 · eta 0:04:30`."""

    def __init__(self, stream, interval: float = 10.0, clock=time.monotonic):
        self.stream, self.interval, self.clock = stream, interval, clock
        self.tasks: list[dict] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        for task in self.tasks:  # the state it stopped in, if not yet said (stopped early, ...)
            if task["unsaid"]:
                self._say(task)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        """A new task, said at once (`... 0/30 · elapsed 0:00:00`): a log shows what started."""
        now = self.clock()
        self.tasks.append({"description": description, "total": total, "completed": completed, "fields": fields,
                           "start": now, "start_completed": completed, "said": None, "unsaid": False,
                           "started": True})
        self._say(self.tasks[-1])
        return len(self.tasks) - 1

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields) -> None:
        task = self.tasks[task_id]
        for key, value in (("total", total), ("completed", completed), ("description", description)):
            if value is not None:
                task[key] = value
        task["completed"] += advance or 0
        task["fields"].update(fields)
        done = task["total"] is not None and task["completed"] >= task["total"]
        done = done and task["last"] != (task["completed"], str(task["fields"].get("info", "")))  # said once
        if task.pop("started", False) or done or self.clock() - task["said"] >= self.interval:
            self._say(task)
        else:
            task["unsaid"] = True

    def _say(self, task: dict) -> None:
        now = self.clock()
        task["said"], task["unsaid"] = now, False
        task["last"] = (task["completed"], str(task["fields"].get("info", "")))
        if self.stream is None:
            return
        total, done = task["total"], task["completed"]
        parts = [f"{task['description']} {_count(done)}" + (f"/{_count(total)} ({done / total:.0%})" if total else "")]
        info = str(task["fields"].get("info", "")).strip()
        if info:
            parts[0] += f" {info}"
        elapsed, moved = now - task["start"], done - task["start_completed"]
        parts.append(f"elapsed {_clock(elapsed)}")
        if total and moved > 0:
            parts.append(f"eta {_clock(elapsed / moved * max(0, total - done))}")
        print(" · ".join(parts), file=self.stream, flush=True)


@contextlib.contextmanager
def library_bars(enabled: bool):
    """Switch the progress bars of transformers and huggingface_hub (e.g. "Loading weights",
    "Writing model shards") off while inside when not `enabled`; restored on exit."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf

    hf_on, hub_on = hf.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    hf.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        if hf_on:
            hf.enable_progress_bar()
        if hub_on:
            hub.enable_progress_bars()

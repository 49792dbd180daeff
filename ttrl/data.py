"""Unlabeled prompts: from files, bundled benchmarks, or the seeded arithmetic generator.

A `Problem` carries its gold `answer` only so that evaluation and diagnostics can use it;
the training path reads `prompt` alone.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ttrl.config import ArithmeticConfig, DataConfig

DATASETS_DIR = Path(__file__).parent / "datasets"
BUNDLED = ("aime2024", "amc", "math500", "arithmetic")


class DataError(ValueError):
    """A bad data file: the message names the file, the line or key, and what to do."""


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    """The problem text, before the chat template and instruction are applied."""
    answer: str | None = None
    """Gold answer, for evaluation and diagnostics only."""


def arithmetic_problems(cfg: ArithmeticConfig) -> list[Problem]:
    """Distinct `a op b` questions in seeded random order; sized for small models on CPU."""
    combos = [(a, op, b) for op in cfg.ops for a in range(cfg.low, cfg.high + 1)
              for b in range(cfg.low, cfg.high + 1)]
    if cfg.n > len(combos):
        raise DataError(f"data.arithmetic.n = {cfg.n} but only {len(combos)} distinct questions exist "
                        f"for operands {cfg.low}..{cfg.high} and ops {cfg.ops}: lower n or widen the range")
    random.Random(cfg.seed).shuffle(combos)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    return [Problem(id=f"{a}{op}{b}", prompt=f"What is {a} {op} {b}?", answer=str(ops[op](a, b)))
            for a, op, b in combos[: cfg.n]]


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number or index, record) pairs; errors point at the bad line."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'ttrl[parquet]'") from None
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 (at byte {e.start}); "
                        "re-save the file as UTF-8") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or a single list under one key
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)")
        return list(enumerate(data, start=1))
    if suffix not in (".jsonl", ".ndjson"):
        raise DataError(f"{path}: unknown data format '{suffix}'; use .jsonl, .json or .parquet")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None
    return records


def load_file(path: str | Path, prompt_field: str = "problem", answer_field: str = "answer",
              id_field: str = "id") -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; give a .jsonl/.json/.parquet file or one of: "
                        f"{', '.join(BUNDLED)}")
    problems, seen = [], {}
    for where, record in _read_records(path):
        at = f"{path}:{where}" if path.suffix.lower() == ".jsonl" else f"{path} record {where}"
        if not isinstance(record, dict):
            raise DataError(f"{at}: expected a JSON object, got {type(record).__name__}")
        prompt = record.get(prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            keys = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(f"{at}: missing or empty prompt field '{prompt_field}' (keys here: {keys}); "
                            "set data.prompt_field to the field holding the question")
        pid = str(record.get(id_field, len(problems)))
        if pid in seen:
            raise DataError(f"{at}: duplicate id {pid!r} (first at {seen[pid]}); ids must be unique")
        seen[pid] = at
        answer = record.get(answer_field)
        problems.append(Problem(id=pid, prompt=prompt, answer=None if answer is None else str(answer)))
    if not problems:
        raise DataError(f"{path}: no prompts found; the file is empty")
    return problems


def load_problems(source: str, cfg: DataConfig) -> list[Problem]:
    """A bundled name or a file path -> problems (first `cfg.limit` if set)."""
    if source == "arithmetic":
        problems = arithmetic_problems(cfg.arithmetic)
    elif source in BUNDLED:
        problems = load_file(DATASETS_DIR / f"{source}.jsonl")
    else:
        problems = load_file(source, cfg.prompt_field, cfg.answer_field, cfg.id_field)
    return problems[: cfg.limit] if cfg.limit else problems


def split_holdout(problems: list[Problem], fraction: float, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Seeded (adapt, held_out) split; held-out prompts are evaluated, never trained on."""
    if fraction <= 0:
        return problems, []
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(problems)))
    held = set(order[:n_held])
    if n_held >= len(problems):
        raise DataError(f"data.holdout = {fraction} leaves no prompts to adapt on ({len(problems)} in all)")
    return ([p for i, p in enumerate(problems) if i not in held],
            [p for i, p in enumerate(problems) if i in held])


def render_prompt(problem: Problem, template: str) -> str:
    return template.replace("{problem}", problem.prompt)

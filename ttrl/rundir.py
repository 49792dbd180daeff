"""A run directory read back for reports: config.json, environment.json, metrics.jsonl and
summary.json, as `ttrl train` wrote them — or as a kill, a full disk or a stray `echo >>` left
them. Damage never stops a report: a line or field that is not what the trainer writes is left
out, and `Run.problems` says which (file:line and why), so the rest still renders."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ttrl.console import warn
from ttrl.metrics import METRICS_FILE, is_number, read_metrics, snippet

ENVIRONMENT_FILE = "environment.json"
NUMERIC_CONFIG = ("eval.n_samples", "algorithm.kl_coef", "algorithm.ppo_epochs")
"""config.json keys the report computes with; any other value is only printed."""


class ReportError(ValueError):
    """A directory that holds no run, or a report that cannot be written: the message names it
    and what to do."""


@dataclass
class Run:
    path: Path
    name: str
    config: dict
    env: dict
    steps: list[dict]
    """One row per training step (the last logged wins when a resumed run logged a step twice)."""
    evals: dict[str, list[dict]]
    """Eval set -> [{step, n_prompts, n_labelled?, avg@k, maj@k, pass@k, greedy, majority_ratio,
    examples?}], oldest first."""
    finished: bool
    problems: list[str] = field(default_factory=list)
    """Damaged lines and fields left out while reading, as "file:line: why"."""
    handed_back: dict | None = None
    """summary.json's `model`: the step whose model the run exported and why (train.guard)."""

    def cfg(self, dotted: str, default=None):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def k(self) -> int:
        return int(self.cfg("eval.n_samples", 0) or _k_of(self.evals))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.steps if is_number(r.get(key))]
        return [s for s, _ in pts], [float(v) for _, v in pts]

    def base(self, name: str = "adapt") -> dict | None:
        rows = self.evals.get(name) or []
        return rows[0] if rows and rows[0]["step"] == 0 else None

    def final(self, name: str = "adapt") -> dict | None:
        rows = self.evals.get(name) or []
        return rows[-1] if rows and rows[-1]["step"] > 0 else None

    def bar(self, name: str = "adapt") -> tuple[float, str] | None:
        """The bar TTRL must beat on a set: the better of the base model's greedy answer and its
        majority vote of k samples, as (accuracy, "base greedy" or "base maj@k"); None without a
        base evaluation against gold."""
        base, k = self.base(name) or {}, self.k
        options = [(base[key], label) for key, label in ((f"maj@{k}", f"base maj@{k}"), ("greedy", "base greedy"))
                   if is_number(base.get(key))]
        return max(options, key=lambda o: o[0]) if options else None

    @property
    def has_gold(self) -> bool:
        """Gold answers were there to measure against (training diagnostics or evaluation)."""
        return any(r.get("train/rollout_accuracy") is not None for r in self.steps) or bool(
            (self.base() or self.final() or {}).get(f"avg@{self.k}") is not None)


def graded(row: dict | None) -> str:
    """"graded on 5 of 8 prompts" for an evaluation where only some prompts have a gold answer
    (accuracy is over those); "" when all do, or for runs from before `n_labelled` was logged."""
    if not row or not is_number(row.get("n_labelled")) or not is_number(row.get("n_prompts")):
        return ""
    n, total = int(row["n_labelled"]), int(row["n_prompts"])
    return f"graded on {n} of {total} prompts" if n < total else ""


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _k_of(evals: dict) -> int:
    for rows in evals.values():
        for row in rows:
            for key in row:
                if key.startswith("avg@") and key[4:].isdigit():
                    return int(key[4:])
    return 0


def read_json_object(file: Path, problems: list[str]) -> dict:
    """A JSON object from `file`; {} (and a line in `problems`) when it is missing or damaged."""
    if not file.exists():
        return {}
    try:
        data = file.read_bytes()
        value = json.loads(data.decode("utf-8"))
    except OSError as e:
        problems.append(f"{file}: cannot be read ({e.strerror or e}); left out")
        return {}
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        problems.append(f"{file}:{line}: bytes that are not UTF-8 text; left out")
        return {}
    except json.JSONDecodeError as e:
        problems.append(f"{file}:{e.lineno}: not valid JSON ({e.msg}); left out")
        return {}
    if not isinstance(value, dict):
        problems.append(f"{file}: a JSON {type(value).__name__}, not an object; left out")
        return {}
    return value


def _clean_examples(value, where: str, problems: list[str]) -> list[dict]:
    """Example votes as the report draws them; anything else is left out."""
    if not isinstance(value, list):
        problems.append(f"{where}.examples is {snippet(value)}, not a list; left out")
        return []
    out = []
    for i, ex in enumerate(value):
        if not isinstance(ex, dict) or "id" not in ex:
            problems.append(f"{where}.examples[{i}] is not an example with an id; left out")
            continue
        hist = ex.get("histogram") if isinstance(ex.get("histogram"), list) else []
        pairs = [(str(h[0]), h[1]) for h in hist if isinstance(h, (list, tuple)) and len(h) == 2 and _whole(h[1])]
        if len(pairs) != len(hist) or ("histogram" in ex and not isinstance(ex["histogram"], list)):
            problems.append(f"{where}.examples[{i}].histogram has entries that are not [answer, count]; left out")
        gold = ex.get("gold")
        if gold is not None and not isinstance(gold, str):
            if not is_number(gold):
                problems.append(f"{where}.examples[{i}].gold is {snippet(gold)}, not an answer; left out")
            gold = str(gold) if is_number(gold) else None
        out.append({**ex, "id": str(ex["id"]), "gold": gold, "histogram": pairs,
                    "majority_ratio": ex.get("majority_ratio") if is_number(ex.get("majority_ratio")) else None})
    return out


def _clean_scores(value, where: str, problems: list[str]) -> dict[str, list]:
    """Per-problem scores (`ttrl.evaluation.scores`): an id list and, per metric, one number or null
    per id; a metric that does not fit is left out (and the paired errors that need it)."""
    if not isinstance(value, dict) or not isinstance(value.get("id"), list):
        problems.append(f"{where}.scores is {snippet(value)}, not per-problem scores with ids; left out")
        return {}
    out = {"id": [str(i) for i in value["id"]]}
    for key, column in value.items():
        if key == "id":
            continue
        if isinstance(column, list) and len(column) == len(out["id"]) and \
                all(v is None or is_number(v) for v in column):
            out[key] = column
        else:
            problems.append(f"{where}.scores.{key} is not one number per problem; left out")
    return out


def _clean_evals(raw, where: str, problems: list[str]) -> dict[str, list[dict]] | None:
    """summary.json's evals: {set: [{step, metric: number, examples: [...]}]}, damage left out."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: 'evals' is {snippet(raw)}, not a mapping of eval sets; evaluations are "
                        "taken from metrics.jsonl")
        return None
    out = {}
    for name, rows in raw.items():
        if not isinstance(rows, list):
            problems.append(f"{where}: evals.{name} is {snippet(rows)}, not a list of evaluations; left out")
            continue
        kept = []
        for i, row in enumerate(rows):
            at = f"{where}: evals.{name}[{i}]"
            if not isinstance(row, dict) or not _whole(row.get("step")):
                problems.append(f"{at} is not an evaluation with a whole-number step; left out")
                continue
            clean = {"step": row["step"]}
            for key, value in row.items():
                if key == "examples":
                    clean[key] = _clean_examples(value, at, problems)
                elif key == "scores":
                    clean[key] = _clean_scores(value, at, problems)
                elif key != "step" and (value is None or is_number(value)):
                    clean[key] = value
                elif key != "step":
                    problems.append(f"{at}.{key} is {snippet(value)}, not a number; left out")
            kept.append(clean)
        out[str(name)] = kept
    return out


def _clean_config(config: dict, where: Path, problems: list[str]) -> dict:
    for dotted in NUMERIC_CONFIG:
        section, key = dotted.split(".")
        node = config.get(section)
        if isinstance(node, dict) and key in node and not is_number(node[key]):
            problems.append(f"{where}: {dotted} is {snippet(node[key])}, not a number; left out")
            del node[key]
    return config


def load_run(run_dir: str | Path) -> Run:
    """The run in RUN_DIR; damaged lines and fields are left out and listed in `Run.problems`
    (and printed as warnings), so a report still renders."""
    path = Path(run_dir)
    if not (path / METRICS_FILE).is_file() and not (path / "summary.json").is_file():
        raise ReportError(f"{path} holds no ttrl run (no metrics.jsonl or summary.json); "
                          "pass the --output-dir of a `ttrl train` run")
    problems: list[str] = []
    steps: dict[int, dict] = {}
    evals: dict[str, dict[int, dict]] = {}
    for row in read_metrics(path, problems):
        step = row.get("step", 0)
        for key, value in row.items():
            if key == "step":
                continue
            if "/" in key and value is not None and not is_number(value):
                problems.append(f"{path / METRICS_FILE}: step {step}: {key} is {snippet(value)}, not a number; "
                                "left out")
            elif key.startswith("eval/"):
                parts = key.split("/", 2)
                if len(parts) < 3 or not parts[1] or not parts[2]:
                    problems.append(f"{path / METRICS_FILE}: step {step}: key {key!r} is not eval/<set>/<metric>; "
                                    "left out")
                    continue
                evals.setdefault(parts[1], {}).setdefault(step, {"step": step})[parts[2]] = value
            else:
                steps.setdefault(step, {"step": step})[key] = value
    summary = read_json_object(path / "summary.json", problems)
    eval_rows = _clean_evals(summary["evals"], str(path / "summary.json"), problems) if summary.get("evals") \
        else None
    if eval_rows is None:
        eval_rows = {n: [rows[s] for s in sorted(rows)] for n, rows in evals.items()}
    config = _clean_config(read_json_object(path / "config.json", problems), path / "config.json", problems)
    env = read_json_object(path / ENVIRONMENT_FILE, problems)
    for line in problems:
        warn(line)
    return Run(path=path, name=path.resolve().name, config=config, env=env, steps=[steps[s] for s in sorted(steps)],
               evals=eval_rows, finished=(path / "summary.json").is_file(), problems=problems,
               handed_back=_handed_back(summary.get("model"), problems))


def _handed_back(value, problems: list[str]) -> dict | None:
    """summary.json's `model` entry, if it is what the trainer writes (a step and a reason)."""
    if value is None:
        return None
    if isinstance(value, dict) and _whole(value.get("step")) and isinstance(value.get("why"), str):
        return value
    problems.append(f"summary.json: model is {snippet(value)}, not a step and a reason; left out")
    return None

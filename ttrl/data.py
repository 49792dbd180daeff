"""Unlabeled prompts: from files, bundled benchmarks, or the seeded arithmetic generator.

A `Problem` carries its gold `answer` only so that evaluation and diagnostics can use it;
the training path reads `prompt` alone.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ttrl.choices import LETTERS, MAX_CHOICES, MIN_CHOICES, ambiguity, choice_of, render_choices
from ttrl.config import ArithmeticConfig, Config, DataConfig
from ttrl.console import warn

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
    """Gold answer, for evaluation and diagnostics only (a letter for a multiple-choice problem)."""
    choices: tuple[str, ...] | None = None
    """Option texts of a multiple-choice problem (A, B, ... in order); None = an open answer."""
    source: str = field(default="", compare=False)
    """Where the problem came from (`file:line`), for error messages."""


def arithmetic_problems(cfg: ArithmeticConfig) -> list[Problem]:
    """Distinct `a op b` questions in seeded random order; sized for small models on CPU."""
    combos = [(a, op, b) for op in cfg.ops for a in range(cfg.low, cfg.high + 1)
              for b in range(cfg.low, cfg.high + 1)]
    if cfg.n > len(combos):
        raise DataError(f"data.arithmetic.n = {cfg.n} but only {len(combos)} distinct questions exist "
                        f"for operands {cfg.low}..{cfg.high} and ops {cfg.ops}: lower n or widen the range")
    random.Random(cfg.seed).shuffle(combos)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    problems = []
    for a, op, b in combos[: cfg.n]:
        pid, value = f"{a}{op}{b}", ops[op](a, b)
        problem = Problem(id=pid, prompt=f"What is {a} {op} {b}?", answer=str(value))
        if cfg.choices:  # options from a stream of their own: the questions are those of choices=0
            options = arithmetic_options(value, cfg.choices, random.Random(f"{cfg.seed}:{pid}"))
            problem = Problem(id=pid, prompt=problem.prompt, answer=LETTERS[options.index(str(value))],
                              choices=options)
        problems.append(problem)
    return problems


def arithmetic_options(value: int, k: int, rng: random.Random) -> tuple[str, ...]:
    """`value` and k-1 distinct wrong results within k+2 of it (the slips small models make),
    shuffled; no negative options for a non-negative result."""
    near = [value + d for d in range(-k - 2, k + 3) if d and (value + d >= 0 or value < 0)]
    options = [value, *rng.sample(near, k - 1)]
    rng.shuffle(options)
    return tuple(map(str, options))


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number or index, record) pairs; errors point at the bad line."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'ttrl[parquet]'") from None
        try:
            return list(enumerate(pq.read_table(path).to_pylist(), start=1))
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({e}); re-export it") from None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions") from None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is harmless; drop it
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 (at byte {e.start}); "
                        "re-save the file as UTF-8") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, or [[[[... nested too deep
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):  # {"data": [...]} or a single list under one key
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list)")
        return list(enumerate(data, start=1))
    if suffix not in (".jsonl", ".ndjson"):
        raise DataError(f"{path}: unknown data format '{suffix}'; use .jsonl, .json or .parquet")
    records = []
    # JSON Lines separates records by "\n" only: str.splitlines() would also split inside strings
    # holding U+2028 or U+0085, which JSON allows unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e}); each line must be one JSON object") from None
    return records


def load_file(path: str | Path, prompt_field: str = "problem", answer_field: str = "answer",
              id_field: str = "id", choices_field: str = "choices") -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise DataError(f"data file {path} {what}; give a .jsonl/.json/.parquet file or one of: "
                        f"{', '.join(BUNDLED)}")
    problems, seen, records = [], {}, _read_records(path)
    for where, record in records:
        at = f"{path}:{where}" if path.suffix.lower() in (".jsonl", ".ndjson") else f"{path} record {where}"
        if not isinstance(record, dict):
            raise DataError(f"{at}: expected a JSON object, got {type(record).__name__}")
        prompt = record.get(prompt_field)
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{at}: prompt field '{prompt_field}' holds a {type(prompt).__name__}, "
                            "not text; each prompt must be a JSON string")
        if not prompt or not prompt.strip():
            keys = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(f"{at}: missing or empty prompt field '{prompt_field}' (keys here: {keys}); "
                            "set data.prompt_field to the field holding the question")
        named = record.get(id_field) is not None
        pid = str(record[id_field]) if named else str(len(problems))  # unnamed: its position, from 0
        if pid in seen:
            raise DataError(_duplicate_id(pid, id_field, (at, named), seen[pid]))
        seen[pid] = (at, named)
        answer = record.get(answer_field)
        if isinstance(answer, (bool, list, dict)) or (isinstance(answer, float) and not math.isfinite(answer)):
            raise DataError(f"{at}: gold answer field '{answer_field}' holds {json.dumps(answer)[:60]}, not an "
                            "answer; give text or a number (or leave the field out: the prompt is then unlabelled)")
        answer = None if answer is None or not str(answer).strip() else str(answer)  # "": no gold, not a wrong one
        choices = _choices(record.get(choices_field) if choices_field else None, at, choices_field)
        for name, value in ((prompt_field, prompt), (answer_field, answer), (id_field, pid),
                            *((choices_field, c) for c in choices or ())):
            if value is not None and not _encodable(value):
                raise DataError(f"{at}: field '{name}' holds an unpaired surrogate escape (\\ud800-\\udfff), "
                                "which is not text; fix the escape or drop the character")
        if choices and answer is not None:
            letter = choice_of(answer, choices)
            if letter is None:
                raise DataError(f"{at}: gold answer {answer!r} (field '{answer_field}') is none of the "
                                f"{len(choices)} choices; give a letter A-{LETTERS[len(choices) - 1]} or copy "
                                f"the text of one option: {', '.join(map(repr, choices))}")
            answer = letter
        problems.append(Problem(id=pid, prompt=prompt, answer=answer, choices=choices, source=at))
    if not problems:
        raise DataError(f"{path}: no prompts found; the file is empty")
    if choices_field and not any(p.choices for p in problems):
        _unread_options(path, [record for _, record in records], choices_field)
    return problems


def _unread_options(path: Path, records: list, choices_field: str) -> None:
    """Warn when no record has `choices_field` but most hold another field that looks like the
    options of a multiple-choice question (a list of 2..26 texts): the model would get open
    questions, never seeing the options."""
    counts: dict[str, int] = {}
    for record in records:
        for key, value in record.items() if isinstance(record, dict) else ():
            if isinstance(value, list) and MIN_CHOICES <= len(value) <= MAX_CHOICES and \
                    all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
                counts[key] = counts.get(key, 0) + 1
    likely = [key for key, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n > len(records) / 2]
    if likely:
        warn(f"{path}: no record has a '{choices_field}' field (data.choices_field), but field '{likely[0]}' holds "
             "lists like the options of a multiple-choice question; they are not shown to the model, which gets "
             f"open questions. If they are the options, set data.choices_field={likely[0]}")


def _duplicate_id(pid: str, id_field: str, this: tuple[str, bool], first: tuple[str, bool]) -> str:
    """Say which record got the id how: a record without an id is named by its position."""
    (at, named), (first_at, first_named) = this, first
    if named and first_named:
        return f"{at}: duplicate id {pid!r} (first at {first_at}); ids must be unique"
    if named:
        why = f"{first_at} has no '{id_field}' field and is named by its position, {pid!r}"
    else:
        why = (f"this record has no '{id_field}' field and is named by its position, {pid!r}, "
               f"the '{id_field}' of {first_at}")
    return f"{at}: duplicate id {pid!r}: {why}; give every record a unique '{id_field}', or none"
def _choices(value, at: str, name: str) -> tuple[str, ...] | None:
    """A record's options: None when absent, else a checked tuple of 2..26 distinct texts."""
    if value is None:
        return None
    if (not isinstance(value, list) or not MIN_CHOICES <= len(value) <= MAX_CHOICES
            or not all(isinstance(c, str) and c.strip() for c in value)):
        got = f"a list of {len(value)}" if isinstance(value, list) else f"a {type(value).__name__}"
        raise DataError(f"{at}: field '{name}' must be a list of {MIN_CHOICES} to {MAX_CHOICES} non-empty option "
                        f"texts (JSON strings, numbers quoted), got {got}: {str(value)[:80]}; fix the record, or "
                        "set data.choices_field to the field holding the options ('' to read none)")
    keys = [" ".join(c.casefold().split()) for c in value]
    twice = next((i for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise DataError(f"{at}: options {LETTERS[keys.index(keys[twice])]} and {LETTERS[twice]} are both "
                        f"{value[twice]!r}; each option must differ, or a text could not name one letter")
    why = ambiguity(value)
    if why:
        raise DataError(f"{at}: {why}")
    return tuple(value)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def drop_too_long(problems: list[Problem], lengths: list[int], budget: int, policy: str,
                  why: str) -> tuple[list[Problem], list[Problem]]:
    """(kept, dropped): prompts of more than `budget` tokens are dropped, or fail when
    policy == "fail". `why` says where the budget comes from, for the message."""
    over = {i for i, n in enumerate(lengths) if n > budget}
    if over and policy == "fail":
        i = min(over)
        p = problems[i]
        raise DataError(f"{p.source or 'prompt'} (id {p.id!r}): the prompt is {lengths[i]} tokens, but only {budget} "
                        f"fit ({why}); {len(over)} prompt(s) are too long in all. Shorten them, lower "
                        "max_new_tokens, or set data.too_long=skip to leave them out")
    kept = [p for i, p in enumerate(problems) if i not in over]
    if problems and not kept:
        raise DataError(f"every prompt is longer than the {budget} tokens that fit ({why}); "
                        "lower max_new_tokens or use a model with a longer context")
    return kept, [p for i, p in enumerate(problems) if i in over]


def fit_context(problems: list[Problem], tok, model, cfg: Config, max_new_tokens: int, key: str) -> list[Problem]:
    """Leave out (data.too_long=skip, with a warning) or fail on prompts that leave no room for
    `max_new_tokens` (the setting `key`) in the model's context."""
    if not problems:
        return problems
    ids = encode_problems(tok, problems, cfg)
    check_encoded(problems, ids, getattr(model.config, "vocab_size", None), cfg.model.name)
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return problems
    budget, why = context - max_new_tokens, f"context {context} (max_position_embeddings) - {key} {max_new_tokens}"
    kept, dropped = drop_too_long(problems, [len(x) for x in ids], budget, cfg.data.too_long, why)
    if dropped:
        names = ", ".join(repr(p.id) for p in dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        warn(f"skipped {len(dropped)} of {len(problems)} prompts longer than {budget} tokens ({why}): "
             f"{names}; set data.too_long=fail to stop instead")
    return kept


def check_encoded(problems: list[Problem], ids: list[list[int]], vocab: int | None, model: str) -> None:
    """Every prompt must encode to tokens the model knows: none (a tokenizer without a vocabulary)
    or ids past its vocabulary (another model's tokenizer) would fail only inside the sampler."""
    for p, x in zip(problems, ids):
        if not x or (vocab and max(x) >= vocab):
            what = "no tokens" if not x else f"token id {max(x)}, past the model's vocabulary of {vocab}"
            raise DataError(f"prompt {p.id!r} encodes to {what} with the tokenizer of model.name = {model!r}; "
                            "the model directory needs its own tokenizer files (tokenizer.json, "
                            "tokenizer_config.json)")


def load_problems(source: str, cfg: DataConfig) -> list[Problem]:
    """A bundled name or a file path -> problems (first `cfg.limit` if set)."""
    if source == "arithmetic":
        problems = arithmetic_problems(cfg.arithmetic)
    elif source in BUNDLED:
        problems = load_file(DATASETS_DIR / f"{source}.jsonl")
    else:
        problems = load_file(source, cfg.prompt_field, cfg.answer_field, cfg.id_field, cfg.choices_field)
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


_PLACEHOLDER = re.compile(r"\{(problem|choices)\}")


def render_prompt(problem: Problem, template: str) -> str:
    """The user message: `{problem}` and `{choices}` ("A) ..." lines) filled in one pass, so a
    brace in a problem is never read as a placeholder. Without `{choices}` in the template, a
    multiple-choice problem's options follow its text on new lines."""
    options = render_choices(problem.choices) if problem.choices else ""
    text = problem.prompt
    if options and "{choices}" not in template:
        text, options = f"{text}\n{options}", ""
    return _PLACEHOLDER.sub(lambda m: text if m.group(1) == "problem" else options, template)


def encode_prompts(tokenizer, texts: list[str], chat_template: bool = True, system_prompt: str = "") -> list[list[int]]:
    """Prompt token ids, each text as one user chat turn (after a system turn, when given) when the
    tokenizer has a template; otherwise the plain text, the system prompt and a blank line first."""
    if chat_template and tokenizer.chat_template:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return [list(tokenizer.apply_chat_template(system + [{"role": "user", "content": t}],
                                                   add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]) for t in texts]
    return [tokenizer(f"{system_prompt}\n\n{t}" if system_prompt else t)["input_ids"] for t in texts]


def encode_problems(tokenizer, problems, cfg) -> list[list[int]]:
    """Prompt token ids of `problems` as the config renders them (data.template, data.system_prompt,
    model.chat_template): what the trainer and the evaluation feed the model."""
    return encode_prompts(tokenizer, [render_prompt(p, cfg.data.template) for p in problems], cfg.model.chat_template,
                          cfg.data.system_prompt)


def load_sets(cfg: Config) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """(data.train prompts, {name: prompts} of each data.eval set), read and checked, the held-out
    split included, before any model loads."""
    problems = load_problems(cfg.data.train, cfg.data)
    split_holdout(problems, cfg.data.holdout, cfg.train.seed)  # fails if no prompt is left to adapt on
    extra: dict[str, list[Problem]] = {}
    for source in cfg.data.eval:
        name = Path(source).stem
        if name in extra or name in ("adapt", "heldout"):
            raise DataError(f"data.eval: two evaluation sets would be named {name!r} (from the file name); "
                            "rename one file")
        extra[name] = load_problems(source, cfg.data)
    return problems, extra


def run_sets(cfg: Config, problems: list[Problem], extra: dict[str, list[Problem]], tok,
             model) -> dict[str, list[Problem]]:
    """The sets a run evaluates, `ttrl train` and `ttrl eval` alike: `adapt` (trained on) and
    `heldout` (split off with train.seed from all of data.train, whatever the length budget) from
    data.train, then each data.eval set; prompts that leave no room in the context for the longest
    completion are then left out (data.too_long)."""
    budget = max((cfg.rollout.max_new_tokens, "rollout.max_new_tokens"),
                 (cfg.eval.max_new_tokens, "eval.max_new_tokens"))
    held_out = {p.id for p in split_holdout(problems, cfg.data.holdout, cfg.train.seed)[1]}  # on all prompts, so
    kept = fit_context(problems, tok, model, cfg, *budget)  # the split does not move with the length budget
    sets = {"adapt": [p for p in kept if p.id not in held_out], "heldout": [p for p in kept if p.id in held_out]}
    if not sets["adapt"]:
        raise DataError(f"every prompt left to adapt on is too long for the context ({budget[1]} {budget[0]}); "
                        "lower it, lower data.holdout, or use a model with a longer context")
    for name, probs in extra.items():
        sets[name] = fit_context(probs, tok, model, cfg, cfg.eval.max_new_tokens, "eval.max_new_tokens")
    return sets

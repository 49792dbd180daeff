"""What a run or an evaluation is about to do, said before it does it: `ttrl data` shows the
prompts as the model will read them (through the tokenizer's chat template), their gold answers
and how the sets are split, loading the tokenizer but no weights; `announce` says up front how
much decoding a command is about to do, and where."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from ttrl.config import Config
from ttrl.data import Problem, load_sets, run_sets, split_holdout

CPU_TOKENS = 500_000
"""Tokens to decode (at most) above which a CPU run gets the hint to start smaller: the demo
decodes about 50,000 and takes minutes on a laptop's CPU."""


def holdout_note(cfg: Config, overrides: list[str]) -> str | None:
    """A note when data.train was given on the command line but data.holdout came from the config
    file: the user's own file is then split into adapt and heldout without their asking."""
    given = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    if cfg.data.holdout <= 0 or "data.train" not in given or "data.holdout" in given:
        return None
    return (f"data.holdout = {cfg.data.holdout} (from the config) splits {cfg.data.train}: a seeded share of its "
            "prompts is the `heldout` set, the rest `adapt`; add data.holdout=0 to keep it as one set")


def announce(cfg: Config, sets: dict[str, list[Problem]], device, training: bool = False, quiet: bool = False,
             file=None) -> str:
    """Say (on stderr, unless `quiet`) what is about to run: prompts x samples x tokens per
    phase, on which device; on a CPU with a large budget, how to start smaller. Returns the text."""
    device = str(getattr(device, "type", device))
    k, ev = cfg.eval.n_samples, cfg.eval
    counts = ", ".join(f"{name} {len(probs)}" for name, probs in sets.items() if probs)
    n_eval = sum(len(p) for p in sets.values())
    passes = (int(cfg.eval.before) + 1 + (cfg.train.steps // cfg.eval.every if cfg.eval.every and cfg.train.steps
                                          else 0)) if training else 1
    greedy = " (+ 1 greedy)" if ev.greedy else ""
    when = f", {passes} times (before, during and after training)" if passes > 2 else \
        " before and after training" if passes == 2 else ""
    lines = [f"about to evaluate {n_eval} prompts ({counts}) x {k} samples{greedy} of up to {ev.max_new_tokens} "
             f"new tokens{when}, on {device} ({cfg.model.name}, {cfg.model.dtype})"]
    budget = passes * n_eval * (k + int(ev.greedy)) * ev.max_new_tokens
    if training:
        from ttrl.trainer import total_steps

        adapt = len(sets.get("adapt", []))
        steps = total_steps(cfg, adapt) if adapt else cfg.train.steps
        per_step = min(cfg.train.prompts_per_step, adapt) if adapt else cfg.train.prompts_per_step
        lines.append(f"and train {steps} steps x {per_step} prompts x {cfg.rollout.n_votes} votes of up to "
                     f"{cfg.rollout.max_new_tokens} new tokens ({cfg.reward.n_train_samples} trained on per prompt)")
        budget += steps * per_step * cfg.rollout.n_votes * cfg.rollout.max_new_tokens
    if device == "cpu" and budget > CPU_TOKENS:
        lines.append(f"that is up to {budget:,} tokens to decode on a CPU, which can take hours: for a first look "
                     "try --config demo (16 votes, 8-token answers), or lower eval.n_samples, rollout.n_votes and "
                     "*.max_new_tokens, or data.limit")
    text = "\n".join(lines)
    if not quiet:
        print(text, file=file or sys.stderr, flush=True)
    return text


def context_config(cfg: Config):
    """The transformers config (no weights) of the model a run would load, for its context length."""
    from ttrl.launch import model_settings
    from ttrl.models import model_config

    return model_config(model_settings(cfg.model))


def preview(cfg: Config) -> tuple[dict[str, list[Problem]], dict[str, list[Problem]], object]:
    """(sets as a run forms them, prompts each set leaves out as too long, tokenizer), with the
    tokenizer and the model's config only: the same reading, split and length check as a run."""
    from ttrl.launch import check_model, model_settings
    from ttrl.models import load_tokenizer

    problems, extra = load_sets(cfg)
    check_model(cfg.model)
    tok = load_tokenizer(model_settings(cfg.model).name)
    sets = run_sets(cfg, problems, extra, tok, SimpleNamespace(config=context_config(cfg)))
    held = {p.id for p in split_holdout(problems, cfg.data.holdout, cfg.train.seed)[1]}
    every = {"adapt": [p for p in problems if p.id not in held], "heldout": [p for p in problems if p.id in held],
             **extra}
    kept = {name: {p.id for p in probs} for name, probs in sets.items()}
    return sets, {name: [p for p in probs if p.id not in kept[name]] for name, probs in every.items()}, tok


def rendered(tok, problems: list[Problem], cfg: Config) -> list[tuple[str, int]]:
    """(the prompt text the model reads, special tokens and chat template included; its length in
    tokens) of each problem: the trainer's own encoding, decoded back."""
    from ttrl.data import encode_problems

    return [(tok.decode(ids), len(ids)) for ids in encode_problems(tok, problems, cfg)]


SET_ROLES = {"adapt": "trained on, and evaluated", "heldout": "evaluated, never trained on"}


def describe(cfg: Config, show: int = 2, overrides: list[str] | None = None) -> str:
    """`ttrl data`'s text: the split, the left-out prompts, and `show` rendered prompts per set
    with their gold answers (0: all)."""
    sets, skipped, tok = preview(cfg)
    total = sum(len(p) for p in (sets["adapt"], sets["heldout"], skipped["adapt"], skipped["heldout"]))
    split = (f"data.holdout {cfg.data.holdout}, split with train.seed {cfg.train.seed}" if cfg.data.holdout
             else "data.holdout 0: no held-out split")
    out = [f"data.train {cfg.data.train}: {total} prompts ({split})"]
    note = holdout_note(cfg, overrides or [])
    if note:
        out.append(f"note: {note}")
    for name, probs in sets.items():
        role = SET_ROLES.get(name, "data.eval set: evaluated, never trained on")
        gold = sum(p.answer is not None for p in probs)
        left = f"; {len(skipped.get(name, []))} too long, left out" if skipped.get(name) else ""
        out.append(f"  {name:<10} {len(probs):>5} prompts, {gold} with a gold answer ({role}{left})")
    too_long = [(name, p) for name, probs in skipped.items() for p in probs]
    if too_long:
        out.append("too long for the context (data.too_long=skip leaves them out): "
                   + ", ".join(f"{name} {p.id!r}" for name, p in too_long[:10]) + (", ..." if len(too_long) > 10 else ""))
    for name, probs in sets.items():
        chosen = probs if show == 0 else probs[:show]
        for p, (text, n_tokens) in zip(chosen, rendered(tok, chosen, cfg)):
            gold = f"gold {p.answer!r}" if p.answer is not None else "no gold answer"
            out += ["", f"--- {name} · id {p.id!r} · {gold} · {n_tokens} prompt tokens"
                        + (f" · {p.source}" if p.source else ""), text.rstrip("\n")]
    return "\n".join(out)

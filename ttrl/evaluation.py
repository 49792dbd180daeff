"""Accuracy against gold answers: avg@k (pass@1 averaged over k samples), maj@k (the
majority vote of k samples, a.k.a. cons@k), pass@k (unbiased estimator) and greedy accuracy.

Gold answers are read here and in the trainer's diagnostics only, never on the training path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from math import comb, sqrt
from statistics import stdev

import torch

from ttrl.config import EvalConfig
from ttrl.data import Problem, render_prompt
from ttrl.distributed import Dist
from ttrl.grading import is_equivalent, sample_answers
from ttrl.data import encode_prompts
from ttrl.metrics import watch_decoding
from ttrl.rollout import Rollout, Sampler, Sampling, TorchSampler
from ttrl.voting import majority_vote

EVAL_SEED_OFFSET = 7919
"""Evaluation samples are seeded with train.seed + this, in training and in `ttrl eval` alike, so
a separate evaluation of the base model reproduces a run's step-0 numbers."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class ProblemResult:
    id: str
    gold: str | None
    pseudo_label: str | None
    majority_ratio: float
    n_correct: int | None
    n_samples: int
    maj_correct: bool | None
    histogram: list[tuple[str, int]]
    """Vote counts per answer class, largest first ("<no answer>" for samples without one)."""
    greedy_correct: bool | None = None
    """Whether the greedy (temperature 0) answer is right; None where it was not decoded or graded."""
    completions: list[str] | None = None
    """The k sampled completions, kept only when asked (`keep_samples`, `ttrl eval --samples`)."""
    answers: list[str | None] | None = None
    """The answer extracted from each completion (None: none found), kept with `completions`."""

    def record(self) -> dict:
        """As a JSON-able dict, without the sample fields that were not kept."""
        return {k: v for k, v in self.__dict__.items() if v is not None or k not in ("completions", "answers")}


def score_group(answers: list[str | None], gold: str | None, pid: str = "") -> ProblemResult:
    """Vote over one prompt's answers and (when gold is known) grade each answer and the vote.
    For a multiple-choice problem answers and gold are letters, equal only when identical."""
    vote = majority_vote(answers)
    hist = Counter({vote.representatives[c]: vote.counts[c] for c in range(len(vote.counts))})
    missing = sum(1 for c in vote.cluster_of if c < 0)
    if missing:
        hist["<no answer>"] = missing
    n_correct = maj = None
    if gold is not None:
        n_correct = sum(is_equivalent(a, gold) for a in answers)
        maj = is_equivalent(vote.pseudo_label, gold)
    return ProblemResult(id=pid, gold=gold, pseudo_label=vote.pseudo_label, majority_ratio=vote.majority_ratio,
                         n_correct=n_correct, n_samples=len(answers), maj_correct=maj,
                         histogram=hist.most_common())


def standard_error(values: list[float]) -> float | None:
    """Standard error of a mean over problems (sample standard deviation / sqrt(n)): how far the
    accuracy would move on another draw of as many problems like these. None under two problems."""
    return stdev(values) / sqrt(len(values)) if len(values) > 1 else None


def scores(results: list[ProblemResult], k: int) -> dict[str, list]:
    """Per graded problem: its id and its avg@k, maj@k and greedy (1/0; None where not decoded),
    kept beside the summary so that two evaluations can be compared problem by problem."""
    labelled = [r for r in results if r.gold is not None]
    return {"id": [r.id for r in labelled],
            f"avg@{k}": [r.n_correct / r.n_samples for r in labelled],
            f"maj@{k}": [int(bool(r.maj_correct)) for r in labelled],
            "greedy": [None if r.greedy_correct is None else int(r.greedy_correct) for r in labelled]}


def paired_change(before: dict, after: dict, metric_before: str, metric_after: str | None = None
                  ) -> tuple[float, float | None, int] | None:
    """`metric_after` of `after` minus `metric_before` of `before`, over the problems both graded
    (matched by id, from their `scores`): (mean, its standard error, problems). Pairing removes what
    the problems share, so the error is that of the change, not of either accuracy. None when either
    evaluation has no scores for its metric or no problem is in both."""
    a, b = after.get("scores") or {}, before.get("scores") or {}
    metric_after = metric_after or metric_before
    if not all(key in s for s, key in ((a, "id"), (b, "id"), (a, metric_after), (b, metric_before))):
        return None
    old = {pid: v for pid, v in zip(b["id"], b[metric_before]) if v is not None}
    diffs = [v - old[pid] for pid, v in zip(a["id"], a[metric_after]) if v is not None and pid in old]
    if not diffs:
        return None
    return sum(diffs) / len(diffs), standard_error(diffs), len(diffs)


def summarize(results: list[ProblemResult], k: int) -> dict:
    """Aggregate metrics over problems. Accuracy (avg@k, maj@k, pass@k, greedy) is over the
    `n_labelled` problems that have a gold answer, and absent when none has; avg@k and maj@k come
    with their standard errors over those problems (`avg@k_se`, `maj@k_se`)."""
    labelled = [r for r in results if r.gold is not None]
    out: dict = {"n_prompts": len(results), "n_labelled": len(labelled),
                 "majority_ratio": sum(r.majority_ratio for r in results) / max(1, len(results))}
    if labelled:
        per = scores(labelled, k)
        for key in (f"avg@{k}", f"maj@{k}"):
            out[key] = sum(per[key]) / len(labelled)
            se = standard_error(per[key])
            if se is not None:
                out[f"{key}_se"] = se
        out[f"pass@{k}"] = sum(pass_at_k(r.n_samples, r.n_correct, k) for r in labelled) / len(labelled)
        graded = [g for g in per["greedy"] if g is not None]
        if graded:
            out["greedy"] = sum(graded) / len(graded)
    return out


def eval_seed(cfg) -> int:
    """The evaluation sampler's seed: fixed by train.seed and apart from the training streams, so the
    evaluations before and after training (and `ttrl eval`) draw the same random numbers."""
    return cfg.train.seed + EVAL_SEED_OFFSET


def evaluate(model, tokenizer, problems: list[Problem], cfg: EvalConfig, template: str,
             chat_template: bool = True, seed: int = 0, dist: Dist | None = None,
             sampler: Sampler | None = None, progress=None, system_prompt: str = "",
             keep_samples: bool = False) -> tuple[dict, list[ProblemResult]]:
    """Sample k answers per problem with the evaluation sampler; (summary, per-problem results).

    Problem i samples from its own stream, the i-th seed drawn from `seed`, so under `dist` each
    rank can take a share of the problems and the gathered results are those of one process.
    `progress(done, total)`: this rank's prompts done, counted as they decode (a greedy pass
    weighs a k-th of a sampled one), so a long decode batch shows progress before it ends.
    `keep_samples`: each result keeps its completions and their extracted answers."""
    dist = dist or Dist()
    sampler = sampler or TorchSampler(tokenizer)
    share = dist.share(len(problems))
    mine = [problems[i] for i in share]
    prompt_ids = encode_prompts(tokenizer, [render_prompt(p, template) for p in mine], chat_template, system_prompt)
    k = cfg.n_samples
    seeds = torch.randint(0, 2**62, (len(problems),), generator=torch.Generator().manual_seed(seed)).tolist()
    sampling = Sampling.of(cfg, n=k)
    greedy = cfg.greedy and any(p.answer is not None for p in problems)
    labelled = [i for i, p in enumerate(mine) if p.answer is not None] if greedy else []
    greedy_share = len(mine) / (k + 1) if labelled else 0.0  # of the prompt count, spent on the greedy pass
    count = _Count(progress, len(mine))
    rollout = _in_chunks(sampler, model, prompt_ids, sampling, [seeds[i] for i in share], count,
                         (len(mine) - greedy_share) / max(1, len(mine)))
    answers = sample_answers(rollout.texts, rollout.truncated,
                             [p.choices for p, size in zip(mine, rollout.group_sizes) for _ in range(size)])
    results = [score_group([answers[i] for i in rollout.group(p)], prob.answer, prob.id)
               for p, prob in enumerate(mine)]
    if keep_samples:
        for p, result in enumerate(results):
            result.completions = [rollout.texts[i] for i in rollout.group(p)]
            result.answers = [answers[i] for i in rollout.group(p)]
    if greedy:  # every rank decodes (FSDP); graded where gold
        g = _in_chunks(sampler, model, [prompt_ids[i] for i in labelled], replace(sampling, n=1, temperature=0.0),
                       [0] * len(labelled), count, greedy_share / max(1, len(labelled)))
        greedy_answers = sample_answers(g.texts, g.truncated, [mine[i].choices for i in labelled])
        for i, a in zip(labelled, greedy_answers):
            results[i].greedy_correct = is_equivalent(a, mine[i].answer)
    count.finish()
    results = dist.gather(results)
    summary = summarize(results, k)
    n = max(1, len(problems) * k)
    summary["mean_length"] = sum(dist.gather([rollout.n_tokens])) / n
    summary["no_answer"] = sum(dist.gather([sum(a is None for a in answers)])) / n
    summary["truncated"] = sum(dist.gather([sum(rollout.truncated)])) / n
    return summary, results


class _Count:
    """Prompts done so far (fractions of them while a batch decodes), told to a
    `progress(done, total)` callback."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.done = progress, total, 0.0

    def __call__(self, n: float, partial: float = 0.0) -> None:
        """`n` more prompts done; `partial`: the share of the next ones already decoded."""
        self.done += n
        if self.progress is not None:
            self.progress(min(self.total, self.done + partial), self.total)

    def finish(self) -> None:
        self.done = float(self.total)
        self(0)


def _in_chunks(sampler: Sampler, model, prompt_ids: list[list[int]], sampling: Sampling, seeds: list[int],
               count: _Count, weight: float = 1.0) -> Rollout:
    """The sampler over the prompts a batch at a time (whole prompts, sampling.max_batch_rows
    samples), counting `weight` per prompt, in part after each decoded token: the same samples as
    one call, each prompt having its own random stream."""
    per = max(1, sampling.max_batch_rows // sampling.n)
    parts = []
    for start in range(0, len(prompt_ids), per):
        size = len(prompt_ids[start:start + per])
        with watch_decoding(lambda t, total: count(0, weight * size * t / total)):
            parts.append(sampler.generate(model, prompt_ids[start:start + per], sampling, seeds[start:start + per]))
        count(weight * size)
    return Rollout.concat(parts) if parts else sampler.generate(model, [], sampling, [])


def run_evals(model, tok, sets: dict[str, list[Problem]], cfg, step: int, writer,
              store: dict, dist: Dist | None = None, sampler: Sampler | None = None, bar=None,
              label: str | None = None, keep_samples: bool = False) -> dict[str, tuple[dict, list]]:
    """Evaluate on every set (each rank its share of the problems); rank 0 logs (`writer`); the
    evaluations are appended to `store` (with a few examples and the prompt each showed) and
    returned as {set: (summary, per-problem results)}.
    `bar`: a progress bar (ttrl.metrics.progress_bar) to show each set's progress on."""
    dist = dist or Dist()
    when = label or ("base model" if step == 0 else f"step {step}")
    out = {}
    for name, problems in sets.items():
        if not problems:
            continue
        task = bar.add_task(f"eval {name} ({when})", total=len(dist.share(len(problems))), info="") \
            if bar is not None else None
        progress = (lambda done, total: bar.update(task, completed=done, total=total)) if bar is not None else None
        summary, results = evaluate(model, tok, problems, cfg.eval, cfg.data.template, cfg.model.chat_template,
                                    seed=eval_seed(cfg), dist=dist, progress=progress,
                                    sampler=sampler or TorchSampler(tok, dist.generation),
                                    system_prompt=cfg.data.system_prompt, keep_samples=keep_samples)
        if bar is not None and f"avg@{cfg.eval.n_samples}" in summary:
            bar.update(task, info=f"avg@{cfg.eval.n_samples} {summary[f'avg@{cfg.eval.n_samples}']:.3f}")
        if writer is not None:
            writer.log({"step": step, **{f"eval/{name}/{k}": v for k, v in summary.items()}})
        prompts = {p.id: render_prompt(p, cfg.data.template) for p in problems}
        examples = [{**r.record(), "prompt": prompts.get(r.id)} for r in results[:8]]
        for ex in examples:  # a summary.json stays small: the samples are `ttrl eval --samples`'s
            ex.pop("completions", None), ex.pop("answers", None)
        store.setdefault(name, []).append({"step": step, **summary, "scores": scores(results, cfg.eval.n_samples),
                                           "examples": examples})
        out[name] = summary, results
    return out

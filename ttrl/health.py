"""Is there a training signal at all? (pure)

TTRL learns from agreement between samples. When most samples have no answer (cut off by the
token limit, or no final answer the grader can find) or the vote has no majority, the
pseudo-labels are noise and every reward is ~0: the run spends compute and learns nothing, and
its before/after numbers only look like "a tie". These rules read unlabeled training metrics
only (no gold), so the trainer can warn on the console while it runs and the report can say
so beside its headline.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ttrl.metrics import is_number

NO_ANSWER_LIMIT = 0.5
"""Mean `train/no_answer` above this: most samples neither vote nor earn a reward."""
MAJORITY_RATIO_FLOOR = 0.2
"""Mean `train/majority_ratio` below this: the winning answer holds under a fifth of the N
votes, so the pseudo-label is close to a draw between many answers. (The demo starts at ~0.11
for its first 4 steps and passes 0.9 by step 20; its mean over the run is well above.)"""


def _mean(rows: Sequence[Mapping], key: str) -> float | None:
    values = [r[key] for r in rows if is_number(r.get(key))]
    return sum(values) / len(values) if values else None


def learning_warnings(rows: Sequence[Mapping]) -> list[str]:
    """Sentences saying why the training rows (metrics.jsonl rows with `train/...` keys) carried
    little or no signal, and what to change; [] when the signal looks usable. Means are taken
    over all the rows given: pass the whole run for a verdict, the last few steps for a live check."""
    no_answer, cut_off = _mean(rows, "train/no_answer"), _mean(rows, "train/truncated")
    ratio = _mean(rows, "train/majority_ratio")
    out = []
    fix = missing_answers(no_answer, cut_off, "rollout")
    if fix:
        out.append(f"No signal: {no_answer:.0%} of the training samples had no answer (train/no_answer, "
                   f"mean over {len(rows)} step{'s' * (len(rows) != 1)}), so they neither voted nor earned a "
                   f"reward; {fix}.")
    elif ratio is not None and ratio < MAJORITY_RATIO_FLOOR:
        out.append(f"Weak signal: the vote had no clear majority (train majority ratio {ratio:.2f} on average, "
                   f"below {MAJORITY_RATIO_FLOOR}), so the pseudo-labels are close to a draw between many "
                   "answers. Try more votes (rollout.n_votes), a lower rollout.temperature, or easier prompts: "
                   "TTRL helps only where the base model's maj@N beats a single sample.")
    return out


def missing_answers(no_answer: float | None, cut_off: float | None, section: str) -> str | None:
    """Why most samples had no answer and what to change (`section`: rollout or eval, whose
    max_new_tokens and stop apply); None when most samples had one."""
    if no_answer is None or no_answer <= NO_ANSWER_LIMIT:
        return None
    if cut_off is not None and cut_off >= no_answer / 2:
        return (f"{cut_off:.0%} were cut off by {section}.max_new_tokens: raise it (or ask for a shorter "
                "answer in data.template)")
    return ("most of them ended without an answer the grader can find: check that data.template asks "
            f"for a final answer it extracts (e.g. \\boxed{{}}) and that {section}.stop does not end answers early")


def eval_warning(name: str, summary: Mapping) -> str | None:
    """One evaluation's counterpart of the training check: a sentence when most of its samples
    had no answer (so every accuracy of it reads as 0), else None."""
    no_answer, cut_off = summary.get("no_answer"), summary.get("truncated")
    fix = missing_answers(no_answer if is_number(no_answer) else None, cut_off if is_number(cut_off) else None,
                          "eval")
    if fix is None:
        return None
    return (f"{name}: {no_answer:.0%} of the evaluation samples had no answer, so they count as wrong and its "
            f"accuracies say little about the model; {fix}")

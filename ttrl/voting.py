"""Majority vote over sampled answers: the pseudo-label and majority ratio of TTRL (pure).

Answers are grouped into equivalence classes. Everything is computed from the multiset of
answers, so the vote does not depend on sample order: distinct answer strings are visited
most frequent first (ties by `sort_key`), each joins the first class whose representative it
is equivalent to, and so a class's representative is its most frequent string form. The
winner is the largest class; ties go to the class whose representative has the smallest
`sort_key`. Samples without an answer (None or blank) count in the denominator of the
majority ratio but never form or win a class. The default equivalence, `grading.is_equivalent`,
is bounded in time: a judgement past its budget counts as "not equivalent", so one pathological
sample delays a vote by at most that budget (once) and never hangs it. Multiple-choice answers
are letters, equal only when identical.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from ttrl.grading import is_equivalent


@dataclass(frozen=True)
class Vote:
    pseudo_label: str | None  # representative answer of the winning class (None if no sample had an answer)
    majority_ratio: float  # winner's count / number of samples (ALL samples, including no-answer ones)
    cluster_of: tuple[int, ...]  # class index of each sample, -1 for no answer
    counts: tuple[int, ...]  # size of each class, index = class index
    representatives: tuple[str, ...]  # representative answer of each class
    winner: int  # index of the winning class, -1 if none


def sort_key(answer: str) -> tuple[int, str]:
    """Canonical order for tie-breaks: shorter first, then by code point."""
    return len(answer), answer


def majority_vote(
    answers: Sequence[str | None], equivalent: Callable[[str, str], bool] = is_equivalent
) -> Vote:
    """Cluster `answers` by `equivalent` and elect the largest class (see module doc)."""
    forms = Counter(a for a in answers if isinstance(a, str) and a.strip())
    representatives: list[str] = []
    counts: list[int] = []
    class_of_form: dict[str, int] = {}
    for form in sorted(forms, key=lambda f: (-forms[f], *sort_key(f))):
        k = next((k for k, rep in enumerate(representatives) if equivalent(rep, form)), None)
        if k is None:
            k = len(representatives)
            representatives.append(form)
            counts.append(0)
        class_of_form[form] = k
        counts[k] += forms[form]

    winner = min(
        range(len(counts)), key=lambda k: (-counts[k], *sort_key(representatives[k])), default=-1
    )
    return Vote(
        pseudo_label=representatives[winner] if winner >= 0 else None,
        majority_ratio=counts[winner] / len(answers) if winner >= 0 else 0.0,
        cluster_of=tuple(class_of_form.get(a, -1) if isinstance(a, str) else -1 for a in answers),
        counts=tuple(counts),
        representatives=tuple(representatives),
        winner=winner,
    )

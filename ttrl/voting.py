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
from dataclasses import dataclass, replace
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


def contrastive_vote(votes: Sequence[Vote], equivalent: Callable[[str, str], bool] = is_equivalent) -> list[Vote]:
    """Each prompt's pseudo-label re-elected by lift, for a step's `votes` (one per prompt, pure).

    An answer that every question gets is no evidence about this question: when a policy drifts
    towards one answer for all prompts (the demo's seed 1 voted "1" for every sum by step 14),
    majority voting rewards the drift. Here class k of prompt p scores its share of p's samples
    minus the mean share of answers equivalent to it among the other prompts' samples; the label
    is the class of highest positive score (ties: more votes, then `sort_key`), and a prompt with
    none has no label (winner -1, ratio 0: its majority rewards are all 0). Where the prompts'
    answers differ, as on real problem sets, the scores are the shares and the vote is the
    majority's. `majority_ratio` is the elected class's share. Needs the whole step's votes, so
    the labels depend on which prompts share a step (the samples still do not)."""
    def share(vote: Vote, answer: str) -> float:
        n = len(vote.cluster_of)
        return sum(c for rep, c in zip(vote.representatives, vote.counts) if equivalent(answer, rep)) / n if n else 0.0

    out = []
    for p, v in enumerate(votes):
        others = [o for q, o in enumerate(votes) if q != p]
        n = len(v.cluster_of)
        lift = [c / n - (sum(share(o, rep) for o in others) / len(others) if others else 0.0)
                for rep, c in zip(v.representatives, v.counts)]
        best = min((k for k in range(len(lift)) if lift[k] > 0),
                   key=lambda k: (-lift[k], -v.counts[k], *sort_key(v.representatives[k])), default=-1)
        out.append(replace(v, winner=best, pseudo_label=v.representatives[best] if best >= 0 else None,
                           majority_ratio=v.counts[best] / n if best >= 0 else 0.0))
    return out

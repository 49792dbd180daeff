"""When to stop adapting, decided from unlabeled signals only (pure).

A stopping rule may read the majority ratio, the reward, the entropy and the length of the
rollouts — quantities the model produces without any answer key. It must never read gold-based
metrics (label/reward/rollout accuracy): stopping on them would leak the test labels into training.

The collapse watch (`collapse_reason`) is the one rule that also runs when it is not the stopping
rule: the trainer warns the first time it fires, and train.guard says what follows (by default,
training ends and the run hands back the checkpoint from before the watch's window).
"""

from __future__ import annotations

from typing import Mapping, Sequence

SIGNALS = {"majority_ratio": ("train/majority_ratio",), "reward": ("train/reward",), "entropy": ("train/entropy",),
           "collapse": ("train/majority_ratio", "train/entropy", "train/response_length")}
"""Each rule's metric keys: the only ones a stopping rule may read."""


def _series(history: Sequence[Mapping], key: str) -> list[float]:
    return [row[key] for row in history if key in row and row[key] is not None]


def plateaued(values: Sequence[float], window: int, min_delta: float) -> bool:
    """True when the mean of the last `window` values improved on the mean of the `window`
    before by less than `min_delta`."""
    if window < 1 or len(values) < 2 * window:
        return False
    last = sum(values[-window:]) / window
    before = sum(values[-2 * window:-window]) / window
    return last - before < min_delta


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def collapse_reason(history: Sequence[Mapping], window: int = 5, ratio: float = 0.9,
                    drift: float = 0.5) -> str | None:
    """A sentence when the unlabeled signals look like collapse, else None: over the last `window`
    steps the mean majority ratio is at least `ratio` (saturated), while against the first `window`
    steps of the run the mean token entropy fell by at least `drift` (a share of its start) and the
    mean response length moved by at least `drift` (a share, either way). Without labels this cannot
    tell a model that has learnt the task from one that agrees with itself on wrong answers
    (URLVR's rise-then-fall, SRT's sudden collapse); it says that from here on the vote has little
    left to teach and a wrong pseudo-label is reinforced with full confidence."""
    ratios, entropy, length = (_series(history, key) for key in SIGNALS["collapse"])
    if window < 1 or min(len(ratios), len(entropy), len(length)) < 2 * window:
        return None
    now = _mean(ratios[-window:])
    e0, e1 = _mean(entropy[:window]), _mean(entropy[-window:])
    l0, l1 = _mean(length[:window]), _mean(length[-window:])
    if not (now >= ratio and e0 > 0 and l0 > 0 and (e0 - e1) / e0 >= drift and abs(l1 - l0) / l0 >= drift):
        return None
    return (f"collapse watch: the majority ratio is {now:.2f} over the last {window} steps (>= {ratio}) while, since "
            f"the first {window}, entropy fell {(e0 - e1) / e0:.0%} ({e0:.3f} -> {e1:.3f} nats) and response length "
            f"moved {(l1 - l0) / l0:+.0%} ({l0:.1f} -> {l1:.1f} tokens): the model now agrees with itself, so a wrong "
            "pseudo-label is reinforced with full confidence (train.guard: rollback, the default, ends training "
            "here and hands back an earlier checkpoint)")


def stop_reason(history: Sequence[Mapping], rule: str, window: int = 5, min_delta: float = 0.01,
                entropy_floor: float = 0.05, collapse_ratio: float = 0.9, collapse_drift: float = 0.5) -> str | None:
    """A sentence saying why training should stop now, or None to go on.

    rule: "" (never stop early), "majority_ratio" or "reward" (plateau over `window` steps),
    "entropy" (mean token entropy below `entropy_floor`), or "collapse" (`collapse_reason`).
    """
    if not rule:
        return None
    if rule not in SIGNALS:
        raise ValueError(f"unknown stopping rule {rule!r}; use one of {', '.join(SIGNALS)}")
    if rule == "collapse":
        return collapse_reason(history, window, collapse_ratio, collapse_drift)
    values = _series(history, SIGNALS[rule][0])
    if not values:
        return None
    if rule == "entropy":
        if values[-1] < entropy_floor:
            return f"entropy {values[-1]:.4f} fell below the floor {entropy_floor}"
        return None
    if plateaued(values, window, min_delta):
        return (f"{rule} plateaued: mean over the last {window} steps rose by less than {min_delta} "
                f"(now {sum(values[-window:]) / window:.4f})")
    return None

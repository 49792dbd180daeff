"""When to stop adapting, decided from unlabeled signals only (pure).

A stopping rule may read the majority ratio, the reward and the entropy of the rollouts —
quantities the model produces without any answer key. It must never read gold-based metrics
(label/reward/rollout accuracy): stopping on them would leak the test labels into training.
"""

from __future__ import annotations

from typing import Mapping, Sequence

SIGNALS = {"majority_ratio": "train/majority_ratio", "reward": "train/reward", "entropy": "train/entropy"}
"""The only metric keys a stopping rule may read."""


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


def stop_reason(history: Sequence[Mapping], rule: str, window: int = 5, min_delta: float = 0.01,
                entropy_floor: float = 0.05) -> str | None:
    """A sentence saying why training should stop now, or None to go on.

    rule: "" (never stop early), "majority_ratio" or "reward" (plateau over `window` steps),
    or "entropy" (mean token entropy below `entropy_floor`).
    """
    if not rule:
        return None
    if rule not in SIGNALS:
        raise ValueError(f"unknown stopping rule {rule!r}; use one of {', '.join(SIGNALS)}")
    values = _series(history, SIGNALS[rule])
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

import pytest

from ttrl.stopping import SIGNALS, plateaued, stop_reason


class GoldGuard(dict):
    """A metrics row that fails the test if anything reads a gold-based field."""

    def __getitem__(self, key):
        if "accuracy" in key:
            raise AssertionError(f"stopping rule read gold field {key}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default


def _stream(ratios, entropies=None):
    rows = []
    for i, r in enumerate(ratios):
        rows.append(GoldGuard({"step": i + 1, "train/majority_ratio": r, "train/reward": r,
                               "train/entropy": (entropies or [1.0] * len(ratios))[i],
                               "train/label_accuracy": 0.5, "train/reward_accuracy": 0.5,
                               "train/rollout_accuracy": 0.5}))
    return rows


def _first_stop(rows, rule, **kw):
    for step in range(1, len(rows) + 1):
        reason = stop_reason(rows[:step], rule, **kw)
        if reason:
            return step, reason
    return None, None


def test_majority_ratio_plateau_fires_when_growth_stops():
    # rises 0.1 per step for 6 steps, then flat at 0.9
    ratios = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    step, reason = _first_stop(_stream(ratios), "majority_ratio", window=3, min_delta=0.05)
    # windows (7..9) vs (4..6): 0.9 - 0.7 = 0.2; (8..10) vs (5..7): 0.9-0.8=0.1; (9..11) vs (6..8): 0.9-0.8667=0.033
    assert step == 11 and "plateaued" in reason


def test_entropy_floor():
    rows = _stream([0.5] * 5, entropies=[2.0, 1.0, 0.5, 0.04, 0.01])
    step, reason = _first_stop(rows, "entropy", entropy_floor=0.05)
    assert step == 4 and "below the floor" in reason


def test_no_rule_never_stops_and_short_history_waits():
    rows = _stream([0.5] * 20)
    assert _first_stop(rows, "")[0] is None
    assert stop_reason(rows[:5], "reward", window=3) is None  # needs 2 windows
    assert stop_reason(rows[:6], "reward", window=3) is not None


def test_gold_fields_never_read_and_do_not_change_the_decision():
    rows = _stream([0.3, 0.5, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7])
    a = _first_stop(rows, "reward", window=2, min_delta=0.01)
    for r in rows:
        dict.__setitem__(r, "train/label_accuracy", 1.0)
    assert _first_stop(rows, "reward", window=2, min_delta=0.01) == a
    assert all("accuracy" not in key for keys in SIGNALS.values() for key in keys)


def test_plateau_pure_function():
    assert plateaued([0, 0, 1, 1], 2, 0.5) is False
    assert plateaued([1, 1, 1, 1], 2, 0.5) is True
    with pytest.raises(ValueError, match="unknown stopping rule"):
        stop_reason([{"train/reward": 1}], "label_accuracy")


def _run(ratios, entropies, lengths):
    return [GoldGuard({"step": i + 1, "train/majority_ratio": r, "train/entropy": e, "train/response_length": n,
                       "train/label_accuracy": 0.0}) for i, (r, e, n) in enumerate(zip(ratios, entropies, lengths))]


def test_collapse_watch_needs_saturation_and_both_drifts():
    from ttrl.stopping import collapse_reason

    # window 2: first-window means entropy 1.0, length 8.0; last-window means below.
    saturated = _run([0.2, 0.3, 0.9, 0.95], [1.2, 0.8, 0.3, 0.2], [8, 8, 3, 3])
    reason = collapse_reason(saturated, window=2, ratio=0.9, drift=0.5)
    # ratio (0.9 + 0.95) / 2 = 0.925; entropy 1.0 -> 0.25 (-75%); length 8 -> 3 (-62%)
    assert "0.93 over the last 2 steps" in reason and "fell 75%" in reason and "-62%" in reason
    assert collapse_reason(saturated, window=2, ratio=0.95, drift=0.5) is None  # not saturated enough
    assert collapse_reason(saturated, window=2, ratio=0.9, drift=0.8) is None  # entropy fell 75% < 80%
    assert collapse_reason(_run([0.2, 0.3, 0.9, 0.95], [1.2, 0.8, 0.3, 0.2], [8, 8, 7, 7]), 2) is None  # length held
    assert collapse_reason(_run([0.2, 0.3, 0.9, 0.95], [1.2, 0.8, 1.0, 1.0], [8, 8, 3, 3]), 2) is None  # entropy held
    assert collapse_reason(_run([0.2, 0.3, 0.9, 0.95], [1.2, 0.8, 0.3, 0.2], [4, 4, 9, 9]), 2) is not None  # longer
    assert collapse_reason(saturated[:3], window=2) is None  # two windows needed
    assert stop_reason(saturated, "collapse", window=2, collapse_ratio=0.9, collapse_drift=0.5) == reason

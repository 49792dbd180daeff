"""ttrl.health: the no-signal rule on hand-made metrics rows."""

from ttrl.health import MAJORITY_RATIO_FLOOR, NO_ANSWER_LIMIT, learning_warnings


def rows(no_answer, truncated, ratio):
    return [{"step": i + 1, "train/no_answer": a, "train/truncated": t, "train/majority_ratio": r}
            for i, (a, t, r) in enumerate(zip(no_answer, truncated, ratio))]


def test_every_sample_cut_off_says_raise_max_new_tokens():
    (warning,) = learning_warnings(rows([1.0, 1.0], [1.0, 1.0], [0.0, 0.0]))
    assert warning.startswith("No signal: 100% of the training samples had no answer")
    assert "mean over 2 steps" in warning and "raise it" in warning and "rollout.max_new_tokens" in warning


def test_no_answer_without_cut_offs_points_at_the_template():
    (warning,) = learning_warnings(rows([0.9, 0.8], [0.1, 0.0], [0.05, 0.1]))
    assert "85%" in warning and "data.template" in warning and "raise it" not in warning


def test_no_majority_is_a_weak_signal():
    (warning,) = learning_warnings(rows([0.1, 0.1, 0.1], [0.0] * 3, [0.1, 0.15, 0.2]))  # mean 0.15
    assert warning.startswith("Weak signal") and "0.15" in warning and "rollout.n_votes" in warning


def test_a_run_with_signal_passes_and_thresholds_are_strict():
    assert learning_warnings(rows([0.5, 0.5], [0.5, 0.5], [0.2, 0.2])) == []  # exactly at both limits
    assert NO_ANSWER_LIMIT == 0.5 and MAJORITY_RATIO_FLOOR == 0.2
    # The demo's shape: 78% cut off at first, learns to answer; over the run the signal is there.
    demo = rows([0.78, 0.6, 0.3, 0.1, 0.05, 0.05], [0.78, 0.6, 0.3, 0.1, 0.05, 0.05], [0.11, 0.12, 0.3, 0.6, 0.9, 0.9])
    assert learning_warnings(demo) == []
    assert learning_warnings([]) == [] and learning_warnings([{"step": 1, "train/reward": None}]) == []

"""The user's own answer checker and reward (ttrl.plugins), through every stage that reads answers."""

import json
from pathlib import Path

import pytest

from ttrl.config import ConfigError, load_config
from ttrl.grading import extract_answer, is_equivalent, sample_answers
from ttrl.plugins import use_answer_checker
from ttrl.rewards import label_free_rewards
from ttrl.voting import majority_vote

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "examples" / "units.py"
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture
def units():
    use_answer_checker(f"{UNITS}:extract", f"{UNITS}:equivalent")
    yield
    use_answer_checker()  # ttrl's own again for the other tests


def test_the_users_checker_decides_votes_and_answers(units):
    texts = ["It is 120 cm long.", "So 1.2 m.", "About 1200 mm", "3 m", "1.2"]
    answers = sample_answers(texts, [False] * 5)
    assert answers == ["120 cm", "1.2 m", "1200 mm", "3 m", None]  # no unit: no answer
    vote = majority_vote(answers)
    assert vote.counts[vote.winner] == 3 and vote.majority_ratio == pytest.approx(3 / 5)
    assert is_equivalent("1.2 m", "120 cm") and not is_equivalent("1.2 m", "12 cm") and not is_equivalent("", "")


def test_without_the_plugin_answers_are_ttrls_own():
    assert extract_answer("It is 120 cm long.") == "120"  # ttrl's extractor keeps the number
    assert not is_equivalent("1.2 m", "120 cm")


def test_a_reward_plugin_scores_through_the_reward_stage(units):
    texts = ["120 cm", "1.2 m", "1200 mm", "3 m"]
    vote = majority_vote(sample_answers(texts, [False] * 4))
    rewards = label_free_rewards(f"{UNITS}:agree_with_units", vote, texts, [0.0] * 4, [0.0] * 4, [0, 1, 2, 3])
    same_unit = [1.0 if a.split()[-1] == vote.pseudo_label.split()[-1] else 0.5 for a in texts[:3]]
    assert rewards == same_unit + [0.0]


@pytest.mark.parametrize("key, spec, why", [
    ("reward.kind", "no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("reward.kind", f"{UNITS}:nothing", "has no function nothing"),
    ("reward.kind", f"{UNITS}:extract", "must take 3 positional argument"),
    ("data.answer_extractor", "missing/file.py:extract", "no file"),
    ("data.answer_equivalence", f"{UNITS}:extract", "must take 2 positional argument"),
    ("data.answer_extractor", "extract", "not 'package.module:function'"),
])
def test_a_plugin_that_cannot_serve_fails_at_config_time_naming_the_key(key, spec, why):
    with pytest.raises(ConfigError, match=why) as e:
        load_config(TINY, [f"{key}={spec}"])
    assert e.value.key == key


def test_a_run_with_the_users_reward_and_checker(tmp_path):
    from ttrl.trainer import train

    cfg = load_config(TINY, [f"reward.kind={UNITS}:agree_with_units", f"data.answer_extractor={UNITS}:extract",
                             f"data.answer_equivalence={UNITS}:equivalent", "train.steps=1", "eval.before=false",
                             "eval.n_samples=1", "eval.greedy=false"])
    try:
        train(cfg, tmp_path, quiet=True)
    finally:
        use_answer_checker()
    (step,) = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "train/reward" in r]
    # A random tiny model writes no lengths: no answers, so the user's reward gives 0 everywhere.
    assert step["train/no_answer"] == 1.0 and step["train/reward"] == 0.0
    assert json.loads((tmp_path / "config.json").read_text())["reward"]["kind"].endswith("units.py:agree_with_units")

"""Multiple-choice answers: extraction from what models write, data, the generator, the vote."""

import json
import time
from pathlib import Path

import pytest
import torch

from ttrl.choices import choice_of, extract_choice, render_choices
from ttrl.config import ArithmeticConfig, ConfigError, load_config
from ttrl.data import DataError, Problem, arithmetic_problems, load_file, render_prompt
from ttrl.grading import cache_clear, is_equivalent, sample_answers
from ttrl.voting import majority_vote

NUM = ["10", "12", "14", "16"]  # What is 8 + 4?
CITY = ["Paris", "London", "Berlin", "Madrid"]  # capital of Germany?
SCI = ["It increases", "It decreases", "It stays the same", "It oscillates"]
FRAC = ["0.5", "\\frac{1}{3}", "2", "\\sqrt{2}"]
TABLE = [
    # (completion, choices, expected letter)
    ("8 + 4 = 12. The answer is (B).", NUM, "B"),
    ("8 + 4 = 12, so the answer is B", NUM, "B"),
    ("Adding the numbers gives 12.\n\nAnswer: B", NUM, "B"),
    ("Adding gives 12.\n**Answer:** (B)", NUM, "B"),
    ("We get 12. **Answer: B**", NUM, "B"),
    ("We get 12, which is option B.", NUM, "B"),
    ("Therefore the correct option is **B**.", NUM, "B"),
    ("The final answer is $\\boxed{B}$.", NUM, "B"),
    ("So we have \\boxed{\\text{B}}", NUM, "B"),
    ("\\boxed{\\textbf{(B)}\\ 12}", NUM, "B"),
    ("\\boxed{(B) 12}", NUM, "B"),
    ("8 + 4 = 12\n\\boxed{12}", NUM, "B"),
    ("8+4=12\nB) 12", NUM, "B"),
    ("8+4 = 12\n\nB", NUM, "B"),
    ("The sum is 12, so **B**", NUM, "B"),
    ("The answer is: (b)", NUM, "B"),
    ("answer: b", NUM, "B"),
    ("the correct answer is c) 14", NUM, "C"),
    ("8 + 4 = 12. The answer is 12.", NUM, "B"),
    ("8 + 4 = 12.", NUM, "B"),
    ("The answer is 12 (B).", NUM, "B"),
    ("#### B", NUM, "B"),
    ("I choose B.", NUM, "B"),
    ("I'll go with option B because 8 + 4 = 12.", NUM, "B"),
    # several letters: the final committed answer wins
    ("(A) is wrong because 10 is too small, so the answer is (B).", NUM, "B"),
    ("Option A gives 10 and option C gives 14; 8 + 4 = 12, so the answer is B.", NUM, "B"),
    ("The answer is (C). Wait, 8 + 4 = 12, not 14. The answer is (B).", NUM, "B"),
    ("At first I thought (D), but rechecking gives 12: (B).", NUM, "B"),
    ("The answer is (B). Note that (A), (C) and (D) are all wrong.", NUM, "B"),
    ("(A) is wrong. (C) is wrong. (D) is wrong. That leaves (B).", NUM, "B"),
    # negation
    ("It is not (A), since 10 < 12. It is (B).", NUM, "B"),
    ("The answer is not (A); it's (B).", NUM, "B"),
    ("We can rule out A and D. The sum is 12, choice B.", NUM, "B"),
    ("It can't be (C). So (B).", NUM, "B"),
    ("The answer is neither (A) nor (C); it is (B).", NUM, "B"),
    # restated option list, then the answer
    ("The options are:\nA) 10\nB) 12\nC) 14\nD) 16\n8 + 4 = 12, so B.", NUM, "B"),
    ("A) 10\nB) 12\nC) 14\nD) 16\nThe sum is 12.", NUM, "B"),
    ("A. 10\nB. 12\nC. 14\nD. 16\nAnswer: B. 12", NUM, "B"),
    # option text without the letter
    ("The capital of Germany is Berlin.", CITY, "C"),
    ("Germany's capital: the answer is berlin", CITY, "C"),
    ("It is not Paris or London; Germany's capital is Berlin.", CITY, "C"),
    ("\\boxed{Berlin}", CITY, "C"),
    ("When the temperature rises the pressure goes up. The answer is: It increases.", SCI, "A"),
    ("Heating the gas at fixed volume means the pressure increases. (A)", SCI, "A"),
    ("The value is $\\frac{1}{2}$, i.e. the answer is \\frac{1}{2}.", FRAC, "A"),
    ("So x = 1/3. The answer is 1/3.", FRAC, "B"),
    ("\\boxed{\\sqrt{2}}", FRAC, "D"),
    # lower case and articles
    ("the answer is a prime number, namely (B)", NUM, "B"),
    ("A careful count gives 12. (b)", NUM, "B"),
    # no answer
    ("I am not sure.", NUM, None),
    ("\\boxed{13}", NUM, None),
    ("The answer is (E).", NUM, None),
    ("", NUM, None),
]
TABLE += [
    ("Let me check each option:\n(A) 10: too small\n(B) 12: correct\n(C) 14: too big\n(D) 16: too big", NUM, "B"),
    ("8 + 4 = 12\n**B) 12**", NUM, "B"),
    ("8 + 4 = 12\nB: 12", NUM, "B"),
    ("8 + 4 = 12. So, B is correct.", NUM, "B"),
    ("(C) is the answer, not (B).", NUM, "C"),
    ("So the answer is (B), since (A) is wrong.", NUM, "B"),
    ("8 + 4 = 12, which is (B). (A) is 10, which is less.", NUM, "B"),
    ("Checking: 8 + 4 = 12, so (B). For comparison (C) would be 8 + 6.", NUM, "B"),
    ("The result, 3.5, is not listed; closest is (B).", NUM, "B"),
    # written by SmolLM2-135M-Instruct on the multiple-choice arithmetic task
    ('The correct answer is "B" The letter A is "C".', NUM, "B"),
    ("Choose B, but correct me!", NUM, "B"),
    ("8 + 4 is an integer.", ["8", "12", "4", "16"], None),  # the question restated, not an answer
    ("8 + 4 is 16, not 12.", NUM, "D"),
    ("The correct answer is D), 5.", ["13", "2", "8", "5"], "D"),
    ("0 + 13 C=10\n#### 10\nThe answer is D.", ["13", "2", "5", "8"], "D"),
    ("D is the correct answer to answer question \"4 + 8.\"", ["12", "16", "7", "9"], "D"),
    ("9 is correct.", ["6", "2", "7", "9"], "D"),
]


@pytest.mark.parametrize("text, choices, expected", TABLE)
def test_extract_choice(text, choices, expected):
    assert extract_choice(text, choices) == expected


def test_the_table_is_large_and_covers_the_tricky_cases():
    assert len(TABLE) >= 40
    texts = " ".join(t for t, _, _ in TABLE)
    for tricky in ("not (A)", "is wrong", "answer is: (b)", "capital of Germany is Berlin", "A) 10\nB) 12"):
        assert tricky in texts


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("(b)", "B"), ("\\text{B}", "B"), (" B. ", "B"), ("12", "B"), ("14", "C"), ("E", None), ("13", None),
])
def test_choice_of_a_letter_or_an_option_text(answer, expected):
    assert choice_of(answer, NUM) == expected


def test_choice_of_a_math_equal_option_text():
    assert choice_of("\\frac{2}{4}", FRAC) == "A" and choice_of("\\frac13", FRAC) == "B"
    assert choice_of("berlin", CITY) == "C" and choice_of("Berlin.", CITY) == "C"


def test_letters_are_equal_only_when_identical_and_never_reach_sympy():
    from ttrl.grading import _parsed

    cache_clear()
    assert is_equivalent("B", "B") and is_equivalent("B", "(B)")
    assert not is_equivalent("D", "E") and not is_equivalent("A", "B")
    assert _parsed.cache_info().misses == 0


def test_sample_answers_extracts_letters_for_multiple_choice_samples_only():
    texts = ["So the answer is (B).", "The answer is 12", "8 + 4 = 12", "The answer is (B)."]
    assert sample_answers(texts, [False] * 4, [NUM, None, NUM, NUM]) == ["B", "12", "B", "B"]
    assert sample_answers(texts, [False, False, False, True], [NUM] * 4) == ["B", "B", "B", None]
    assert sample_answers(texts[:2], [False, False]) == ["B", "12"]  # no choices: math extraction


def test_the_trainer_votes_and_rewards_over_letters():
    from ttrl.config import Config
    from ttrl.rollout import Rollout
    from ttrl.groups import reward, vote

    texts = ["B) 12", "The answer is 12.", "So (A)", "\\boxed{B}", "(A) is wrong, the answer is (D).", "12"]
    z = [torch.zeros(3) for _ in texts]
    rollout = Rollout(n=6, prompt_ids=[[1]], completion_ids=[[1, 2, 3]] * 6, logprobs=z, entropy=z, certainty=z,
                      texts=texts, truncated=[False] * 6)
    cfg = Config()
    cfg.reward.n_train_samples = 6
    (group,) = reward(vote(rollout, choices=[tuple(NUM)]), rollout, cfg.reward, seeds=[0])
    assert group.answers == ["B", "B", "A", "B", "D", "B"]
    assert group.vote.pseudo_label == "B" and group.vote.majority_ratio == 4 / 6
    assert [group.rewards[group.train_idx.index(i)] for i in range(6)] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    (open_group,) = reward(vote(rollout), rollout, cfg.reward, seeds=[0])  # without choices: math answers
    assert open_group.vote.pseudo_label == "12"


def test_a_vote_over_letters():
    vote = majority_vote(sample_answers(["(C)", "c)", "Answer: C", "(A)", "no idea"], [False] * 5, [NUM] * 5))
    assert vote.pseudo_label == "C" and vote.counts[vote.winner] == 3


def test_extraction_is_fast_on_hostile_text():
    for text in ["the answer is " * 70_000, "(A) " * 250_000, "A) 10\n" * 100_000, "x" * 1_000_000 + "(B)"]:
        start = time.perf_counter()
        assert extract_choice(text, NUM) in (None, "A", "B")
        assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------- prompts and data

def test_choices_render_into_the_template_or_after_the_problem():
    p = Problem(id="1", prompt="What is 8 + 4?", answer="B", choices=tuple(NUM))
    assert render_choices(NUM) == "A) 10\nB) 12\nC) 14\nD) 16"
    assert render_prompt(p, "Q: {problem}\n{choices}\nLetter:") == (
        "Q: What is 8 + 4?\nA) 10\nB) 12\nC) 14\nD) 16\nLetter:")
    assert render_prompt(p, "{problem} Answer with a letter.") == (
        "What is 8 + 4?\nA) 10\nB) 12\nC) 14\nD) 16 Answer with a letter.")
    braces = Problem(id="2", prompt="Is {choices} literal?", choices=("yes", "no"))
    assert render_prompt(braces, "{problem}\n{choices}") == "Is {choices} literal?\nA) yes\nB) no"
    assert render_prompt(Problem(id="3", prompt="2+2?"), "{problem}\n{choices}") == "2+2?\n"


def _jsonl(tmp_path, rows, name="mc.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gold_may_be_a_letter_or_the_option_text_and_becomes_the_letter(tmp_path):
    rows = [{"problem": "8+4?", "choices": NUM, "answer": "B"},
            {"problem": "8+4?", "choices": NUM, "answer": "(b)"},
            {"problem": "8+4?", "choices": NUM, "answer": "12"},
            {"problem": "Capital of Germany?", "choices": CITY, "answer": "berlin"},
            {"problem": "Open question", "answer": "7"},
            {"problem": "No gold", "choices": CITY}]
    problems = load_file(_jsonl(tmp_path, rows))
    assert [p.answer for p in problems] == ["B", "B", "B", "C", "7", None]
    assert problems[0].choices == tuple(NUM) and problems[4].choices is None


def test_a_custom_choices_field_or_none(tmp_path):
    path = _jsonl(tmp_path, [{"q": "8+4?", "options": NUM, "choices": "not options", "gold": "C"}])
    (p,) = load_file(path, prompt_field="q", answer_field="gold", choices_field="options")
    assert p.choices == tuple(NUM) and p.answer == "C"
    (p,) = load_file(path, prompt_field="q", answer_field="gold", choices_field="")
    assert p.choices is None and p.answer == "C"


@pytest.mark.parametrize("record, pattern", [
    ({"choices": NUM, "answer": "E"}, r"mc\.jsonl:2: gold answer 'E' .* none of the 4 choices; give a letter A-D"),
    ({"choices": NUM, "answer": "13"}, r"mc\.jsonl:2: gold answer '13'"),
    ({"choices": "A) 1 B) 2"}, r"mc\.jsonl:2: field 'choices' must be a list of 2 to 26"),
    ({"choices": ["only one"]}, r"mc\.jsonl:2: field 'choices' must be a list of 2 to 26 .*got a list of 1"),
    ({"choices": [str(i) for i in range(27)]}, r"got a list of 27"),
    ({"choices": [1, 2, 3]}, r"numbers quoted"),
    ({"choices": ["yes", " "]}, r"non-empty"),
    ({"choices": ["12", "14", "12 "]}, r"mc\.jsonl:2: options A and C are both"),
    ({"choices": ["0.5", "2", "\\frac{1}{2}"], "answer": "A"},
     r"mc\.jsonl:2: options A and C \('0\.5', '\\\\frac\{1\}\{2\}'\) are equal as maths"),
    ({"choices": ["B", "A", "C"], "answer": "A"}, r"mc\.jsonl:2: option A is 'B', the letter of option B"),
    ({"choices": ["3", "(A)", "5"], "answer": "A"}, r"option B is '\(A\)', the letter of option A"),
])
def test_bad_choices_or_gold_name_the_line_and_what_to_do(tmp_path, record, pattern):
    path = _jsonl(tmp_path, [{"problem": "fine", "choices": NUM, "answer": "A"}, {"problem": "8+4?", **record}])
    with pytest.raises(DataError, match=pattern):
        load_file(path)


def test_options_that_only_look_alike_are_accepted(tmp_path):
    """Letters as their own options, or as words, and different values are not ambiguous."""
    path = _jsonl(tmp_path, [{"problem": "p", "choices": ["A", "B", "the letter C"], "answer": "B"},
                             {"problem": "q", "choices": ["0.5", "0.25", "\\frac{1}{3}"], "answer": "C"}])
    assert [p.answer for p in load_file(path)] == ["B", "C"]


# ---------------------------------------------------------------- the multiple-choice generator

def test_the_arithmetic_generator_with_choices_is_seeded_and_correct():
    cfg = ArithmeticConfig(n=40, choices=4, seed=5)
    mc = arithmetic_problems(cfg)
    assert mc == arithmetic_problems(ArithmeticConfig(n=40, choices=4, seed=5))
    assert mc != arithmetic_problems(ArithmeticConfig(n=40, choices=4, seed=6))
    open_ = arithmetic_problems(ArithmeticConfig(n=40, seed=5))
    assert [(p.id, p.prompt) for p in mc] == [(p.id, p.prompt) for p in open_]  # the same questions
    for p, o in zip(mc, open_):
        assert len(p.choices) == 4 and len(set(p.choices)) == 4
        assert all(int(c) >= 0 for c in p.choices)
        assert p.choices["ABCD".index(p.answer)] == o.answer  # the gold letter names the result
    assert len({p.answer for p in mc}) == 4  # the right option is not always in one place


def test_arithmetic_choices_are_validated():
    with pytest.raises(ConfigError, match="data.arithmetic.choices"):
        load_config(None, ["data.arithmetic.choices=1"])
    assert load_config(None, ["data.arithmetic.choices=26"]).data.arithmetic.choices == 26


# ---------------------------------------------------------------- end to end

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
MC_TEMPLATE = "data.template={problem}\n{choices}\nAnswer with the letter of the correct option."


def test_training_and_evaluation_on_the_multiple_choice_generator(tmp_path):
    """The tiny random model writes no letters, but the whole path runs and golds are letters."""
    from ttrl.trainer import train

    cfg = load_config(TINY, ["data.arithmetic.choices=4", "eval.before=false", "train.steps=2",
                                            MC_TEMPLATE])
    summary = train(cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["pseudo_label"] in (None, "A", "B", "C", "D") for r in rows)
    final = summary["evals"]["heldout"][-1]
    assert "avg@4" in final and "greedy" in final
    assert {e["gold"] for e in final["examples"]} <= set("ABCD")


@pytest.mark.slow
def test_smollm2_votes_on_letters(tmp_path):
    """The real SmolLM2 answers "B) 12" or "The correct answer is D)": its votes are letters."""
    from ttrl.trainer import train

    cfg = load_config(TINY, ["model.architecture={}", "data.arithmetic.choices=4",
                                            "data.arithmetic.n=4", "data.holdout=0", "train.steps=1",
                                            "train.prompts_per_step=2", "rollout.max_new_tokens=8",
                                            "eval.before=false", "eval.n_samples=2", "eval.max_new_tokens=8",
                                            MC_TEMPLATE])
    summary = train(cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert {r["pseudo_label"] for r in rows} <= set("ABCD") and len(rows) == 2
    final = summary["evals"]["adapt"][-1]
    labels = {e["pseudo_label"] for e in final["examples"]}
    assert labels <= set("ABCD") | {None} and labels & set("ABCD")

"""Answer extraction and equivalence: benchmark golds, a hand-checked table, hostile input."""

import json
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrl.grading import JUDGE_WALL_SECONDS, cache_clear, extract_answer, is_equivalent
from ttrl.voting import majority_vote

DATASETS = Path(__file__).resolve().parents[1] / "ttrl" / "datasets"
PAIRS = [json.loads(line) for line in (Path(__file__).parent / "data" / "equivalence_pairs.jsonl").open()]

# Pairs of the table where the grader disagrees with the hand-checked truth, and why we accept it.
ACCEPTED_PAIR_EXCEPTIONS = {
    ("52_8", "42"): "numbers in other bases are compared as written, not converted",
    ("e^{i\\pi}", "-1"): "math-verify reads i as a real symbol unless the answer looks complex",
    ("3R^2", "3r^2"): "math-verify lower-cases identifiers, so R and r are one variable",
}
# Benchmark golds that cannot be extracted or matched: none.
ACCEPTED_GOLD_EXCEPTIONS: set[tuple[str, str, str]] = set()


def model_like(gold: str, style: str) -> str:
    """A completion as a model writes it, with other numbers in the reasoning."""
    reasoning = "First, 12 + 30 = 42 and 7/2 = 3.5, so there are 3 cases.\nChecking case 2 gives 17.\n"
    if style == "boxed":
        return reasoning + f"Putting it together, the answer is \\boxed{{{gold}}}."
    if style == "plain":
        return reasoning + f"The answer is {gold}."
    return reasoning + f"The final answer is ${gold}$. I hope 99 is not it."


def variant(gold: str, source: str) -> str:
    """Another way to write the gold: "025" -> "25", "142.0" -> "142", \\frac -> \\dfrac."""
    if source in ("aime", "amc"):
        return str(int(float(gold)))
    return gold.replace("\\frac", "\\dfrac").replace("\\left", "").replace("\\right", "")


def test_every_benchmark_gold_is_extracted_and_judged_equal():
    failures = set()
    start = time.perf_counter()
    for name in ("aime2024", "amc", "math500"):
        for row in map(json.loads, (DATASETS / f"{name}.jsonl").open()):
            gold = row["answer"]
            for style in ("boxed", "plain", "dollar"):
                if not is_equivalent(extract_answer(model_like(gold, style)), gold):
                    failures.add((name, row["id"], style))
            if not is_equivalent(extract_answer(model_like(variant(gold, row["source"]), "boxed")), gold):
                failures.add((name, row["id"], "variant"))
    assert failures == ACCEPTED_GOLD_EXCEPTIONS
    assert time.perf_counter() - start < 20


def test_table_has_enough_hand_checked_pairs_of_both_kinds():
    assert len(PAIRS) >= 150
    assert sum(p["equivalent"] for p in PAIRS) >= 50 and sum(not p["equivalent"] for p in PAIRS) >= 50


def test_grader_agrees_with_the_hand_checked_table():
    disagreements = {
        (p["a"], p["b"])
        for p in PAIRS
        if is_equivalent(p["a"], p["b"]) != p["equivalent"] or is_equivalent(p["b"], p["a"]) != p["equivalent"]
    }
    assert disagreements == set(ACCEPTED_PAIR_EXCEPTIONS)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{1}{\\sqrt{2}}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5.", "5"),
        ("$\\boxed{\\{1,2\\}}$", "\\{1,2\\}"),
        ("\\boxed{{{x}}}", "{{x}}"),
        ("we had \\boxed{3} but \\boxed{4 is unbalanced", "3"),
        ("The answer is 42.", "42"),
        ("The answer is 12, since 5 + 7 = 12.", "12"),
        ("The answer is 12 because 5 + 7 = 12", "12"),
        ("The answer is $\\frac{1}{2}$, so we are done.", "\\frac{1}{2}"),
        ("The answer is 15, but I am not sure.", "15"),
        ("The answer is 2, 3 and 4.", "2, 3 and 4"),
        ("so the answer is: $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("The final answer is \\(x = 3\\). Also 8.", "x = 3"),
        ("The answer is **7**.", "7"),
        ("The answer is $\\$18.90$.", "\\$18.90"),
        ("Natalia sold 48 clips.\n#### 72", "72"),
        ("Answer: B", "B"),
        ("The answer is (C).", "C"),
        ("\\boxed{\\text{(D)}}", "D"),
        ("\\boxed{\\textbf{(E)}}", "E"),
        ("We get 12 apples and then 3,456 pears", "3456"),
        ("so it is about 2.5", "2.5"),
        ("the temperature fell to -7", "-7"),
        ("the option marked (B) fits", "B"),
        ("\\boxed{5} although the answer is 6", "5"),
        ("\\boxed{ 10 \\text{ cm} }", "10 \\text{ cm}"),
        ("\\boxed{5\x00\x07}", "5"),
        ("7 + 8 = 15", "15"),
        ("4+6=10.", "10"),
        ("-3", "-3"),
        ("1/2", "1/2"),
        ("8 - 3 is 5", "5"),
        ("The sum (3 + 4) is 7", "7"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "I cannot solve this.", "\\boxed{}", "$$", "The answer is .", "#### ",
                                  # the question restated: a SmolLM2 TTRL run (seed 1 of benchmarks/controls.py)
                                  # learnt to answer "What is 9 + 8?" with "9 + 8", which voted 8
                                  "9 + 8", "9+8", "2 + 5.", "8 - 3", "8-3", "4 * 6", "3 × 4", "5 plus 2",
                                  "To add 8 + 1,"])
def test_extract_answer_returns_none_when_there_is_no_answer(text):
    assert extract_answer(text) is None


def test_none_and_blank_answers_are_equivalent_to_nothing():
    assert not is_equivalent(None, None)
    assert not is_equivalent(None, "1") and not is_equivalent("1", None)
    assert not is_equivalent("", "") and not is_equivalent(" ", "")


def test_each_distinct_pair_is_judged_once():
    from ttrl.grading import _equivalent_pair

    cache_clear()
    assert is_equivalent("2\\sqrt{2}", "\\sqrt{8}")
    assert is_equivalent("\\sqrt{8}", "2\\sqrt{2}")  # same pair, other order
    info = _equivalent_pair.cache_info()
    assert (info.misses, info.hits) == (1, 1)


SYMBOLIC_PAIRS = [("2\\sqrt{2}", "\\sqrt{8}", True), ("(1,2)", "(2,1)", False), ("x=5", "5", True)]


def _judge_all(pairs):
    return [is_equivalent(a, b) for a, b, _ in pairs]


def test_works_in_a_thread():
    cache_clear()  # make the thread run sympy, where math-verify's signal.alarm would fail
    results = []
    thread = threading.Thread(target=lambda: results.append(_judge_all(SYMBOLIC_PAIRS)))
    thread.start()
    thread.join(timeout=30)
    assert results == [[expected for _, _, expected in SYMBOLIC_PAIRS]]


def test_works_in_a_worker_process():
    cache_clear()
    with ProcessPoolExecutor(max_workers=1) as pool:
        assert pool.submit(_judge_all, SYMBOLIC_PAIRS).result(timeout=60) == [e for _, _, e in SYMBOLIC_PAIRS]


HOSTILE_TEXTS = {
    "1 MB of prose": "word 12 " * 131072,
    "1 MB completion ending in a box": "x " * 500_000 + "\\boxed{7}",
    "10,000 nested braces in a box": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "10,000 unclosed braces": "\\boxed{" + "{" * 10_000,
    "many unbalanced boxes": "\\boxed{" * 200_000,
    "many answer phrases": "the answer is " * 70_000,
    "1 MB of digits": "1" * 1_000_000,
    "1 MB of dollars": "$" * 1_000_000,
    "1 MB of periods": "." * 1_000_000,
    "1 MB of control characters": "\x00\x01\x1b" * 350_000,
    "invalid LaTeX": "\\boxed{\\frac{\\sqrt{}{^_^}\\left(\\right]\\begin{pmatrix}}",
    "power tower": "\\boxed{10^{10^{10^{10}}}}",
    "double superscript tower": "\\boxed{2^2^2^2^2^2}",
    "huge nested power": "\\boxed{((10^{1000})^{1000})^{1000}}",
    "huge factorial": "\\boxed{(10^{9})!}",
    "huge symbolic power": "\\boxed{(x+1)^{100000}}",
    "integral": "\\boxed{\\int_0^\\infty e^{-x^2} \\sin(x^{99}) dx}",
    "long expression": "\\boxed{" + "+".join(f"x^{i % 90}" for i in range(300)) + "}",
}


@pytest.mark.parametrize("name", HOSTILE_TEXTS)
def test_hostile_input_finishes_within_two_seconds(name):
    text = HOSTILE_TEXTS[name]
    start = time.perf_counter()
    answer = extract_answer(text)
    assert answer is None or (isinstance(answer, str) and answer)
    for other in ("1", "(x+2)^{100000}", "10^{10^{10^{11}}}", answer):
        is_equivalent(answer, other)
    majority_vote([answer, answer, "1", None])
    assert time.perf_counter() - start < 2.0


TOKENS = ["\\frac", "{", "}", "^", "2", "9", "x", "(", ")", "\\sqrt", "-", "+", ",", "\\pi", "=",
          "\\boxed", "$", ".", "\\left", "\\right", "!", "\\", "_", "\\text", "%", "e", "i", " "]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=25), st.lists(st.sampled_from(TOKENS), max_size=25))
def test_random_latex_never_raises_and_is_fast(left, right):
    start = time.perf_counter()
    a, b = extract_answer("".join(left)), extract_answer("".join(right))
    assert a is None or a
    assert isinstance(is_equivalent(a, b), bool)
    assert isinstance(is_equivalent("".join(left), "".join(right)), bool)
    assert time.perf_counter() - start < 2.0


# Inputs that took sympy 53 s, 4.7 s and 2.9 s (issue 23), and realistic answers sympy needs
# minutes for although no pre-check flags them (126 s for the first pair).
SLOW_PAIRS = [("\\binom{1000000}{500000}", "42"), ("\\binom{300000}{150000}", "42"),
              ("(x+1)^{100}(x-1)^{100}(x+2)^{100}", "0")]
UNFLAGGED_SLOW = ("\\sin(x)^{40}\\cos(x)^{40}", "\\frac{\\sin(2x)^{40}}{2^{40}}")


@pytest.mark.parametrize("a, b", SLOW_PAIRS)
def test_huge_binomials_and_degrees_never_reach_sympy(a, b):
    cache_clear()
    start = time.perf_counter()
    assert not is_equivalent(a, b) and not is_equivalent(b, a)
    assert time.perf_counter() - start < 0.5


def test_a_judgement_past_its_budget_is_interrupted_and_counts_as_not_equivalent():
    cache_clear()
    start = time.perf_counter()
    assert not is_equivalent(*UNFLAGGED_SLOW)  # they are equal; sympy would say so after 2 minutes
    assert time.perf_counter() - start < JUDGE_WALL_SECONDS + 0.5


def test_small_binomials_and_moderate_polynomials_are_still_judged():
    cache_clear()
    assert is_equivalent("\\binom{10}{3}", "120") and is_equivalent("\\dbinom{6}{2}", "15")
    assert is_equivalent("(x+1)^{2}(x-1)^{2}", "(x^2-1)^2")
    assert not is_equivalent("\\binom{10}{3}", "119")


def test_the_budget_holds_in_eight_threads_at_once():
    cache_clear()
    results = []

    def judge() -> None:
        start = time.perf_counter()
        results.append((is_equivalent(*UNFLAGGED_SLOW), time.perf_counter() - start))

    threads = [threading.Thread(target=judge) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [r for r, _ in results] == [False] * 8
    assert max(s for _, s in results) < JUDGE_WALL_SECONDS + 2.0  # eight threads share the GIL


def test_a_vote_pays_for_a_pathological_answer_at_most_once():
    cache_clear()
    slow_a, slow_b = UNFLAGGED_SLOW
    answers = ["\\frac{1}{2}"] * 30 + ["0.5"] * 10 + [slow_a] * 8 + [slow_b] * 8 + ["3"] * 4 + [None] * 4
    start = time.perf_counter()
    vote = majority_vote(answers)
    assert time.perf_counter() - start < JUDGE_WALL_SECONDS + 1.0
    assert vote.pseudo_label == "\\frac{1}{2}" and vote.counts[vote.winner] == 40
    start = time.perf_counter()  # the slow answer is now compared by string: instant
    assert not is_equivalent(slow_b, "\\sin(2x)^{40}") and not is_equivalent(slow_b, slow_a)
    assert time.perf_counter() - start < 0.5

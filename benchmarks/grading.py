"""Time and accuracy of the majority vote on MATH-500 with 64 synthetic completions a problem.

Each problem gets 64 model-like completions: the gold written in several equivalent forms
(boxed, "The answer is", `$...$`, `\\dfrac`, decimal for simple fractions, spacing) forming
the plurality, wrong answers drawn from other problems' golds, and a few with no answer.
We time `majority_vote([extract_answer(t) for t in completions])` with cold caches and compare
with the official TTRL baseline, a plain `collections.Counter` over the extracted strings.

    .venv/bin/python benchmarks/grading.py [--limit N] [--seed S]

Last line: one JSON object (median_ms, p99_ms, agreement, counter_agreement, counter_median_ms).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import math_verify.parser  # noqa: E402

from ttrl.grading import cache_clear, extract_answer, is_equivalent  # noqa: E402
from ttrl.voting import majority_vote  # noqa: E402

N_SAMPLES = 64
DATA = Path(__file__).resolve().parents[1] / "ttrl" / "datasets" / "math500.jsonl"


def equivalent_forms(gold: str) -> list[str]:
    """Ways a model writes the gold answer: as is, `\\dfrac`, decimal, re-spaced."""
    forms = [gold]
    if "\\frac" in gold:
        forms.append(gold.replace("\\frac", "\\dfrac"))
    m = re.fullmatch(r"(-?)\\frac\{?(\d+)\}?\{?(\d+)\}?", gold.replace(" ", ""))
    if m:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        if value.denominator in (2, 4, 5, 8, 10, 20, 25, 50, 100):
            forms.append(m.group(1) + str(float(value)))
    if "," in gold:
        forms.append(gold.replace(", ", ",").replace(",", ", "))
    elif " " in gold:
        forms.append(gold.replace(" ", ""))
    return forms


def completion(answer: str | None, rng: random.Random) -> str:
    """A model-like completion: some reasoning with other numbers, then the answer in one style."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    reasoning = f"Let me think step by step. First, {a} + {b} = {a + b}, and {a} \\times {b} = {a * b}.\n"
    reasoning += "Checking the cases again gives the same result.\n" * rng.randint(0, 8)
    if answer is None:
        return reasoning + "I am not able to finish this computation."
    style = rng.randrange(3)
    if style == 0:
        return reasoning + f"So the final answer is $\\boxed{{{answer}}}$."
    if style == 1:
        return reasoning + f"The answer is {answer}."
    return reasoning + f"Therefore, the final answer is ${answer}$. I hope it is correct."


def make_completions(gold: str, golds: list[str], rng: random.Random) -> list[str]:
    """64 completions with the gold's class as plurality but split over its written forms."""
    forms = equivalent_forms(gold)
    wrong: list[str] = []
    while len(wrong) < 5:  # other problems' golds, unless one happens to equal ours
        other = rng.choice(golds)
        if other not in wrong and not is_equivalent(other, gold):
            wrong.append(other)
    while True:
        n_correct = rng.randint(16, 34)
        n_none = rng.randint(0, 4)
        wrong_answers = [rng.choice(wrong) for _ in range(N_SAMPLES - n_correct - n_none)]
        if max(Counter(wrong_answers).values(), default=0) < n_correct:
            break
    answers = [rng.choice(forms) for _ in range(n_correct)] + wrong_answers + [None] * n_none
    rng.shuffle(answers)
    return [completion(a, rng) for a in answers]


def clear_all_caches() -> None:
    cache_clear()
    math_verify.parser.parse_latex_cached.cache_clear()
    math_verify.parser.parse_expr_cached.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic completions")
    args = parser.parse_args()

    golds = [json.loads(line)["answer"] for line in DATA.open()]
    problems = golds[: args.limit] if args.limit else golds
    rng = random.Random(args.seed)
    batches = []
    for gold in problems:
        batches.append((gold, make_completions(gold, golds, rng)))
    majority_vote([extract_answer(t) for t in batches[0][1]])  # warm-up: imports, antlr

    times, counter_times, agree, counter_agree = [], [], 0, 0
    for gold, completions in batches:
        clear_all_caches()
        start = time.perf_counter()
        vote = majority_vote([extract_answer(t) for t in completions])
        times.append(time.perf_counter() - start)

        start = time.perf_counter()
        extracted = [extract_answer(t) for t in completions]
        counted = Counter(a for a in extracted if a is not None).most_common(1)
        counter_times.append(time.perf_counter() - start)

        agree += is_equivalent(vote.pseudo_label, gold)
        counter_agree += bool(counted) and is_equivalent(counted[0][0], gold)

    ms = sorted(t * 1000 for t in times)
    result = {
        "problems": len(batches),
        "samples": N_SAMPLES,
        "median_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        "agreement": round(agree / len(batches), 4),
        "counter_agreement": round(counter_agree / len(batches), 4),
        "counter_median_ms": round(statistics.median(counter_times) * 1000, 2),
    }
    print(f"majority_vote, {N_SAMPLES} samples, cold cache: median {result['median_ms']} ms, "
          f"p99 {result['p99_ms']} ms, label agrees with gold {result['agreement']:.1%}")
    print(f"Counter baseline: median {result['counter_median_ms']} ms, "
          f"label agrees with gold {result['counter_agreement']:.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

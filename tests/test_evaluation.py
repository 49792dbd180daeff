"""Accuracy over the prompts that have a gold answer, however many that is."""

from ttrl.config import EvalConfig
from ttrl.data import Problem
from ttrl.evaluation import ProblemResult, evaluate, pass_at_k, summarize


def _result(gold, n_correct, maj, ratio=0.5):
    return ProblemResult(id="", gold=gold, pseudo_label="1", majority_ratio=ratio, n_correct=n_correct, n_samples=4,
                         maj_correct=maj, histogram=[])


def test_partly_labelled_problems_are_graded_over_the_labelled_ones():
    results = [_result("1", 4, True), _result("2", 1, False), _result(None, None, None, ratio=1.0)]
    out = summarize(results, k=2, greedy=[True, False, None])
    assert out["n_prompts"] == 3 and out["n_labelled"] == 2
    assert out["avg@2"] == (4 / 4 + 1 / 4) / 2
    assert out["maj@2"] == 0.5 and out["greedy"] == 0.5
    assert out["pass@2"] == (1.0 + pass_at_k(4, 1, 2)) / 2 == (1.0 + 0.5) / 2
    assert out["majority_ratio"] == (0.5 + 0.5 + 1.0) / 3  # over every prompt: it needs no gold


def test_no_gold_means_no_accuracy_keys():
    out = summarize([_result(None, None, None)], k=2, greedy=None)
    assert out == {"n_prompts": 1, "n_labelled": 0, "majority_ratio": 0.5}


def test_evaluate_grades_greedy_on_the_labelled_prompts(tiny):
    model, tok = tiny
    problems = [Problem("a", "What is 1 + 1?", "2"), Problem("b", "What is 2 + 2?"),
                Problem("c", "What is 3 + 3?", "6")]
    cfg = EvalConfig(n_samples=2, max_new_tokens=3, greedy=True)
    summary, results = evaluate(model, tok, problems, cfg, "{problem}")
    assert summary["n_prompts"] == 3 and summary["n_labelled"] == 2
    assert {"avg@2", "maj@2", "pass@2", "greedy"} <= summary.keys()
    assert [r.n_correct is None for r in results] == [False, True, False]

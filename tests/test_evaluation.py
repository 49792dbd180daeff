"""Accuracy over the prompts that have a gold answer, however many that is."""

from ttrl.config import EvalConfig
from ttrl.data import Problem
from math import sqrt

import pytest

from ttrl.evaluation import ProblemResult, evaluate, paired_change, pass_at_k, scores, standard_error, summarize


def _result(gold, n_correct, maj, ratio=0.5, greedy=None, pid=""):
    return ProblemResult(id=pid, gold=gold, pseudo_label="1", majority_ratio=ratio, n_correct=n_correct, n_samples=4,
                         maj_correct=maj, histogram=[], greedy_correct=greedy)


def test_partly_labelled_problems_are_graded_over_the_labelled_ones():
    results = [_result("1", 4, True, greedy=True), _result("2", 1, False, greedy=False),
               _result(None, None, None, ratio=1.0)]
    out = summarize(results, k=2)
    assert out["n_prompts"] == 3 and out["n_labelled"] == 2
    assert out["avg@2"] == (4 / 4 + 1 / 4) / 2
    assert out["maj@2"] == 0.5 and out["greedy"] == 0.5
    assert out["pass@2"] == (1.0 + pass_at_k(4, 1, 2)) / 2 == (1.0 + 0.5) / 2
    assert out["majority_ratio"] == (0.5 + 0.5 + 1.0) / 3  # over every prompt: it needs no gold


def test_no_gold_means_no_accuracy_keys():
    out = summarize([_result(None, None, None)], k=2)
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
    assert results[1].greedy_correct is None and {results[0].greedy_correct, results[2].greedy_correct} <= {True, False}
    assert summary["greedy"] == (results[0].greedy_correct + results[2].greedy_correct) / 2


def test_standard_error_hand_computed():
    # mean 0.5, sample variance 4 * 0.25 / 3 = 1/3, so SE = sqrt(1/3 / 4)
    assert standard_error([1, 0, 1, 0]) == pytest.approx(sqrt(1 / 12))
    assert standard_error([0.25, 1.0]) == pytest.approx(0.375)  # two values: |a - b| / 2
    assert standard_error([0.7, 0.7, 0.7]) == 0.0
    assert standard_error([0.5]) is None and standard_error([]) is None


def test_summary_gives_standard_errors_over_the_graded_problems():
    results = [_result("1", 4, True), _result("2", 1, False), _result(None, None, None)]
    out = summarize(results, k=4)
    assert out["avg@4_se"] == pytest.approx(0.375)  # per-problem avg@4 1.0 and 0.25
    assert out["maj@4_se"] == pytest.approx(0.5)  # maj 1 and 0
    assert "avg@4_se" not in summarize(results[:1], k=4)  # one graded problem: no error to give


def test_scores_and_paired_change_match_problems_by_id():
    before = scores([_result("3", 0, False, pid="a", greedy=False), _result("5", 4, True, pid="b", greedy=True),
                     _result("7", 0, False, pid="c"), _result(None, None, None, pid="u")], k=4)
    assert before == {"id": ["a", "b", "c"], "avg@4": [0.0, 1.0, 0.0], "maj@4": [0, 1, 0], "greedy": [0, 1, None]}
    after = {"scores": {"id": ["c", "a", "d"], "avg@4": [1.0, 0.5, 0.25]}}
    mean, se, n = paired_change({"scores": before}, after, "maj@4", "avg@4")
    assert n == 2 and mean == pytest.approx(0.75) and se == pytest.approx(0.25)  # a: +0.5, c: +1.0; "d" unmatched
    assert paired_change({"scores": before}, after, "greedy", "avg@4")[2] == 1  # c has no greedy answer
    assert paired_change({}, after, "maj@4", "avg@4") is None
    assert paired_change({"scores": before}, after, "pass@4", "avg@4") is None


def test_pairing_removes_what_the_problems_share():
    """Easy problems stay easy: the change's error is far below what two independent errors make."""
    base = [0.0, 0.1, 0.9, 1.0, 0.2, 0.8]
    after = [b + 0.1 if b < 0.9 else b for b in base]
    ids = [str(i) for i in range(6)]
    _, se, _ = paired_change({"scores": {"id": ids, "avg@4": base}}, {"scores": {"id": ids, "avg@4": after}}, "avg@4")
    assert se < 0.1 * sqrt(standard_error(base) ** 2 + standard_error(after) ** 2)


def test_pass_at_k_hand_computed():
    # n=5 samples, c=2 correct: P(none of k=2 drawn is correct) = C(3,2)/C(5,2) = 3/10.
    assert pass_at_k(5, 2, 2) == 1 - 3 / 10
    assert pass_at_k(5, 2, 1) == 2 / 5  # pass@1 is the share correct
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # only 2 wrong: any 3 hold a correct one
    assert pass_at_k(16, 1, 16) == 1.0 and abs(pass_at_k(16, 1, 4) - 4 / 16) < 1e-12


def test_pass_at_k_needs_k_samples():
    import pytest

    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pass_at_k(4, 1, 5)


def test_evaluation_in_batches_samples_what_one_call_does(tiny):
    """Progress comes from sampling a batch of problems at a time: the same samples as one call."""
    model, tok = tiny
    problems = [Problem(str(i), f"What is {i} + 1?", str(i + 1)) for i in range(5)]
    calls = []
    one = evaluate(model, tok, problems, EvalConfig(n_samples=3, max_new_tokens=4, max_batch_rows=64), "{problem}",
                   seed=3)
    batched = evaluate(model, tok, problems, EvalConfig(n_samples=3, max_new_tokens=4, max_batch_rows=6),
                       "{problem}", seed=3, progress=lambda done, total: calls.append((done, total)))
    assert [r.histogram for r in one[1]] == [r.histogram for r in batched[1]]
    assert one[0] == batched[0]
    assert {total for _, total in calls} == {5}  # prompts, not sampled and greedy passes together
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == 5
    # 2 problems per batch (6 rows), each sampled prompt 3/4 of one (3 samples + 1 greedy), then the
    # 5 greedy answers in one batch; and progress inside each decode batch, before it ends
    assert {1.5, 3.0, 3.75, 5.0} <= set(done)
    assert any(0 < d < 1.5 for d in done)


def test_evaluate_keeps_samples_and_counts_cut_off_answers(tiny):
    model, tok = tiny
    problems = [Problem("a", "What is 1 + 1?", "2"), Problem("b", "What is 2 + 2?", "4")]
    cfg = EvalConfig(n_samples=3, max_new_tokens=2, greedy=False)
    summary, results = evaluate(model, tok, problems, cfg, "{problem}", keep_samples=True)
    assert [len(r.completions) for r in results] == [3, 3] and [len(r.answers) for r in results] == [3, 3]
    assert summary["truncated"] == 1.0 and summary["no_answer"] == 1.0  # random weights never stop in 2 tokens
    assert "completions" not in evaluate(model, tok, problems, cfg, "{problem}")[1][0].record()


def test_run_evals_keeps_each_examples_prompt_for_the_report(tiny):
    from ttrl.config import load_config
    from ttrl.evaluation import run_evals

    model, tok = tiny
    cfg = load_config(None, ["eval.n_samples=2", "eval.max_new_tokens=2", "data.template=Q: {problem}"])
    problems = [Problem("0", "What is 1 + 1?", "2"), Problem("1", "What is 2 + 2?", "4")]
    store: dict = {}
    run_evals(model, tok, {"adapt": problems}, cfg, 0, None, store)
    examples = store["adapt"][0]["examples"]
    assert [ex["prompt"] for ex in examples] == ["Q: What is 1 + 1?", "Q: What is 2 + 2?"]
    assert all("completions" not in ex for ex in examples)

"""The benchmark scripts' own helpers (benchmarks/ is not a package: imported by path)."""

import os
import statistics
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from _child import ChildFailed, in_child  # noqa: E402


def _dies(args, queue):
    print("loading the model ...", file=sys.stderr)
    print("CUDA out of memory: tried to allocate 60 GiB", file=sys.stderr, flush=True)
    os._exit(args)  # as a crash or the OOM killer would: no exception, no result


def _raises(args, queue):
    raise ValueError(f"bad shape {args}")


def _answers(args, queue):
    queue.put({"twice": 2 * args})


def test_child_result_comes_back():
    assert in_child(_answers, 21) == {"twice": 42}


@pytest.mark.parametrize("fn, code, says", [(_dies, 3, "CUDA out of memory"), (_raises, 1, "ValueError: bad shape 7")])
def test_a_dead_child_fails_fast_with_its_exit_code_and_stderr(fn, code, says):
    t0 = time.perf_counter()
    with pytest.raises(ChildFailed) as e:
        in_child(fn, code if fn is _dies else 7)
    assert time.perf_counter() - t0 < 20  # the old helper waited forever on the queue
    assert e.value.exitcode == code and says in e.value.tail and says in str(e.value)


def test_qwen_shapes_have_the_published_parameter_counts(tmp_path):
    from _shapes import PARAMS, model_dir

    from ttrl.config import ModelConfig
    from ttrl.models import load_model

    for arch, count in PARAMS.items():
        name, shape = model_dir(arch, tmp_path)
        model, _ = load_model(ModelConfig(name=name, architecture=shape), device="meta")  # no weights allocated
        assert model.config.model_type == "qwen2"
        assert model.model.layers[0].self_attn.head_dim == 128
        assert sum(p.numel() for p in model.parameters()) == count


def test_gpu_step_smoke_run_on_cpu():
    """The GPU benchmark's whole path (build, rollout, update) on a tiny qwen2, as it must run on a GPU."""
    import json
    import subprocess

    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_step.py"), "--arch", "tiny", "--device", "cpu",
                          "--prompts", "2", "--votes", "4", "--train-samples", "3", "--new-tokens", "8",
                          "--micro-batch", "2", "--logprob-chunk-mb", "0.5", "--checkpointing", "true"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])["results"][0]
    assert result["arch"] == "tiny" and result["gradient_checkpointing"] is True
    assert all("error" not in result[phase] for phase in ("build", "rollout", "update")), result
    assert result["rollout"]["tokens"] == 2 * 4 * 8  # end-of-sequence ignored: every answer runs to the limit
    assert result["update"]["tokens"] == 2 * 3 * 8  # M=3 of each prompt's samples, in micro-batches of 2 and 1
    assert result["update"]["loss"] == result["update"]["loss"]  # not NaN


@pytest.mark.slow
def test_ppo_vs_grpo_smoke_run_on_tiny(tmp_path):
    """The PPO-vs-GRPO benchmark end to end on the tiny config (2 steps a side): both sides train on
    the same prompts from the same base model, and the JSON line carries each side's figures."""
    import json
    import subprocess

    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "ppo_vs_grpo.py"), "--config",
                          str(root / "configs" / "tiny.yaml"), "--output-dir", str(tmp_path), "train.steps=2",
                          "reward.kind=similarity", "eval.greedy=false"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    grpo, ppo = result["grpo"], result["ppo"]
    assert grpo["steps"] == ppo["steps"] == 2 and grpo["adapt"]["base_avg"] == ppo["adapt"]["base_avg"]
    assert "critic_explained_variance_last5" in ppo and "critic_explained_variance_last5" not in grpo
    assert result["step_seconds_ratio"] > 0
    prompts = [[json.loads(line)["prompt_id"] for line in (tmp_path / "seed-0" / arm / "rollouts.jsonl").open()]
               for arm in ("majority", "majority+algorithm.advantage=ppo")]
    assert prompts[0] == prompts[1]
@pytest.mark.slow
def test_controls_smoke_run_on_tiny_gives_each_margin_with_its_paired_error(tmp_path):
    """controls.py end to end on the tiny config (1 step an arm): TTRL beside the format and random
    controls from one base model, and each margin over the best control with the standard error of
    the per-prompt differences (the runs keep per-prompt scores)."""
    import json
    import subprocess

    from ttrl.evaluation import paired_change

    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "controls.py"), "--config",
                          str(root / "configs" / "tiny.yaml"), "--seeds", "0", "--ttrl", "majority",
                          "--output-dir", str(tmp_path), "train.steps=1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads(out.stdout.strip().splitlines()[-1])["results"]
    assert set(row["after"]) == {"majority", "format", "random"}
    for name in ("adapt", "heldout"):
        m = row["margins"]["majority"][name]
        best = max(("format", "random"), key=lambda a: row["after"][a][name]["avg"])
        assert m["over_best_control"] == row["after"]["majority"][name]["avg"] - row["after"][best][name]["avg"]
        summary = {a: json.loads((tmp_path / "seed-0" / a / "summary.json").read_text())["evals"][name][-1]
                   for a in ("majority", best)}
        assert m["over_best_control_se"] == paired_change(summary[best], summary["majority"], "avg@4")[1]
        own = json.loads((tmp_path / "seed-0" / "majority" / "summary.json").read_text())["evals"][name]
        assert row["greedy_change"]["majority"][name] == list(paired_change(own[0], own[-1], "greedy")[:2])
    # every question no arm trained on: the 4 held-out prompts and the 84 sums data.arithmetic.n=16
    # leaves out, from each model's `ttrl eval`, which reproduces the run's own final held-out figure
    u = row["untrained"]
    evals = {a: json.loads((tmp_path / "seed-0" / "untrained" / f"{a}.json").read_text())["sets"]
             for a in ("base", "majority", "format", "random")}
    for a in ("majority", "format", "random"):
        run = json.loads((tmp_path / "seed-0" / a / "summary.json").read_text())["evals"]["heldout"][-1]
        assert evals[a]["heldout"]["avg@4"] == run["avg@4"]
    per = {a: {p["id"]: p["n_correct"] / 4 for n in ("heldout", "unseen") for p in e[n]["problems"]}
           for a, e in evals.items()}
    assert u["n_prompts"] == len(per["majority"]) == 4 + 84
    best = max(("format", "random"), key=lambda a: sum(per[a].values()))
    diffs = [per["majority"][i] - per[best][i] for i in per["majority"]]
    assert u["best_control"] == best
    assert u["margins"]["majority"]["over_best_control"] == pytest.approx(sum(diffs) / 88)
    assert u["margins"]["majority"]["over_best_control_se"] == pytest.approx(statistics.stdev(diffs) / 88 ** 0.5)
    greedy = {a: {p["id"]: float(p["greedy_correct"]) for n in ("heldout", "unseen") for p in e[n]["problems"]}
              for a, e in evals.items()}
    moved = [greedy["majority"][i] - greedy["base"][i] for i in greedy["majority"]]
    assert u["greedy_change"]["majority"] == pytest.approx([sum(moved) / 88, statistics.stdev(moved) / 88 ** 0.5])


def test_controls_unseen_questions_are_those_the_generator_never_draws(tmp_path):
    from controls import write_unseen

    from ttrl.config import load_config
    from ttrl.data import arithmetic_problems, load_file

    demo = Path(__file__).parent.parent / "configs" / "demo.yaml"
    drawn = {p.id for p in arithmetic_problems(load_config(demo, []).data.arithmetic)}
    unseen = load_file(write_unseen(tmp_path, demo, []))
    ids = {p.id for p in unseen}
    assert len(drawn) == 64 and len(ids) == 36 and not drawn & ids  # 100 one-digit sums in all
    assert all(int(p.answer) == sum(map(int, p.id.split("+"))) for p in unseen)
    assert write_unseen(tmp_path, demo, ["data.arithmetic.n=100"]) is None
    assert write_unseen(tmp_path, demo, ["data.train=math500"]) is None


def test_adaptive_votes_replays_the_rule_on_prefixes_by_hand():
    from adaptive_votes import replay, stop_point

    from ttrl.sequential import VoteRounds

    rounds = VoteRounds(n_max=8, min_votes=4, size=2)  # boundaries 4, 6, 8
    unanimous = ["5"] * 8  # after 6: 6 > 0 + 2, decided
    split = ["5", "6"] * 4  # never decided before N
    late = ["5", "5", "6", "7", "5", "6", "6", "6"]  # after 4, 5 leads; all 8 elect 6
    assert [stop_point(a, rounds) for a in (unanimous, split, late)] == [6, 8, 8]
    sure = VoteRounds(8, 4, 2, confidence=0.68)  # after 4: unanimous 31/32, late (2, 1, 1) 11/16, split 1/2
    assert [stop_point(a, sure) for a in (unanimous, split, late)] == [4, 8, 4]
    r = replay([unanimous, split, late], [[1] * 8, [2] * 8, [3] * 8], ["5", "5", "6"], sure)
    assert r["votes_drawn"] == (4 + 8 + 4) / 3
    assert r["tokens"] == 4 * 1 + 8 * 2 + 4 * 3 and r["token_saving"] == pytest.approx(1 - 32 / 48)
    assert r["agreement"] == pytest.approx(2 / 3)  # `late` stopped on 5, while all 8 elect 6
    assert r["label_accuracy_full"] == 1.0 and r["label_accuracy_early"] == pytest.approx(2 / 3)


def test_a_benchmark_arm_reuses_a_finished_run_with_its_settings_and_retrains_otherwise(tmp_path):
    """Benchmarks share runs through DIR/seed-S/ARM: the same settings read the finished run back
    without training, other settings (or an unfinished run) train afresh."""
    from _arms import arm_dir, run_arm

    tiny = Path(__file__).parent.parent / "configs" / "tiny.yaml"
    quick = ["train.steps=1", "eval.n_samples=1", "eval.greedy=false", "reward.kind=majority"]
    run = arm_dir(tmp_path, 0, "majority")
    first = run_arm(run, quick, tiny)
    assert not first["reused"] and [r["step"] for r in first["rows"]] == [1] and first["evals"]["adapt"]
    stamp = (run / "summary.json").stat().st_mtime_ns
    again = run_arm(run, quick, tiny)
    assert again["reused"] and again["rows"] == first["rows"] and (run / "summary.json").stat().st_mtime_ns == stamp
    other = run_arm(run, quick + ["train.seed=3"], tiny)
    assert not other["reused"] and (run / "summary.json").stat().st_mtime_ns != stamp
    (run / "summary.json").unlink()  # killed before the end: trained again
    assert not run_arm(run, quick + ["train.seed=3"], tiny)["reused"]


@pytest.mark.slow
def test_fsdp_benchmark_smoke_run_halves_the_state_per_rank():
    """The DDP-vs-FSDP2 benchmark end to end on a 2-layer model: every arm runs, and each FSDP2 rank
    holds half the parameter and optimizer bytes of a DDP rank."""
    import json
    import subprocess

    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "fsdp.py"), "--layers", "2", "--steps", "1",
                          "--batch", "4", "--length", "8"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fsdp_state_share_of_ddp"] == 0.5
    assert len(result["arms"]["fsdp_2"]["peak_rss_mb_per_rank"]) == 2

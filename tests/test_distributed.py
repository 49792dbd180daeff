"""Data parallelism: two processes (torchrun, gloo on CPU) reach what one process reaches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ttrl.config import ConfigError, load_config
from ttrl.distributed import Dist, shard

ROOT = Path(__file__).parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# Real learning signal on the random tiny model (ROUGE-L rewards), every cross-rank path: batch-wide
# advantage statistics (reinforce_pp), a reference model, two optimisation passes, two micro-batches
# per rank (no_sync), two optimizer steps per rollout batch (whose prompts each rank must not cut
# up by its own share), sharded evaluation of an uneven set (3 held-out prompts). 12 adapt prompts,
# 3 steps of 4: each prompt is trained on exactly once. A constant rate: runs stopped at step 2 resume
# with train.steps=3, which would lay a cosine schedule over another length.
RUN = ["reward.kind=similarity", "algorithm.advantage=reinforce_pp", "algorithm.kl_coef=0.1",
       "algorithm.lr_schedule=constant",
       "algorithm.ppo_epochs=2", "algorithm.micro_batch_size=4", "algorithm.mini_batch_prompts=2", "data.arithmetic.n=15", "data.holdout=0.2",
       "eval.n_samples=2", "eval.greedy=true", "rollout.max_new_tokens=5", "eval.max_new_tokens=4"]
# One CPU thread per process in every run (torchrun's default): no oversubscription of the CPU.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _ttrl(out: Path, *args: str, procs: int = 1, script: Path | None = None, timeout: float = 300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    entry = [str(script)] if script else ["-m", "ttrl"]
    cmd = (launcher if procs > 1 else [sys.executable]) + entry + [
        "train", "--config", str(TINY), "--output-dir", str(out), "--quiet", "--no-report", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def _assert_same_run(one: Path, two: Path, tol: float = 1e-5) -> None:
    """Same weights and metrics (floats within `tol`), and the same prompts, votes and samples."""
    from safetensors.torch import load_file

    weights = "model.safetensors" if (one / "model" / "model.safetensors").exists() else "adapter_model.safetensors"
    a, b = load_file(one / "model" / weights), load_file(two / "model" / weights)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=tol, msg=name)
    rows_a, rows_b = _rows(one), _rows(two)
    assert [r.keys() for r in rows_a] == [r.keys() for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, abs=tol), (ra["step"], key)
            else:
                assert rb[key] == value, (ra["step"], key)
    assert any(r.get("optim/grad_norm") for r in rows_a), "the test needs non-zero gradients to mean anything"
    rollouts = [[json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [(r["step"], r["prompt_id"], r["samples"]) for r in rollouts[0]] == \
           [(r["step"], r["prompt_id"], r["samples"]) for r in rollouts[1]]
    steps = {r["step"] for r in rollouts[1]}
    for step in steps:
        ids = [r["prompt_id"] for r in rollouts[1] if r["step"] == step]
        assert len(ids) == len(set(ids)) == 4, f"step {step}: a prompt counted twice or missing"


def test_two_processes_train_and_resume_like_one(tmp_path):
    """torchrun -m ttrl with 2 processes, stopped after step 2 and resumed to step 3, ends where a
    single process running 3 steps ends: weights, every logged metric, evaluation, rollouts."""
    one, two = tmp_path / "one", tmp_path / "two"
    _ttrl(one, *RUN, "train.steps=3")
    _ttrl(two, *RUN, "train.steps=2", procs=2)
    assert (two / "checkpoints" / "step-00000002" / "state.json").is_file()
    _ttrl(two, *RUN, "train.steps=3", "--resume", procs=2)
    _assert_same_run(one, two)
    evals = [r for r in _rows(two) if "eval/heldout/n_prompts" in r]
    assert [r["eval/heldout/n_prompts"] for r in evals] == [3, 3] and "eval/heldout/greedy" in evals[0]
    assert len({json.loads(line)["prompt_id"] for line in (two / "rollouts.jsonl").read_text().splitlines()}) == 12
    assert json.loads((one / "summary.json").read_text())["evals"] == json.loads((two / "summary.json").read_text())["evals"]


@pytest.mark.slow
def test_ppo_two_processes_train_and_resume_like_one(tmp_path):
    """PPO under DDP: the critic's values computed by shares and gathered, its gradients all-reduced
    beside the policy's, its weights and optimizer in the checkpoint; 2 processes stopped after step
    2 and resumed end where 1 process ends (policy weights, every metric, the critic's file)."""
    from safetensors.torch import load_file

    run = [("algorithm.advantage=ppo" if a.startswith("algorithm.advantage") else a) for a in RUN]
    run += ["algorithm.critic_lr=1e-3", "algorithm.gamma=0.9", "algorithm.lam=0.8"]
    one, two = tmp_path / "one", tmp_path / "two"
    _ttrl(one, *run, "train.steps=3")
    _ttrl(two, *run, "train.steps=2", procs=2)
    _ttrl(two, *run, "train.steps=3", "--resume", procs=2)
    _assert_same_run(one, two)
    assert any(r.get("critic/grad_norm") for r in _rows(two)) and any(r.get("critic/values") for r in _rows(two))
    a, b = (load_file(d / "checkpoints" / "step-00000003" / "critic.safetensors") for d in (one, two))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)


SKIPPING = '''
import sys
import ttrl.step as T
from ttrl.cli import main

# (step, position in the step's batch) of prompts marked skipped: at step 1 all of rank 0's share,
# at step 2 all of rank 1's, at step 3 every prompt (no update at all).
SKIP = {(0, 0), (0, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)}
SEEDS = {T.prompt_seed(0, s, T.batch_order(8, 4, s, 0)[k]) for s, k in SKIP}
real = T.reward

def reward(groups, rollout, cfg, seeds, *rest):
    groups = real(groups, rollout, cfg, seeds, *rest)
    for g, seed in zip(groups, seeds):
        g.excluded = seed in SEEDS
    return groups

T.reward = reward
sys.exit(main(sys.argv[1:]))
'''


def test_a_rank_without_trained_prompts_joins_the_update(tmp_path):
    """Ranks whose prompts are all skipped (as by reward.min_majority_ratio) still join the gradient
    all-reduce, with no deadlock and the gradient of one process."""
    script = tmp_path / "skipping.py"
    script.write_text(SKIPPING)
    args = ["reward.kind=similarity", "algorithm.micro_batch_size=4", "data.arithmetic.n=8", "data.holdout=0",
            "train.steps=3", "eval.before=false", "eval.n_samples=1", "eval.greedy=false", "rollout.max_new_tokens=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    _ttrl(one, *args, script=script)
    _ttrl(two, *args, script=script, procs=2, timeout=180)
    _assert_same_run(one, two)
    assert [r["train/updated"] for r in _rows(two) if "train/updated" in r] == [2, 2, 0]


# --- the pieces, in one process ----------------------------------------------------------------

def test_shards_are_contiguous_balanced_and_cover_everything():
    for n in range(0, 12):
        for world in range(1, 5):
            parts = [shard(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_prompts_per_step_must_divide_among_processes():
    class Two(Dist):
        def __init__(self):
            super().__init__()
            self.world = 2

    Two().check_batch(4)
    with pytest.raises(ConfigError, match="train.prompts_per_step.*divisible by the 2 processes"):
        Two().check_batch(3)


def test_a_share_of_the_evaluation_samples_what_the_whole_does(tiny):
    """Problem i's samples do not depend on which rank evaluates it (seeds by index in the full set)."""
    from ttrl.data import load_problems
    from ttrl.evaluation import evaluate

    model, tok = tiny
    cfg = load_config(TINY, ["eval.n_samples=3", "eval.max_new_tokens=4", "data.arithmetic.n=5"])
    problems = load_problems(cfg.data.train, cfg.data)

    class Rank1Of2(Dist):  # gathers nothing: returns this rank's results only
        def __init__(self):
            super().__init__()
            self.rank, self.world = 1, 2

    _, whole = evaluate(model, tok, problems, cfg.eval, cfg.data.template, seed=11)
    _, part = evaluate(model, tok, problems, cfg.eval, cfg.data.template, seed=11, dist=Rank1Of2())
    assert [r.id for r in part] == [p.id for p in problems[3:]]
    assert [r.histogram for r in part] == [r.histogram for r in whole[3:]]


LENGTH_VOTES = '''
import sys
import ttrl.step as T
from ttrl.cli import main
from ttrl.groups import Group
from ttrl.voting import majority_vote


def vote(rollout, choices=None):
    """Answers from the real samples' lengths (a random model writes no numbers): 2 values, shared
    across prompts, so contrasting them against the step's other prompts changes labels."""
    groups = []
    for p in range(len(rollout.prompt_ids)):
        mine = [str(len(rollout.texts[i]) % 2) for i in rollout.group(p)]
        groups.append(Group(vote=majority_vote(mine), answers=mine))
    return groups

T.vote = vote
sys.exit(main(sys.argv[1:]))
'''


def test_contrasted_labels_under_two_processes_match_one(tmp_path):
    """reward.contrast elects each label against the whole step's votes: every rank gathers them,
    so two processes elect, log and train what one does."""
    script = tmp_path / "length_votes.py"
    script.write_text(LENGTH_VOTES)
    args = ["reward.kind=majority", "reward.contrast=true", "data.arithmetic.n=8", "data.holdout=0",
            "train.steps=2", "eval.before=false", "eval.n_samples=1", "eval.greedy=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    _ttrl(one, *args, script=script)
    _ttrl(two, *args, procs=2, script=script)
    logged = [[json.loads(line) for line in (d / "rollouts.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [(r["step"], r["prompt_id"], r["pseudo_label"], r["rewards"]) for r in logged[0]] == \
           [(r["step"], r["prompt_id"], r["pseudo_label"], r["rewards"]) for r in logged[1]]
    plain = tmp_path / "plain"
    _ttrl(plain, *[a for a in args if a != "reward.contrast=true"], "reward.contrast=false", "train.steps=1",
          script=script)
    first = [[r["pseudo_label"] for r in runs if r["step"] == 1]
             for runs in (logged[0], map(json.loads, (plain / "rollouts.jsonl").read_text().splitlines()))]
    assert first[0] != first[1], first  # step 1 has the same samples: contrast changed labels
    _assert_same_run(one, two)


def test_model_dtype_is_the_precision_forwards_compute_in(monkeypatch):
    """bf16 is mixed precision over float32 weights, on CPU too; a launch asking for another
    precision than model.dtype is refused rather than one of the two silently winning."""
    from ttrl.distributed import make_accelerator

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert make_accelerator("bfloat16").mixed_precision == "bf16"
    assert make_accelerator("float32").mixed_precision == "no"  # a second run in the process may change it
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert make_accelerator("float32").mixed_precision == "bf16"  # the launch's mixed precision, fp32 weights
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="model.dtype") as e:
        make_accelerator("bfloat16")
    assert e.value.key == "model.dtype"

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ttrl.config import load_config
from ttrl.step import batch_order
from ttrl.trainer import train

ROOT = Path(__file__).parent.parent
TINY = ROOT / "configs" / "tiny.yaml"

TRAIN_KEYS = ["train/reward", "train/majority_ratio", "train/label_accuracy", "train/reward_accuracy",
              "train/rollout_accuracy", "train/entropy", "train/response_length", "loss/policy", "loss/kl",
              "optim/grad_norm", "optim/lr", "perf/step_seconds", "perf/tokens_per_second", "train/votes_drawn",
              "perf/rollout_tokens"]


def test_tiny_config_through_the_cli(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ttrl", "train", "--config", str(TINY), "--output-dir", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in TRAIN_KEYS:
        assert all(key in r for r in train_rows), key
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert {r["step"] for r in evals} == {0, 3}
    assert any("eval/heldout/avg@4" in r for r in evals)
    assert "base avg@4" in proc.stdout
    assert (out / "model" / "config.json").is_file()
    # A second run into the same directory is refused, not silently overwritten.
    again = subprocess.run([sys.executable, "-m", "ttrl", "train", "--config", str(TINY), "--output-dir", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_batch_order_covers_each_prompt_once_per_epoch():
    steps = [batch_order(10, 5, s, seed=3) for s in range(4)]
    assert sorted(steps[0] + steps[1]) == list(range(10))
    assert sorted(steps[2] + steps[3]) == list(range(10))
    assert steps[0] + steps[1] != steps[2] + steps[3]  # reshuffled each epoch


def test_a_step_spanning_two_passes_holds_each_prompt_once():
    """30 prompts, 8 a step (AIME with the paper's batch): steps straddle passes, yet none repeats a
    prompt, and over any number of steps the prompts are trained on equally often, give or take one
    or two."""
    from collections import Counter

    seen = Counter()
    for s in range(240):
        batch = batch_order(30, 8, s, seed=0)
        assert len(set(batch)) == 8, (s, batch)
        seen.update(batch)
        assert max(seen.values()) - min(seen[i] for i in range(30)) <= 2, s
    assert batch_order(10, 8, 1, seed=0) == batch_order(10, 8, 1, seed=0)  # a pure function of the step


def _arithmetic_file(path: Path, gold: str) -> Path:
    rows = [{"id": f"{a}+{b}", "problem": f"What is {a} + {b}?", "answer": str(a + b)}
            for a, b in [(3, 4), (5, 2), (1, 1), (6, 2)]]
    answers = [r["answer"] for r in rows]
    if gold == "shuffled":
        random.Random(0).shuffle(answers)
        answers = answers[1:] + answers[:1]
    for r, a in zip(rows, answers):
        if gold == "removed":
            del r["answer"]
        else:
            r["answer"] = a
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# A watch this touchy fires on the real SmolLM2 at lr 1e-4 within four steps: the guard then rolls back.
TOUCHY_WATCH = ["train.stop_window=2", "train.collapse_ratio=0.3", "train.collapse_drift=0.01", "algorithm.lr=1e-4"]


def test_gold_answers_never_reach_training_nor_the_guard(tmp_path):
    """Real SmolLM2 (so votes and rewards are non-trivial): training with the gold answers
    shuffled or removed gives bit-identical parameters, training rewards, and step handed back by
    the guard (here one that rolls back: gold cannot move its pick either)."""
    from safetensors.torch import load_file

    params, rewards, picked = {}, {}, {}
    for gold in ("true", "shuffled", "removed"):
        data = _arithmetic_file(tmp_path / f"{gold}.jsonl", gold)
        cfg = load_config(TINY, ["model.architecture={}", f"data.train={data}", "data.holdout=0",
                                 "train.steps=4", "train.prompts_per_step=2", "rollout.max_new_tokens=5",
                                 "eval.before=false", "eval.n_samples=1", "eval.greedy=false", "algorithm.kl_coef=0",
                                 *TOUCHY_WATCH])
        summary = train(cfg, tmp_path / gold, quiet=True)
        rows = [json.loads(l) for l in (tmp_path / gold / "metrics.jsonl").read_text().splitlines()]
        rewards[gold] = [(r["train/reward"], r["loss/policy"]) for r in rows if "train/reward" in r]
        params[gold] = load_file(tmp_path / gold / "model" / "model.safetensors")
        picked[gold] = summary["model"]
    assert any(r != 0 for r, _ in rewards["true"]), "test needs a non-zero reward to be meaningful"
    assert picked["true"]["rolled_back"], "test needs the guard to act to be meaningful"
    assert rewards["true"] == rewards["shuffled"] == rewards["removed"]
    assert picked["true"] == picked["shuffled"] == picked["removed"]
    for name, tensor in params["true"].items():
        assert torch.equal(tensor, params["shuffled"][name]) and torch.equal(tensor, params["removed"][name]), name


def test_guard_hands_back_the_checkpoint_before_the_collapse_and_says_so(tmp_path):
    """The collapse watch fires at step s: training ends there, and the evaluated, exported model is
    the checkpoint of step s - stop_window (kept for it: none was asked for), named in summary.json,
    the console and the report."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = _run_cli("train", "--config", TINY, "--output-dir", out, "model.architecture={}", "train.steps=12",
                    "train.prompts_per_step=2", "rollout.max_new_tokens=5", "eval.n_samples=1", "eval.greedy=false",
                    *TOUCHY_WATCH)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    fired, kept = summary["model"]["collapse_step"], summary["model"]["step"]
    assert summary["model"]["rolled_back"] and summary["steps"] == fired < 12
    assert kept == (fired - 2) // 2 * 2  # the newest checkpoint (every stop_window steps) at or before s - 2
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "train/reward" in r] == list(range(1, fired + 1))
    last = next(r for r in steps if "train/reward" in r and r["step"] == fired)
    assert last["stop_reason"] == last["collapse_warning"]
    exported = load_file(out / "model" / "model.safetensors")
    saved = load_file(out / "checkpoints" / f"step-{kept:08d}" / "weights.safetensors")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert f"model/: step {kept}'s weights" in proc.stdout and "rolled back" in proc.stdout
    assert f"Model handed back: step {kept}'s." in (out / "report.md").read_text()


def test_resume_names_changed_settings_and_refuses_another_model(tmp_path, tiny, capsys):
    from ttrl.checkpoint import CheckpointError, save_checkpoint
    from ttrl.trainer import resumed_state

    model, _ = tiny
    constant = ["algorithm.lr_schedule=constant"]  # (a cosine schedule warns of its own when train.steps changes)
    cfg = load_config(TINY, constant)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert resumed_state(tmp_path, cfg, model, opt, sched) is None
    assert "no checkpoint" in capsys.readouterr().err
    save_checkpoint(tmp_path, 2, model, opt, sched, state={"config": cfg.to_dict(), "evals": {}})
    changed = load_config(TINY, ["algorithm.lr=0.5", "train.steps=9", *constant])
    assert resumed_state(tmp_path, changed, model, opt, sched)["step"] == 2
    err = capsys.readouterr().err
    assert "algorithm.lr 0.0001 -> 0.5" in err and "train.steps" not in err
    other = load_config(TINY, ["model.lora_rank=4"])
    with pytest.raises(CheckpointError, match="model.lora_rank"):
        resumed_state(tmp_path, other, model, opt, sched)


def _run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ttrl", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_holdout_prompts_never_reach_training_and_sets_are_labelled(tmp_path):
    out = tmp_path / "run"
    proc = _run_cli("train", "--config", TINY, "--output-dir", out, "--quiet", "--holdout", "0.25",
                    "data.arithmetic.n=16", "train.steps=4", "data.eval=[aime2024]", "data.limit=16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    held = {e["id"] for e in summary["evals"]["heldout"][0]["examples"]}
    assert summary["evals"]["heldout"][0]["n_prompts"] == 4 and held
    seen = {json.loads(line)["prompt_id"] for line in (out / "rollouts.jsonl").read_text().splitlines()}
    assert seen and not seen & held
    assert len(seen) == 12  # 4 steps x 4 prompts = every adaptation prompt once (12 of 16)
    html = (out / "report.html").read_text()
    assert "adapt (trained on, transductive)" in html and "heldout (never trained on)" in html
    assert "aime2024 (cross-task, never trained on)" in html


def test_base_model_baseline_equals_a_separate_eval(tmp_path):
    out = tmp_path / "run"
    common = ["data.holdout=0", "eval.n_samples=4"]
    proc = _run_cli("train", "--config", TINY, "--output-dir", out, "--quiet", "--no-report", "train.steps=1", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    base = json.loads((out / "summary.json").read_text())["evals"]["adapt"][0]
    ev = _run_cli("eval", "--config", TINY, "--json", tmp_path / "eval.json", *common)
    assert ev.returncode == 0, ev.stderr[-2000:]
    separate = json.loads((tmp_path / "eval.json").read_text())["sets"]["adapt"]
    for key in ("avg@4", "maj@4", "pass@4", "majority_ratio", "mean_length"):
        assert separate[key] == base[key], key
    assert [p["histogram"] for p in separate["problems"][:8]] == [e["histogram"] for e in base["examples"]]


def test_stopping_rule_ends_the_run_and_says_why(tmp_path):
    cfg = load_config(TINY, ["train.steps=6", "train.stop_on=entropy", "train.entropy_floor=100",
                             "eval.before=false"])
    summary = train(cfg, tmp_path / "run", quiet=True)
    assert summary["steps"] == 1 and "below the floor" in summary["stopped_early"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/reward" in r] == [1]
    assert "stop_reason" in rows[0] or any("stop_reason" in r for r in rows)


def test_samples_cut_off_by_the_token_limit_neither_vote_nor_earn_reward():
    # The collapse this guards against: "To add 8 + 1," (cut off) ends on 1, and three such
    # samples would outvote the two complete answers.
    from ttrl.config import Config
    from ttrl.rollout import Rollout
    from ttrl.groups import reward, vote

    texts = ["9", "9", "To add 8 + 1,", "To add 8 + 1,", "To add 8 + 1,"]
    truncated = [False, False, True, True, True]
    z = [torch.zeros(3) for _ in texts]
    rollout = Rollout(n=5, prompt_ids=[[1]], completion_ids=[[1, 2, 3]] * 5, logprobs=z, entropy=z, certainty=z,
                      texts=texts, truncated=truncated)
    cfg = Config()
    cfg.reward.n_train_samples = 5
    (group,) = reward(vote(rollout), rollout, cfg.reward, seeds=[0])
    assert group.vote.pseudo_label == "9" and group.answers == ["9", "9", None, None, None]
    assert [group.rewards[group.train_idx.index(i)] for i in range(5)] == [1.0, 1.0, 0.0, 0.0, 0.0]


def _one_step(cfg, n_prompts=2):
    """A fresh tiny model, its optimizer and one step's rollout, votes, rewards and advantages."""
    from ttrl.config import ModelConfig
    from ttrl.groups import reward, vote
    from ttrl.data import encode_prompts
    from ttrl.models import load_model
    from ttrl.rollout import Sampling, generate
    from ttrl.step import estimate_advantages
    from ttrl.train_batch import TrainBatch
    from ttrl.update import Policy

    model, tok = load_model(ModelConfig(architecture=cfg.model.architecture), seed=0)
    prompts = encode_prompts(tok, ["What is 2 + 3?", "Add 7 and 8.", "Hi"][:n_prompts])
    rollout = generate(model, tok, prompts, Sampling.of(cfg.rollout, n=cfg.rollout.n_votes), seeds=[5, 6, 7][:n_prompts])
    groups = reward(vote(rollout), rollout, cfg.reward, seeds=[5, 6, 7][:n_prompts])
    # Plain SGD: the weights move by the gradient itself (Adam's first step is ~lr * sign(grad), which
    # turns float noise in near-zero gradients into lr-sized differences).
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.algorithm.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    policy = Policy(model=model, optimizer=opt, scheduler=sched, ref_model=None, pad_id=tok.pad_token_id)
    batch = TrainBatch.of(rollout, groups, cfg.rollout.temperature)
    if cfg.algorithm.advantage != "ppo":  # its advantages need a critic: _ppo_step
        batch = batch.with_advantages(estimate_advantages(cfg.algorithm.advantage, batch))
    return policy, rollout, groups, batch


STEP = ["reward.kind=similarity", "rollout.n_votes=4", "reward.n_train_samples=4", "rollout.max_new_tokens=6",
        "algorithm.lr=1.0", "algorithm.max_grad_norm=1e9"]


def test_splitting_groups_over_micro_batches_leaves_the_update_unchanged():
    """Whole groups in one micro-batch vs pieces of at most 3 sequences / 20 tokens: one gradient."""
    from ttrl.update import update

    weights, stats = [], []
    for extra in (["algorithm.micro_batch_size=16"], ["algorithm.micro_batch_size=3", "algorithm.micro_batch_tokens=20"]):
        cfg = load_config(TINY, STEP + extra)
        policy, _, _, batch = _one_step(cfg)
        assert any(float(a.abs().sum()) > 0 for a in batch.advantages), "the test needs a learning signal"
        stats.append(update(policy, batch, cfg.algorithm))
        weights.append(torch.cat([p.detach().flatten() for p in policy.model.parameters()]))
    assert stats[0]["optim/grad_norm"] == pytest.approx(stats[1]["optim/grad_norm"], rel=1e-5)
    assert stats[0]["loss/policy"] == pytest.approx(stats[1]["loss/policy"], abs=1e-6)  # ~0 on-policy
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_one_prompt_per_optimizer_step_equals_single_prompt_updates():
    """algorithm.mini_batch_prompts=1: one update over two prompts = two updates of one prompt each."""
    from ttrl.train_batch import TrainBatch
    from ttrl.update import update

    cfg = load_config(TINY, STEP + ["algorithm.mini_batch_prompts=1"])
    policy, _, _, batch = _one_step(cfg)
    stats = update(policy, batch, cfg.algorithm)
    assert stats["optim/steps"] == 2
    together = torch.cat([p.detach().flatten() for p in policy.model.parameters()])

    cfg = load_config(TINY, STEP)
    policy, _, _, batch = _one_step(cfg)
    for p in range(2):
        part = TrainBatch(prompt_ids=[batch.prompt_ids[p]], completion_ids=[batch.completion_ids[p]],
                          old_logprobs=[batch.old_logprobs[p]], rewards=[batch.rewards[p]],
                          temperature=batch.temperature, advantages=[batch.advantages[p]])
        update(policy, part, cfg.algorithm)
    apart = torch.cat([p.detach().flatten() for p in policy.model.parameters()])
    initial = torch.cat([p.detach().flatten() for p in _one_step(cfg)[0].model.parameters()])
    assert not torch.allclose(together, initial, atol=1e-6)
    assert torch.allclose(together, apart, atol=1e-6)


def test_optimizer_steps_count_the_steps_taken_and_the_schedule_moves_on_an_empty_step():
    """optim/steps counts optimizer steps actually taken (a skipped prompt's mini-batch takes none),
    optim/grad_norm is their mean, and a step with every prompt skipped still advances the schedule."""
    from dataclasses import replace

    from ttrl.step import estimate_advantages
    from ttrl.train_batch import TrainBatch
    from ttrl.update import update

    cfg = load_config(TINY, STEP + ["algorithm.mini_batch_prompts=1"])
    policy, rollout, groups, _ = _one_step(cfg, n_prompts=3)
    groups[1] = replace(groups[1], excluded=True)  # as by reward.min_majority_ratio
    batch = TrainBatch.of(rollout, groups, cfg.rollout.temperature)
    assert batch.kept == [0, 2] and batch.completion_ids[1] == [] and batch.rewards[1] == []
    stats = update(policy, batch.with_advantages(estimate_advantages("grpo", batch)), cfg.algorithm)
    assert stats["optim/steps"] == 2 and stats["train/updated"] == 2
    assert all(p.grad is None for p in policy.model.parameters())  # no gradient outlives the update

    policy.scheduler = torch.optim.lr_scheduler.LambdaLR(policy.optimizer, lambda s: 1.0 / (s + 1))
    none = TrainBatch.of(rollout, [replace(g, excluded=True) for g in groups], cfg.rollout.temperature)
    stats = update(policy, none.with_advantages(estimate_advantages("grpo", none)), cfg.algorithm)
    assert stats["optim/steps"] == 0 and stats["optim/lr"] == cfg.algorithm.lr
    assert policy.scheduler.last_epoch == 1 and policy.optimizer.param_groups[0]["lr"] == cfg.algorithm.lr / 2


def test_reward_metrics_leave_out_skipped_prompts_and_reward_accuracy_needs_0_1_rewards():
    from dataclasses import replace

    from ttrl.groups import diagnostics
    from ttrl.step import rollout_metrics

    cfg = load_config(TINY, STEP)
    _, rollout, groups, _ = _one_step(cfg)
    kept = replace(groups[0], rewards=[1.0] * 4, excluded=False)
    skipped = replace(groups[1], rewards=[0.0] * 4, excluded=True)
    assert rollout_metrics(rollout, [kept, skipped], 1.0)["train/reward"] == 1.0
    gold = kept.vote.pseudo_label or "7"
    binary, graded = diagnostics([kept, skipped], [gold, gold]), diagnostics([kept, skipped], [gold, gold], False)
    right = [float(kept.answers[i] is not None and kept.answers[i] == gold) == 1.0 for i in kept.train_idx]
    assert binary["train/reward_accuracy"] == pytest.approx(sum(right) / len(right))  # kept prompt's samples only
    assert graded["train/reward_accuracy"] is None and graded["train/label_accuracy"] == binary["train/label_accuracy"]


def test_policy_loss_is_reported_apart_from_the_kl_term():
    from ttrl.config import ModelConfig
    from ttrl.models import load_model
    from ttrl.update import update

    cfg = load_config(TINY, STEP + ["algorithm.kl_coef=0.5", "algorithm.ppo_epochs=3"])
    policy, _, _, batch = _one_step(cfg)
    policy.ref_model, _ = load_model(ModelConfig(architecture=cfg.model.architecture), seed=0)
    policy.ref_model.requires_grad_(False)
    stats = update(policy, batch, cfg.algorithm)
    assert stats["loss/kl"] > 0  # the 2nd and 3rd passes run on updated weights
    assert stats["loss/total"] == pytest.approx(stats["loss/policy"] + 0.5 * stats["loss/kl"], rel=1e-4, abs=1e-9)
    assert stats["loss/total"] != pytest.approx(stats["loss/policy"], rel=1e-6, abs=1e-12)


def test_resuming_a_finished_run_with_fewer_steps_says_so_and_logs_at_the_real_step(tmp_path, capsys):
    quick = ["train.prompts_per_step=2", "rollout.n_votes=2", "reward.n_train_samples=2", "rollout.max_new_tokens=2",
             "eval.before=false", "eval.n_samples=1", "eval.greedy=false", "data.arithmetic.n=4", "data.holdout=0"]
    train(load_config(TINY, quick + ["train.steps=3"]), tmp_path, quiet=True)
    capsys.readouterr()
    summary = train(load_config(TINY, quick + ["train.steps=1"]), tmp_path, quiet=True, resume=True)
    err = capsys.readouterr().err
    assert "the checkpoint is at step 3, past train.steps=1" in err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/adapt/avg@1" in r] == [3]  # redone at step 3, not logged as step 1
    assert [r["step"] for r in rows if "train/reward" in r] == [1, 2, 3] and summary["steps"] == 3
# --- PPO: the critic beside the policy ------------------------------------------------------------

def _with_critic(policy, cfg, head_seed=1):
    """Give `policy` a tiny critic (head drawn at random, so values and backbone gradients are not 0)
    and return the step's values for `_one_step`'s rollout."""
    from ttrl.config import ModelConfig
    from ttrl.critic import load_critic
    from ttrl.update import Critic

    model = load_critic(ModelConfig(architecture=cfg.model.architecture), seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(head_seed)
        torch.nn.init.normal_(model.head.weight, std=0.3)
    policy.critic = Critic(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.algorithm.critic_lr))


def _ppo_step(cfg):
    from ttrl.critic import critic_values
    from ttrl.distributed import Dist
    from ttrl.step import estimate_advantages

    policy, _, _, batch = _one_step(cfg)
    _with_critic(policy, cfg)
    values = critic_values(policy.critic.model, batch, cfg.algorithm, policy.pad_id, Dist())
    return policy, batch.with_advantages(estimate_advantages("ppo", batch, values), values)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_ppo_advantages_are_per_token_and_micro_batches_leave_the_update_unchanged():
    """Token-level advantages cut to each micro-batch's width: pieces of at most 3 sequences / 20
    tokens give the policy and the critic the gradient of whole groups in one micro-batch."""
    from ttrl.update import update

    out = []
    for extra in (["algorithm.micro_batch_size=16"], ["algorithm.micro_batch_size=3", "algorithm.micro_batch_tokens=20"]):
        cfg = load_config(TINY, STEP + ["algorithm.advantage=ppo", "algorithm.critic_lr=1.0"] + extra)
        policy, batch = _ppo_step(cfg)
        adv, values = batch.advantages, batch.values
        m, t = len(batch.completion_ids[0]), values.mask.shape[1]
        assert [tuple(a.shape) for a in adv] == [(m, t), (m, t)]
        assert float(values.values.abs().sum()) > 0 and float(adv[0].std()) > 0  # per token, not per answer
        stats = update(policy, batch, cfg.algorithm)
        out.append((stats, _flat(policy.model), _flat(policy.critic.model)))
    (a, pa, ca), (b, pb, cb) = out
    for key in ("optim/grad_norm", "critic/grad_norm", "loss/value"):
        assert a[key] > 0 and a[key] == pytest.approx(b[key], rel=1e-5), key
    assert torch.allclose(pa, pb, atol=1e-6) and torch.allclose(ca, cb, atol=1e-6)


def test_ppo_critic_loss_does_not_reach_the_policy():
    """One backward of policy loss + value loss: the policy moves exactly as with the same
    advantages and no critic, and the critic moves by its own loss."""
    from dataclasses import replace

    from ttrl.update import update

    cfg = load_config(TINY, STEP + ["algorithm.advantage=ppo", "algorithm.critic_lr=1.0"])
    policy, batch = _ppo_step(cfg)
    critic_before = _flat(policy.critic.model)
    stats = update(policy, batch, cfg.algorithm)
    assert not torch.allclose(_flat(policy.critic.model), critic_before)
    assert stats["critic/values"] == pytest.approx(float(batch.values.values.sum() / batch.values.mask.sum()))
    with_critic = _flat(policy.model)

    policy, fresh = _ppo_step(cfg)
    policy.critic = None
    update(policy, replace(fresh, advantages=batch.advantages, values=None), cfg.algorithm)
    assert torch.equal(with_critic, _flat(policy.model))


@pytest.mark.parametrize("lora", [0, pytest.param(4, marks=pytest.mark.slow)])
def test_ppo_end_to_end_on_tiny_with_the_critic_in_the_checkpoint(tmp_path, lora):
    from safetensors.torch import load_file

    run = tmp_path / f"lora-{lora}"
    cfg = load_config(TINY, ["algorithm.advantage=ppo", "reward.kind=similarity", "algorithm.critic_lr=1e-3",
                             f"model.lora_rank={lora}", "eval.n_samples=1", "eval.greedy=false"])
    train(cfg, run, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("loss/value", "critic/values", "critic/vf_clipfrac", "critic/explained_variance",
                "critic/returns", "critic/grad_norm"):
        assert all(key in r for r in steps), key
    assert steps[0]["critic/values"] == 0.0 and steps[-1]["critic/values"] != 0.0  # the critic learnt
    assert all(r["loss/value"] > 0 and r["critic/grad_norm"] > 0 for r in steps)
    (last,) = sorted((run / "checkpoints").iterdir())[-1:]
    assert "critic.safetensors" in (last / "SHA256SUMS").read_text()
    critic = load_file(last / "critic.safetensors")
    assert {"head.weight", "head.bias"} <= set(critic)
    if lora:
        assert all(k.startswith("head.") or "lora_" in k for k in critic), sorted(critic)[:4]
    else:
        assert any(k.startswith("backbone.layers.") for k in critic)


def test_ppo_with_fp16_loss_scaling_is_a_config_error_before_any_model_loads():
    from types import SimpleNamespace

    from ttrl.config import ConfigError
    from ttrl.distributed import Dist
    from ttrl.trainer import check_critic_engine

    fp16 = Dist()
    fp16.accelerator = SimpleNamespace(mixed_precision="fp16")  # what `accelerate launch --mixed_precision fp16` sets
    check_critic_engine(load_config(TINY), fp16)  # GRPO: fine
    check_critic_engine(load_config(TINY, ["algorithm.advantage=ppo"]), Dist())  # one process: fine
    with pytest.raises(ConfigError, match="algorithm.advantage.*fp16") as e:
        check_critic_engine(load_config(TINY, ["algorithm.advantage=ppo"]), fp16)
    assert e.value.key == "algorithm.advantage"
def _subset(rollout, keep: list[list[int]]):
    """The rollout with only the samples `keep[p]` (positions within prompt p's group) of each prompt."""
    from ttrl.rollout import Rollout

    rows = [rollout.group(p)[j] for p, js in enumerate(keep) for j in js]
    pick = lambda name: [getattr(rollout, name)[i] for i in rows]  # noqa: E731
    return Rollout(n=rollout.n, prompt_ids=rollout.prompt_ids, completion_ids=pick("completion_ids"),
                   logprobs=pick("logprobs"), entropy=pick("entropy"), certainty=pick("certainty"),
                   texts=pick("texts"), truncated=pick("truncated"), sizes=[len(js) for js in keep])


def test_prompts_with_fewer_votes_vote_reward_and_train_on_their_own_samples():
    """Sequential voting leaves prompts with different numbers of samples: votes, rewards, the update
    and the step's concatenation must index each prompt's own samples."""
    from dataclasses import replace

    from ttrl.groups import reward, vote
    from ttrl.step import estimate_advantages
    from ttrl.train_batch import TrainBatch
    from ttrl.update import update

    cfg = load_config(TINY, STEP + ["reward.n_train_samples=2"])
    weights = []
    for keep in ([[0, 1, 2, 3], [0, 1, 2, 3]], [[0, 1], [0, 1, 2, 3]]):  # N = 4 each, or prompt 0 stopped at 2
        policy, rollout, _, _ = _one_step(cfg)
        rollout = _subset(rollout, keep)
        groups = vote(rollout)
        assert [len(g.answers) for g in groups] == [len(k) for k in keep]
        drawn = reward(groups, rollout, cfg.reward, seeds=[5, 6])
        assert all(set(g.train_idx) <= set(range(len(k))) and len(g.train_idx) == 2 for g, k in zip(drawn, keep))
        fixed = [replace(groups[0], train_idx=[1, 0], rewards=[1.0, 0.0]),  # samples both sides have
                 replace(groups[1], train_idx=[3, 1], rewards=[0.0, 1.0])]
        batch = TrainBatch.of(rollout, fixed, cfg.rollout.temperature)
        update(policy, batch.with_advantages(estimate_advantages("grpo", batch)), cfg.algorithm)
        weights.append(torch.cat([p.detach().flatten() for p in policy.model.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6)  # the same trained samples, wherever they sit


def test_the_reward_stage_hands_each_kind_its_settings():
    from ttrl.config import Config
    from ttrl.groups import reward, vote
    from ttrl.rollout import Rollout

    texts = ["4", "4", "4", "5"]
    z = [torch.full((2,), float(i)) for i in range(4)]  # mean entropy 0, 1, 2, 3: "5" is the least sure
    rollout = Rollout(n=4, prompt_ids=[[1]], completion_ids=[[1, 2]] * 4, logprobs=z, entropy=z, certainty=z,
                      texts=texts, truncated=[False] * 4)
    cfg = Config()
    cfg.reward.n_train_samples = 4
    for settings, expected in [({"kind": "penalized_majority", "penalty": 0.25}, -0.25),
                               ({"kind": "penalized_majority", "penalty_min_ratio": 0.8}, 0.0),
                               ({"kind": "soft_majority", "label_temperature": 1.0}, 0.25)]:
        cfg.reward.__dict__.update(settings)
        (group,) = reward(vote(rollout), rollout, cfg.reward, seeds=[0])
        assert group.rewards[group.train_idx.index(3)] == pytest.approx(expected), settings


def test_sequential_voting_through_the_loop_logs_the_votes_drawn(tmp_path):
    cfg = load_config(TINY, ["train.steps=2", "eval.before=false", "rollout.vote_round=4",
                             "rollout.vote_confidence=0.9"])
    train(cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    for row in (r for r in rows if "train/reward" in r):
        votes = [x["n_votes"] for x in logged if x["step"] == row["step"]]
        assert row["train/votes_drawn"] == sum(votes) / len(votes) and all(4 <= v <= 8 for v in votes)
        assert row["perf/rollout_tokens"] > 0


def test_contrastive_labels_through_the_loop_are_logged_with_their_diversity(tmp_path):
    cfg = load_config(TINY, ["train.steps=2", "eval.before=false", "reward.contrast=true"])
    train(cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/reward" in r]
    assert len(steps) == 2
    for row in steps:
        labels = [x["pseudo_label"] for x in logged if x["step"] == row["step"]]
        assert row["train/distinct_labels"] == len(set(labels) - {None}) / len(labels)
        for x in (x for x in logged if x["step"] == row["step"] and x["pseudo_label"] is None):
            assert x["majority_ratio"] == 0.0 and set(x["rewards"]) <= {0.0}  # no label: nothing rewarded


QUICK = ["train.prompts_per_step=2", "rollout.n_votes=2", "reward.n_train_samples=2", "rollout.max_new_tokens=2",
         "eval.n_samples=1", "eval.max_new_tokens=2", "eval.before=false", "data.arithmetic.n=4"]


def test_sigterm_while_a_checkpoint_is_written_stops_on_that_checkpoint(tmp_path, monkeypatch):
    """Not one whole step later: a preemption's grace period need only cover the write."""
    import os
    import signal

    import ttrl.trainer
    from ttrl.trainer import TrainingStopped

    save = ttrl.trainer.save_checkpoint

    def signalled(run_dir, step, *args, **kwargs):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(ttrl.trainer, "save_checkpoint", signalled)
    cfg = load_config(TINY, [*QUICK, "train.steps=3", "train.save_every=1"])
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 1 of 3") as e:
        train(cfg, tmp_path / "run", quiet=True)
    assert e.value.checkpoint.name == "step-00000001" and e.value.exit_code == 128 + signal.SIGTERM


def test_sigterm_while_the_model_is_saved_waits_for_it_and_says_so(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import ttrl.trainer

    export, got = ttrl.trainer.export_model, []

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return export(*args, **kwargs)

    monkeypatch.setattr(ttrl.trainer, "export_model", signalled)
    previous = signal.signal(signal.SIGTERM, lambda *a: got.append(a))  # what would otherwise end the process
    try:
        train(load_config(TINY, [*QUICK, "train.steps=1"]), tmp_path / "run", quiet=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not got and (tmp_path / "run" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "summary.json").is_file()
    assert "SIGTERM arrived while the trained model was being saved" in capsys.readouterr().err

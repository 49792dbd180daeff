"""The TTRL loop, top to bottom: prompts -> samples -> votes -> rewards -> advantages -> update
-> metrics. Gold answers enter only `diagnostics()` and evaluation, after the update is done.
Checkpoints (ttrl.checkpoint) let a killed run resume exactly where it stopped."""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ttrl.advantages import compute_advantages
from ttrl.checkpoint import CHECKPOINTS, CheckpointError, StopSignals, load_checkpoint, save_checkpoint
from ttrl.config import Config
from ttrl.data import Problem, drop_too_long, load_problems, render_prompt, split_holdout
from ttrl.distributed import Dist, concat_rollouts, is_main_process, make_accelerator, micro_batches, zero_loss
from ttrl.evaluation import evaluate
from ttrl.grading import is_equivalent, sample_answers
from ttrl.losses import kl_k3, policy_loss
from ttrl.metrics import MetricsWriter, progress_bar, read_metrics, truncate_metrics
from ttrl.models import encode_prompts, load_model, set_gradient_checkpointing
from ttrl.rewards import label_free_rewards
from ttrl.rollout import Rollout, Sampling, generate, score
from ttrl.stopping import stop_reason
from ttrl.voting import Vote, majority_vote
from ttrl.vllm_rollout import VLLMRollout


@dataclass
class Group:
    """One prompt's votes and the M samples chosen for training, with their rewards."""
    vote: Vote
    answers: list[str | None]
    train_idx: list[int]
    """Indices (within the group) of the M samples that are rewarded and trained on."""
    rewards: list[float]
    skipped: bool


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prompt_seed(seed: int, step: int, index: int) -> int:
    """The random stream of one prompt at one step: a prompt's samples and its choice of M
    trained samples are the same whichever batch, chunk or rank it lands in."""
    return (seed * 1_000_003 + step) * 1_000_033 + index


def vote_and_reward(rollout: Rollout, cfg: Config, seeds: list[int]) -> list[Group]:
    """Majority vote over each prompt's N samples; reward M of them drawn at random."""
    answers = sample_answers(rollout.texts, rollout.truncated)
    groups = []
    for p in range(len(rollout.prompt_ids)):
        idx = list(rollout.group(p))
        vote = majority_vote([answers[i] for i in idx])
        pick = torch.Generator().manual_seed(seeds[p] + 1)  # not the sampling stream itself
        chosen = torch.randperm(rollout.n, generator=pick)[: cfg.reward.n_train_samples].tolist()
        rewards = label_free_rewards(cfg.reward.kind, vote, [rollout.texts[i] for i in idx],
                                     [float(rollout.entropy[i].mean()) for i in idx],
                                     [float(rollout.certainty[i].mean()) for i in idx], chosen)
        groups.append(Group(vote=vote, answers=[answers[i] for i in idx], train_idx=chosen,
                            rewards=list(rewards), skipped=vote.majority_ratio < cfg.reward.min_majority_ratio))
    return groups


def update(model, ref_model, rollout: Rollout, groups: list[Group], cfg: Config, optimizer, scheduler,
           pad_id: int, dist: Dist | None = None) -> dict:
    """Advantages from rewards, then clipped policy-gradient steps on the trained samples.

    `rollout` and `groups` hold the whole step (every rank's prompts), so batch statistics and
    the token count are global; this rank trains on its share of the prompts (`dist.share`)."""
    dist = dist or Dist()
    algo = cfg.algorithm
    kept = [(p, g) for p, g in enumerate(groups) if not g.skipped]
    if not kept:
        return {"loss/policy": 0.0, "train/updated": 0}
    n_kept, m = len(kept), cfg.reward.n_train_samples
    adv = compute_advantages(algo.advantage, torch.tensor([g.rewards for _, g in kept]))  # [kept, M]
    n_tokens = float(sum(len(rollout.completion_ids[p * rollout.n + i]) for p, g in kept for i in g.train_idx))
    per_mb = max(1, algo.micro_batch_size // m)  # whole groups per micro-batch: each prompt runs once
    n_mb = micro_batches([p for p, _ in kept], len(groups), per_mb, dist.world)
    share = dist.share(len(groups))
    mine = [j for j, (p, _) in enumerate(kept) if p in share]
    adv, kept = adv[mine].flatten(), [kept[j] for j in mine]
    samples = [p * rollout.n + i for p, g in kept for i in g.train_idx]
    prompts = [rollout.prompt_ids[p] for p, _ in kept]
    completions = [rollout.completion_ids[i] for i in samples]
    old = (torch.nn.utils.rnn.pad_sequence([rollout.logprobs[i] for i in samples], batch_first=True) if samples
           else torch.zeros((0, 0)))
    # The engine averages gradients over ranks; each rank's loss is its share of a global sum.
    scale = float(dist.world)
    params = [p for p in model.parameters() if p.requires_grad]
    totals = {"loss/policy": 0.0, "loss/kl": 0.0, "loss/clipfrac": 0.0, "loss/approx_kl": 0.0}
    grad_norm, skipped_updates = 0.0, 0
    model.train()
    for _ in range(algo.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for j in range(n_mb):
            pg, mb = prompts[j * per_mb:(j + 1) * per_mb], slice(j * per_mb * m, (j + 1) * per_mb * m)
            with dist.accumulating(model, sync=j == n_mb - 1):
                if not pg or not finite:  # out of work (or after a NaN): still join the all-reduce
                    dist.backward(zero_loss(model, pad_id, cfg.rollout.temperature))
                    continue
                logp, mask = score(model, pg, completions[mb], cfg.rollout.temperature, pad_id, group_size=m)
                old_mb = old[mb, : logp.shape[1]].to(logp.device)
                loss, stats = policy_loss(logp, old_mb, adv[mb].to(logp.device), mask, algo.clip_eps, n_tokens)
                if ref_model is not None:
                    with torch.no_grad(), dist.autocast():
                        ref_logp, _ = score(ref_model, pg, completions[mb], cfg.rollout.temperature, pad_id,
                                            group_size=m)
                    kl = (kl_k3(logp, ref_logp) * mask).sum() / n_tokens
                    loss = loss + algo.kl_coef * kl
                    totals["loss/kl"] += float(kl.detach()) / algo.ppo_epochs
                value = float(loss.detach())
                totals["loss/policy"] += value / algo.ppo_epochs
                totals["loss/clipfrac"] += stats["clipfrac"] / algo.ppo_epochs
                totals["loss/approx_kl"] += stats["approx_kl"] / algo.ppo_epochs
                finite = math.isfinite(value)
                if not finite:
                    if dist.world == 1:
                        break
                    dist.backward(zero_loss(model, pad_id, cfg.rollout.temperature))
                    continue
                dist.backward(loss * scale if dist.world > 1 else loss)
        finite = dist.all_true(finite)  # one rank's NaN skips the step on all
        grad_norm = dist.clip_grad_norm_(params, algo.max_grad_norm) if finite else math.nan
        if not math.isfinite(grad_norm):  # a NaN/inf loss or gradient must not reach the weights
            skipped_updates += 1
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.step()
    scheduler.step()
    totals = dict(zip(totals, dist.sum(list(totals.values()))))  # each rank summed its share of the tokens
    return {**totals, "optim/grad_norm": grad_norm, "optim/lr": scheduler.get_last_lr()[0],
            "optim/skipped_updates": skipped_updates, "train/updated": n_kept}


def sample_and_vote(model, tok, prompt_ids: list[list[int]], seeds: list[int], sampling: Sampling, cfg: Config,
                    dist: Dist, vllm: VLLMRollout | None = None) -> tuple[Rollout, list[Group], float]:
    """(rollout, groups, rollout seconds) of a step's prompts. Each rank samples and votes on its
    share of the prompts, all N votes of each, then every rank gets the whole step in order."""
    t0 = time.perf_counter()
    share = dist.share(len(prompt_ids))
    mine, my_seeds = [prompt_ids[k] for k in share], [seeds[k] for k in share]
    if vllm:
        local = vllm.generate(dist.unwrap(model), mine, sampling, my_seeds)
    else:
        with dist.generation(model) as policy:
            local = generate(policy, tok, mine, sampling, seeds=my_seeds)
    seconds = time.perf_counter() - t0
    parts = dist.gather([(local, vote_and_reward(local, cfg, my_seeds))])
    return concat_rollouts([r for r, _ in parts]), [g for _, gs in parts for g in gs], seconds


def diagnostics(groups: list[Group], golds: list[str | None]) -> dict:
    """Gold-based metrics (label accuracy, reward accuracy, rollout accuracy); read-only."""
    if any(g is None for g in golds):
        return {}
    label_ok = [is_equivalent(g.vote.pseudo_label, gold) for g, gold in zip(groups, golds)]
    rollout_ok = [is_equivalent(a, gold) for g, gold in zip(groups, golds) for a in g.answers]
    reward_ok = []
    for g, gold in zip(groups, golds):
        for i, r in zip(g.train_idx, g.rewards):
            reward_ok.append(float(is_equivalent(g.answers[i], gold)) == r)
    return {"train/label_accuracy": float(np.mean(label_ok)),
            "train/reward_accuracy": float(np.mean(reward_ok)) if reward_ok else None,
            "train/rollout_accuracy": float(np.mean(rollout_ok))}


def rollout_metrics(rollout: Rollout, groups: list[Group], seconds: float) -> dict:
    lengths = [len(c) for c in rollout.completion_ids]
    ent = torch.cat(rollout.entropy) if rollout.entropy else torch.zeros(1)
    trained = [r for g in groups for r in g.rewards]
    return {
        "train/reward": float(np.mean(trained)) if trained else 0.0,
        "train/majority_ratio": float(np.mean([g.vote.majority_ratio for g in groups])),
        "train/skipped_prompts": sum(g.skipped for g in groups),
        "train/no_answer": float(np.mean([a is None for g in groups for a in g.answers])),
        "train/entropy": float(ent.mean()),
        "train/response_length": float(np.mean(lengths)),
        "train/truncated": float(np.mean(rollout.truncated)),
        "perf/rollout_seconds": seconds,
        "perf/tokens_per_second": sum(lengths) / max(seconds, 1e-9),
    }


ROLLOUTS_FILE = "rollouts.jsonl"


def log_rollouts(run_dir: Path, step: int, ids: list[str], groups: list[Group], rollout: Rollout,
                 keep: int = 4) -> None:
    """One row per trained prompt: its vote and a few samples, to see what the model did.
    Written from the training path, so it holds no gold answer."""
    with open(run_dir / ROLLOUTS_FILE, "a", encoding="utf-8") as f:
        for p, (pid, g) in enumerate(zip(ids, groups)):
            f.write(json.dumps({"step": step, "prompt_id": pid, "pseudo_label": g.vote.pseudo_label,
                                "majority_ratio": g.vote.majority_ratio, "rewards": g.rewards,
                                "samples": [rollout.texts[i] for i in list(rollout.group(p))[:keep]]}) + "\n")


def truncate_rollouts(run_dir: Path, last_step: int) -> None:
    """On resume, drop rows of steps after the checkpoint (they will be redone)."""
    path = run_dir / ROLLOUTS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):  # a torn last line from a hard kill
            continue
    path.write_text("".join(kept), encoding="utf-8")


def batch_order(n_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Prompt indices for `step` (0-based): epochs of seeded shuffles laid end to end."""
    per_step = min(per_step, n_prompts)
    start = step * per_step
    out = []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n_prompts)
        perm = list(range(n_prompts))
        random.Random(seed * 100003 + epoch).shuffle(perm)
        out.append(perm[offset])
    return out


def total_steps(cfg: Config, n_prompts: int) -> int:
    if cfg.train.steps:
        return cfg.train.steps
    return cfg.train.epochs * math.ceil(n_prompts / min(cfg.train.prompts_per_step, n_prompts))


def run_evals(model, tok, sets: dict[str, list[Problem]], cfg: Config, step: int, writer: MetricsWriter | None,
              store: dict, dist: Dist | None = None) -> None:
    """Evaluate on every set (each rank its share of the problems); rank 0 logs (`writer`)."""
    dist = dist or Dist()
    for name, problems in sets.items():
        if not problems:
            continue
        with dist.generation(model) as policy:
            summary, results = evaluate(policy, tok, problems, cfg.eval, cfg.data.template, cfg.model.chat_template,
                                        seed=cfg.train.seed + 7919, dist=dist, stop=cfg.data.stop)
        if writer is not None:
            writer.log({"step": step, **{f"eval/{name}/{k}": v for k, v in summary.items()}})
        store.setdefault(name, []).append({"step": step, **summary,
                                           "examples": [r.__dict__ for r in results[:8]]})


class TrainingStopped(RuntimeError):
    """The run stopped before the end (a signal, or too many non-finite steps in a row) after
    saving a checkpoint; `exit_code` is what a command line should return."""

    def __init__(self, message: str, checkpoint: Path, exit_code: int):
        super().__init__(message)
        self.checkpoint, self.exit_code = checkpoint, exit_code


def warn(message: str) -> None:
    if not is_main_process():  # every rank would say the same
        return
    print(f"warning: {message}", file=sys.stderr)  # rich's live progress bar redirects stderr above itself


def fit_context(problems: list[Problem], tok, model, cfg: Config, max_new_tokens: int, key: str) -> list[Problem]:
    """Leave out (data.too_long=skip) or fail on prompts that leave no room for `max_new_tokens`
    in the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not context or not problems:
        return problems
    ids = encode_prompts(tok, [render_prompt(p, cfg.data.template) for p in problems], cfg.model.chat_template)
    budget, why = context - max_new_tokens, f"context {context} (max_position_embeddings) - {key} {max_new_tokens}"
    kept, skipped = drop_too_long(problems, [len(x) for x in ids], budget, cfg.data.too_long, why)
    if skipped:
        names = ", ".join(repr(p.id) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warn(f"skipped {len(skipped)} of {len(problems)} prompts longer than {budget} tokens ({why}): {names}; "
             "set data.too_long=fail to stop instead")
    return kept


def resumed_state(run_dir: Path, cfg: Config, model, optimizer, scheduler) -> dict | None:
    """Load the latest checkpoint; settings that differ from the checkpointed run are named
    (model.* ones refused: the weights would not fit)."""
    state = load_checkpoint(run_dir, model, optimizer, scheduler)
    if state is None:
        warn(f"no checkpoint in {run_dir}/{CHECKPOINTS}; starting from step 0")
        return None
    old, new = _flatten(state["config"]), _flatten(cfg.to_dict())
    free = ("train.steps", "train.save_every", "train.keep_checkpoints", "algorithm.max_bad_steps")
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in free]
    if any(k.startswith("model.") for k in changed):
        raise CheckpointError(f"cannot resume {run_dir}: the checkpoint was trained with other model settings "
                              f"({', '.join(k for k in changed if k.startswith('model.'))}); use the original config")
    if changed:
        warn("resuming with changed settings (the run will differ from an uninterrupted one): "
             + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
    if is_main_process():
        print(f"resuming from {state['path']} (step {state['step']})", file=sys.stderr)
    return state


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def train(cfg: Config, run_dir: str | Path, quiet: bool = False, resume: bool = False) -> dict:
    """Run TTRL end to end; returns the summary also written to RUN_DIR/summary.json.
    `resume`: continue from the latest valid checkpoint in RUN_DIR (from step 0 if there is none).
    Under `torchrun` / `accelerate launch` every process runs this; rank 0 writes the files."""
    run_dir = Path(run_dir)
    dist = Dist(make_accelerator())
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    problems = load_problems(cfg.data.train, cfg.data)
    extra = {Path(name).stem: load_problems(name, cfg.data) for name in cfg.data.eval}

    model, tok = load_model(cfg.model, seed=cfg.train.seed, device=dist.device)
    set_gradient_checkpointing(model, cfg.algorithm.gradient_checkpointing, dist.device)
    ref_model = None
    if cfg.algorithm.kl_coef > 0:
        ref_model, _ = load_model(type(cfg.model)(**{**cfg.model.__dict__, "lora_rank": 0}), seed=cfg.train.seed,
                                  device=dist.device)
        ref_model.eval().requires_grad_(False).to(dist.device)
    pad_id = tok.pad_token_id
    problems = fit_context(problems, tok, model, cfg, cfg.rollout.max_new_tokens, "rollout.max_new_tokens")
    adapt, held = split_holdout(problems, cfg.data.holdout, cfg.train.seed)
    dist.check_batch(min(cfg.train.prompts_per_step, len(adapt)))
    eval_sets = {"adapt": adapt, "heldout": held}
    for name, probs in extra.items():
        eval_sets[name] = fit_context(probs, tok, model, cfg, cfg.eval.max_new_tokens, "eval.max_new_tokens")
    prompt_ids = encode_prompts(tok, [render_prompt(p, cfg.data.template) for p in adapt], cfg.model.chat_template)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.algorithm.lr, weight_decay=cfg.algorithm.weight_decay)
    warm = cfg.algorithm.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    # The scheduler stays ours (accelerate's would step once per process); `model` is now the
    # engine's wrapper (DDP, ...): forward/backward through it, sample from `policy`.
    model, optimizer = dist.prepare(model, optimizer)
    policy = dist.unwrap(model)
    vllm = VLLMRollout(cfg, policy, tok, dist) if cfg.rollout.backend == "vllm" else None
    sampling = Sampling(n=cfg.rollout.n_votes, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                        top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens, stop=tuple(cfg.data.stop),
                        max_batch_rows=cfg.rollout.max_batch_rows, memory_fraction=cfg.rollout.memory_fraction)
    steps = total_steps(cfg, len(adapt))

    # Resume: weights, optimizer, RNGs and eval history from the checkpoint (every rank loads it);
    # metrics rows logged after it (and a torn last line) are dropped, so the file reads as if
    # never interrupted.
    state = resumed_state(run_dir, cfg, policy, optimizer, scheduler) if resume else None
    start, evals, bad_steps = (state["step"], state["evals"], state["bad_steps"]) if state else (0, {}, 0)
    writer = None
    if dist.is_main:
        if resume:
            truncate_metrics(run_dir, state["metric_rows"] if state else 0)
            truncate_rollouts(run_dir, start)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        writer = MetricsWriter(run_dir, purge_step=(start + 1 if state else 0) if resume else None)
    history = dist.broadcast([r for r in read_metrics(run_dir) if "train/reward" in r] if dist.is_main else None)
    stopped_reason = None
    if vllm and state:
        vllm.sync(model)

    def checkpoint(done: int) -> Path:
        path = None
        if dist.sharded:  # optimizer state is split across ranks; see docs/distributed.md
            warn(f"step {done}: no checkpoint under FSDP/DeepSpeed (not supported yet)")
        elif dist.is_main:
            path = save_checkpoint(run_dir, done, policy, optimizer, scheduler,
                                   keep=cfg.train.keep_checkpoints,
                                   state={"evals": evals, "bad_steps": bad_steps, "metric_rows": writer.n_rows,
                                          "config": cfg.to_dict()})
        dist.barrier()  # no rank may exit (and so end the job) while rank 0 is still writing
        return path or run_dir / CHECKPOINTS

    try:
        if cfg.eval.before and not state:
            run_evals(model, tok, eval_sets, cfg, 0, writer, evals, dist)
        with StopSignals() as stop, progress_bar(disable=quiet or not dist.is_main) as bar:
            task = bar.add_task("ttrl train", total=steps, completed=start, info="")
            for step in range(start, steps):
                t0 = time.perf_counter()
                batch = batch_order(len(adapt), cfg.train.prompts_per_step, step, cfg.train.seed)
                seeds = [prompt_seed(cfg.train.seed, step, i) for i in batch]
                rollout, groups, t_roll = sample_and_vote(model, tok, [prompt_ids[i] for i in batch], seeds,
                                                          sampling, cfg, dist, vllm)
                stats = update(model, ref_model, rollout, groups, cfg, optimizer, scheduler, pad_id, dist)
                if vllm:
                    vllm.sync(model)
                row = {"step": step + 1, **rollout_metrics(rollout, groups, t_roll), **stats,
                       **diagnostics(groups, [adapt[i].answer for i in batch]),
                       "perf/step_seconds": time.perf_counter() - t0}
                history.append(row)
                stopped_reason = stop_reason(history, cfg.train.stop_on, cfg.train.stop_window,
                                             cfg.train.stop_min_delta, cfg.train.entropy_floor)
                if stopped_reason:
                    row["stop_reason"] = stopped_reason
                if dist.is_main:
                    writer.log(row)
                    log_rollouts(run_dir, step + 1, [adapt[i].id for i in batch], groups, rollout)
                bar.update(task, advance=1, info=f"reward {row['train/reward']:.2f} "
                                                 f"maj {row['train/majority_ratio']:.2f}")
                done = step + 1
                bad_steps = bad_steps + 1 if stats.get("optim/skipped_updates") else 0
                if bad_steps:
                    warn(f"step {done}: NaN/inf loss or gradient; update skipped "
                         f"({bad_steps} in a row, algorithm.max_bad_steps={cfg.algorithm.max_bad_steps})")
                if stopped_reason:
                    if dist.is_main:
                        print(f"stopping early after step {done}: {stopped_reason}", file=sys.stderr)
                    steps = done
                if cfg.eval.every and done % cfg.eval.every == 0 and done < steps:
                    run_evals(model, tok, eval_sets, cfg, done, writer, evals, dist)
                # A signal that lands after this line is handled at the end of the next step; the
                # ranks agree on it (a signal may reach them at different steps).
                failing, stopping = bad_steps >= cfg.algorithm.max_bad_steps, first_signal(stop.received, dist)
                due = done == steps or (cfg.train.save_every and done % cfg.train.save_every == 0)
                if due or failing or stopping:
                    path = checkpoint(done)
                if failing or stopping:
                    dist.close()
                if failing:
                    raise TrainingStopped(
                        f"stopped after step {done}: {bad_steps} steps in a row had a NaN/inf loss or gradient "
                        f"(algorithm.max_bad_steps); their updates were skipped, so {path} holds the last good "
                        "weights. Lower algorithm.lr or algorithm.max_grad_norm, or use model.dtype=float32", path, 1)
                if stopping:
                    raise TrainingStopped(f"stopped by {stopping} after step {done} of {steps}; "
                                          f"checkpoint saved in {path}", path, 128 + signal.Signals[stopping])
                if stopped_reason:
                    break
        run_evals(model, tok, eval_sets, cfg, steps, writer, evals, dist)
    finally:
        if writer is not None:
            writer.close()
    # Under FSDP / ZeRO-3 the full weights are gathered from every rank (a collective).
    weights = dist.accelerator.get_state_dict(model) if dist.sharded else None
    summary = {"steps": steps, "evals": evals, "stopped_early": stopped_reason}
    if dist.is_main:
        policy.save_pretrained(run_dir / "model", state_dict=weights)
        tok.save_pretrained(run_dir / "model")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    dist.close()
    return summary


def first_signal(received: str | None, dist: Dist) -> str | None:
    """The stop signal any rank received (SIGINT/SIGTERM), on every rank, so all stop at the same step."""
    code = dist.max(int(signal.Signals[received]) if received else 0)
    return signal.Signals(code).name if code else None

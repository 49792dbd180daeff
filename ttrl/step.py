"""One TTRL step, top to bottom: prompts -> samples -> votes -> rewards -> advantages -> update.
`step()` is the algorithm in six calls; what surrounds a step (set-up, resume, signals, the
evaluation and checkpoint schedule, logging, export) is ttrl.trainer's. Gold answers enter only
`diagnostics()`, after the update is done."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from ttrl.advantages import CRITIC_ESTIMATORS, compute_advantages, whiten
from ttrl.config import Config
from ttrl.critic import critic_values
from ttrl.data import Problem
from ttrl.distributed import Dist
from ttrl.groups import Group, contrast, diagnostics, reward, vote
from ttrl.rewards import reward_kind
from ttrl.rollout import NonFiniteError, Rollout, Sampler, Sampling
from ttrl.sequential import VoteRounds, sample_in_rounds
from ttrl.train_batch import StepValues, TrainBatch
from ttrl.update import Policy, update


@dataclass
class Learner:
    """What a step reads and changes: the policy being trained and how it samples."""
    policy: Policy
    sampler: Sampler
    sampling: Sampling
    rounds: VoteRounds | None
    """Sequential voting's rounds (None: all N votes at once)."""
    adapt: list[Problem]
    """The prompts adapted on, and their token ids (`prompt_ids`, same order)."""
    prompt_ids: list[list[int]]
    dist: Dist


@dataclass
class StepResult:
    """What the loop logs of a step: its metrics row and, unless its rollout blew up, what was sampled."""
    row: dict
    rollout: Rollout | None = None
    groups: list[Group] | None = None
    prompts: list[Problem] | None = None


def step(learner: Learner, cfg: Config, index: int) -> StepResult:
    """Step `index` (0-based) of TTRL."""
    t0, dist = time.perf_counter(), learner.dist
    order = batch_order(len(learner.adapt), cfg.train.prompts_per_step, index, cfg.train.seed)
    prompts, seeds = [learner.adapt[i] for i in order], [prompt_seed(cfg.train.seed, index, i) for i in order]  # 1
    rollout = sample(learner, [learner.prompt_ids[i] for i in order], seeds, [p.choices for p in prompts])        # 2
    t_rollout = time.perf_counter() - t0
    if rollout is None:
        return StepResult(recover(learner, index + 1))
    mine = dist.share(len(order))
    groups = votes(rollout, [prompts[k].choices for k in mine], cfg, dist, mine)                                 # 3
    groups = reward(groups, rollout, cfg.reward, [seeds[k] for k in mine],                                       # 4
                    learner.rounds.boundaries()[0] if learner.rounds else None)
    rollout, groups = gather_step(rollout, groups, dist)
    batch = advantages(learner.policy, TrainBatch.of(rollout, groups, cfg.rollout.temperature), cfg, dist)       # 5
    stats = update(learner.policy, batch, cfg.algorithm, dist)                                                   # 6
    learner.sampler.sync(learner.policy.model)
    row = {"step": index + 1, **rollout_metrics(rollout, groups, t_rollout), **stats,
           **diagnostics(groups, [p.answer for p in prompts], reward_kind(cfg.reward.kind).binary),
           "perf/step_seconds": time.perf_counter() - t0}
    return StepResult(row, rollout, groups, prompts)


# --- 1 prompts ------------------------------------------------------------------------------------

def prompt_seed(seed: int, step: int, index: int) -> int:
    """The random stream of one prompt at one step: a prompt's samples and its choice of M
    trained samples are the same whichever batch, chunk or rank it lands in."""
    return (seed * 1_000_003 + step) * 1_000_033 + index


def batch_order(n_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Prompt indices for `step` (0-based): the next `per_step` prompts of a stream of seeded
    shuffles, one per pass, laid end to end. A step that spans two passes never holds a prompt
    twice: one the next pass would repeat waits for the following step, first in line."""
    if n_prompts < 1:
        raise ValueError("batch_order needs at least one prompt")
    per_step = min(per_step, n_prompts)
    stream = (i for epoch in itertools.count() for i in shuffled(n_prompts, seed, epoch))
    waiting: list[int] = []
    for _ in range(step + 1):
        batch, held, waiting = [], waiting, []
        for i in itertools.chain(held, stream):
            (waiting if i in batch else batch).append(i)
            if len(batch) == per_step:
                break
    return batch


def shuffled(n_prompts: int, seed: int, epoch: int) -> list[int]:
    """Pass `epoch`'s order of the prompts."""
    perm = list(range(n_prompts))
    random.Random(seed * 100003 + epoch).shuffle(perm)
    return perm


# --- 2 samples ------------------------------------------------------------------------------------

def sample(learner: Learner, prompt_ids: list[list[int]], seeds: list[int], choices: list) -> Rollout | None:
    """Each rank samples the votes of its share of the step's prompts: all N, or with sequential
    voting until each prompt's vote is decided. None on every rank when any rank's model produced
    non-finite logits (its weights have blown up)."""
    dist = learner.dist
    share = dist.share(len(prompt_ids))
    mine = lambda items: [items[k] for k in share]  # noqa: E731
    try:
        if learner.rounds is None:
            rollout = learner.sampler.generate(learner.policy.model, mine(prompt_ids), learner.sampling, mine(seeds))
        else:
            rollout = sample_in_rounds(learner.sampler, learner.policy.model, mine(prompt_ids), learner.sampling,
                                       mine(seeds), learner.rounds, mine(choices) if choices else None,
                                       lockstep=dist.sharded)
    except NonFiniteError:
        rollout = None
    return rollout if dist.all_true(rollout is not None) else None


def recover(learner: Learner, done: int) -> dict:
    """The last optimizer step blew the weights up (no finite logits to sample from): undo it."""
    learner.policy.good.restore()
    learner.sampler.sync(learner.policy.model)
    return {"step": done, "train/nonfinite_logits": 1, "optim/skipped_updates": 1}


# --- 3 votes --------------------------------------------------------------------------------------

def votes(rollout: Rollout, choices: list, cfg: Config, dist: Dist, mine: range) -> list[Group]:
    """This rank's prompts' votes; with reward.contrast each label is elected against every
    prompt of the step (gathered from all ranks)."""
    groups = vote(rollout, choices)
    if cfg.reward.contrast:
        groups = contrast(groups, dist.gather([g.vote for g in groups]), mine)
    return groups


def gather_step(rollout: Rollout, groups: list[Group], dist: Dist) -> tuple[Rollout, list[Group]]:
    """Every rank's rollout and groups, concatenated in prompt order, on every rank: advantages and
    metrics are computed over the whole step, exactly as one process would."""
    parts = dist.gather([(rollout, groups)])
    return Rollout.concat([r for r, _ in parts]), [g for _, gs in parts for g in gs]


# --- 5 advantages ---------------------------------------------------------------------------------

def advantages(policy: Policy, batch: TrainBatch, cfg: Config, dist: Dist) -> TrainBatch:
    """The batch with its advantages: a group estimator's per trained answer, or (PPO) the critic's
    values and their GAE."""
    algo = cfg.algorithm
    values = critic_values(policy.critic.model, batch, algo, policy.pad_id, dist) if policy.critic else None
    return batch.with_advantages(estimate_advantages(algo.advantage, batch, values), values)


def estimate_advantages(estimator: str, batch: TrainBatch, values: StepValues | None = None
                        ) -> list[torch.Tensor | None]:
    """Per prompt, the advantage of each trained answer [M] (the group estimators) or of each of its
    tokens [M, T] (ppo: the GAE of `values`, whitened over the step's tokens as verl does); None for
    a prompt left out. Batch-level estimators (reinforce_pp) see the kept prompts only."""
    if estimator in CRITIC_ESTIMATORS:
        if values is None:
            raise ValueError(f"algorithm.advantage={estimator} needs the critic's values (critic_values)")
        adv = whiten(values.advantages, values.mask) if values.mask.sum() > 0 else values.advantages
        return [None if r is None else adv[r] for r in values.rows]
    kept = [r for r in batch.rewards if r]
    adv = iter(compute_advantages(estimator, torch.tensor(kept)) if kept else [])
    return [next(adv) if r else None for r in batch.rewards]


# --- metrics --------------------------------------------------------------------------------------

def rollout_metrics(rollout: Rollout, groups: list[Group], seconds: float) -> dict:
    lengths = [len(c) for c in rollout.completion_ids]
    ent = torch.cat(rollout.entropy) if rollout.entropy else torch.zeros(1)
    trained = [r for g in groups if not g.excluded for r in g.rewards]
    return {
        "train/reward": float(np.mean(trained)) if trained else 0.0,
        "train/majority_ratio": float(np.mean([g.vote.majority_ratio for g in groups])),
        "train/distinct_labels": len({g.vote.pseudo_label for g in groups} - {None}) / max(len(groups), 1),
        "train/skipped_prompts": sum(g.excluded for g in groups),
        "train/no_answer": float(np.mean([a is None for g in groups for a in g.answers])),
        "train/entropy": float(ent.mean()),
        "train/response_length": float(np.mean(lengths)),
        "train/truncated": float(np.mean(rollout.truncated)),
        "train/votes_drawn": float(np.mean(rollout.group_sizes)),
        "perf/rollout_tokens": sum(lengths),
        "perf/rollout_seconds": seconds,
        "perf/tokens_per_second": sum(lengths) / max(seconds, 1e-9),
    }


def rollout_rows(result: StepResult, keep: int = 4) -> list[dict]:
    """rollouts.jsonl rows of a step: per prompt its vote, rewards and first samples."""
    rollout = result.rollout
    return [{"step": result.row["step"], "prompt_id": problem.id, "pseudo_label": g.vote.pseudo_label,
             "majority_ratio": g.vote.majority_ratio, "n_votes": len(g.answers), "rewards": g.rewards,
             "samples": [rollout.texts[i] for i in list(rollout.group(p))[:keep]]}
            for p, (problem, g) in enumerate(zip(result.prompts, result.groups))]

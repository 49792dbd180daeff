"""A prompt's group of samples through stages 3 and 4 of the loop: the vote over its N answers,
then the M samples drawn for training and their label-free rewards. Gold answers enter only
`diagnostics()`, after the rewards are fixed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ttrl.config import RewardConfig
from ttrl.grading import is_equivalent, sample_answers
from ttrl.rewards import label_free_rewards
from ttrl.rollout import Rollout
from ttrl.voting import Vote, contrastive_vote, majority_vote


@dataclass
class Group:
    """One prompt's vote and the M samples chosen for training, with their rewards."""
    vote: Vote
    answers: list[str | None]
    """The answer extracted from each of the prompt's samples, N of them or fewer when sequential
    voting stopped early (None: no answer, or cut off)."""
    train_idx: list[int] = field(default_factory=list)
    """Indices (within the group) of the M samples that are rewarded and trained on."""
    rewards: list[float] = field(default_factory=list)
    """Reward of each sample in `train_idx`, in that order."""
    excluded: bool = False
    """Left out of the update: its vote is less decisive than reward.min_majority_ratio."""


def vote(rollout: Rollout, choices: list[tuple[str, ...] | None] | None = None) -> list[Group]:
    """Stage 3: each prompt's answers elect its pseudo-label by majority vote. `choices`: per
    prompt, a multiple-choice problem's options (its samples then vote on letters)."""
    answers = sample_answers(rollout.texts, rollout.truncated,
                             [c for c, k in zip(choices, rollout.group_sizes) for _ in range(k)] if choices else None)
    groups = []
    for p in range(len(rollout.prompt_ids)):
        mine = [answers[i] for i in rollout.group(p)]
        groups.append(Group(vote=majority_vote(mine), answers=mine))
    return groups


def contrast(groups: list[Group], votes: list[Vote], mine: range) -> list[Group]:
    """Stage 3 with `reward.contrast`: this rank's groups (at positions `mine` of the step) with
    labels elected against `votes`, every prompt of the step's vote (`voting.contrastive_vote`)."""
    elected = contrastive_vote(votes)
    return [replace(g, vote=elected[k]) for g, k in zip(groups, mine)]


def reward(groups: list[Group], rollout: Rollout, cfg: RewardConfig, seeds: list[int],
           first_round: int | None = None) -> list[Group]:
    """Stage 4: draw each prompt's M trained samples from its samples (from its own seed, so the
    draw does not depend on batching) and score them with the label-free reward `cfg.kind`.
    `first_round`: with sequential voting, the samples every prompt drew before it could stop; the
    M are drawn from those, whose distribution does not depend on when the prompt stopped (drawn
    from all, they would lean towards the leading answer, which early-stopped prompts are rich in)."""
    out = []
    for p, g in enumerate(groups):
        idx = rollout.group(p)
        pool = len(idx) if first_round is None else min(first_round, len(idx))
        pick = torch.Generator().manual_seed(seeds[p] + 1)  # a stream apart from the prompt's own sampling
        chosen = torch.randperm(pool, generator=pick)[: cfg.n_train_samples].tolist()
        rewards = label_free_rewards(cfg.kind, g.vote, [rollout.texts[i] for i in idx],
                                     [float(rollout.entropy[i].mean()) for i in idx],
                                     [float(rollout.certainty[i].mean()) for i in idx], chosen,
                                     seed=seeds[p] + 2, random_p=cfg.random_p, label_temperature=cfg.label_temperature,
                                     penalty=cfg.penalty, penalty_min_ratio=cfg.penalty_min_ratio,
                                     penalty_entropy_gate=cfg.penalty_entropy_gate)
        out.append(replace(g, train_idx=chosen, rewards=list(rewards),
                           excluded=g.vote.majority_ratio < cfg.min_majority_ratio))
    return out


def diagnostics(groups: list[Group], golds: list[str | None], binary: bool = True) -> dict:
    """Gold-based metrics (label accuracy, reward accuracy, rollout accuracy); read-only, over the
    step's prompts that have a gold answer (none: no metrics), as evaluation counts labelled prompts.
    Reward accuracy is over the samples trained on (excluded prompts aside) and only for `binary`
    reward kinds (`rewards.RewardKind.binary`): a graded reward (soft_majority's 0.9) never equals gold's 1/0."""
    labelled = [(g, gold) for g, gold in zip(groups, golds) if gold is not None]
    if not labelled:
        return {}
    label_ok = [is_equivalent(g.vote.pseudo_label, gold) for g, gold in labelled]
    rollout_ok = [is_equivalent(a, gold) for g, gold in labelled for a in g.answers]
    reward_ok = [float(is_equivalent(g.answers[i], gold)) == r
                 for g, gold in labelled if not g.excluded for i, r in zip(g.train_idx, g.rewards)]
    return {"train/label_accuracy": float(np.mean(label_ok)),
            "train/reward_accuracy": float(np.mean(reward_ok)) if reward_ok and binary else None,
            "train/rollout_accuracy": float(np.mean(rollout_ok))}

"""The hand-off from the vote to the update: one step's trained samples in one self-contained batch.

Built once from the rollout and the groups (`TrainBatch.of`); the advantages (and, with PPO, the
critic's values) are attached to it, and the update reads nothing else. A prompt left out of the
update (its vote below reward.min_majority_ratio) stays in place with no trained samples, so
mini-batches are cut over the step's prompts in order whether or not some are left out.
torchtune's `Trajectory` and verl's `DataProto` are the models, in small.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ttrl import batches


@dataclass
class TrainBatch:
    """Per prompt of the step (in step order) its M trained answers; none for a prompt left out."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[list[int]]]
    """[prompt][sample]: the trained answers' token ids."""
    old_logprobs: list[list[torch.Tensor]]
    """[prompt][sample] [len]: each token's log-prob under the policy that sampled it."""
    rewards: list[list[float]]
    """[prompt][sample]: the label-free reward of each trained answer."""
    temperature: float
    """The sampling temperature: log-probs are of softmax(logits / T), old and new alike."""
    advantages: list[torch.Tensor | None] | None = None
    """Per prompt [M] (group estimators) or [M, T] (PPO); None for a prompt left out."""
    values: StepValues | None = None
    """PPO: the critic's values and returns for the step (None without a critic)."""

    @classmethod
    def of(cls, rollout, groups: list, temperature: float) -> TrainBatch:
        """The trained samples (`Group.train_idx`) of a step's `rollout` and `groups`; the one place
        that reads `train_idx`."""
        picks = [[] if g.excluded else [rollout.group(p)[i] for i in g.train_idx] for p, g in enumerate(groups)]
        return cls(prompt_ids=rollout.prompt_ids,
                   completion_ids=[[rollout.completion_ids[i] for i in pick] for pick in picks],
                   old_logprobs=[[rollout.logprobs[i] for i in pick] for pick in picks],
                   rewards=[[] if g.excluded else list(g.rewards) for g in groups], temperature=temperature)

    def with_advantages(self, advantages: list[torch.Tensor | None], values: StepValues | None = None) -> TrainBatch:
        return replace(self, advantages=advantages, values=values)

    @property
    def kept(self) -> list[int]:
        """The prompts (positions in the step) whose answers are trained on."""
        return [p for p, c in enumerate(self.completion_ids) if c]

    @property
    def lengths(self) -> list[list[int]]:
        """[prompt][sample]: answer lengths, as ttrl.batches plans micro-batches over them."""
        return [[len(c) for c in answers] for answers in self.completion_ids]

    @property
    def prompt_lengths(self) -> list[int]:
        return [len(ids) for ids in self.prompt_ids]

    def inputs(self, pieces: batches.MicroBatch) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """(prompts, completions, group sizes) of a micro-batch's pieces, as `ttrl.scoring.score` takes them."""
        return ([self.prompt_ids[piece.prompt] for piece in pieces],
                [self.completion_ids[piece.prompt][j] for piece in pieces for j in piece.samples],
                [len(piece.samples) for piece in pieces])

    def old(self, pieces: batches.MicroBatch) -> list[torch.Tensor]:
        """The sampling log-probs of a micro-batch's answers, in `inputs` order."""
        return [self.old_logprobs[piece.prompt][j] for piece in pieces for j in piece.samples]


@dataclass
class StepValues:
    """One step's trained samples as one padded batch, before the update: what PPO's critic
    predicted, and what it is trained towards. Rows are the kept groups' trained samples in order."""
    values: torch.Tensor
    """[B, T] V(s_t) at sampling time: the anchor of value clipping."""
    advantages: torch.Tensor
    """[B, T] GAE advantages before whitening."""
    returns: torch.Tensor
    """[B, T] advantages + values: the critic's regression targets."""
    mask: torch.Tensor
    """[B, T] 1 on answer tokens."""
    rows: list[list[int] | None]
    """Per group of the step: the rows of its trained samples (in `train_idx` order); None if skipped."""

    def stats(self) -> dict:
        """critic/values, critic/returns (token means) and critic/explained_variance =
        1 - Var(R - V) / Var(R) over the step's tokens: 1 is a perfect critic, <= 0 no better than
        predicting the mean (None when every return is equal: a unanimous step, common late in TTRL,
        whose float rounding would otherwise divide by ~1e-15)."""
        m, n = self.mask, self.mask.sum().clamp(min=1)
        mean = lambda x: float((x * m).sum() / n)  # noqa: E731
        var = lambda x: mean((x - mean(x)) ** 2)  # noqa: E731
        var_r = var(self.returns)
        return {"critic/values": mean(self.values), "critic/returns": mean(self.returns),
                "critic/explained_variance": 1 - var(self.returns - self.values) / var_r if var_r > 1e-8 else None}

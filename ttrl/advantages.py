"""Advantage estimators: rewards of each prompt's group of samples -> per-sample advantages.

All take rewards [groups, M] (M trained samples per prompt) and return the same shape, so any
estimator plugs in at the same place in the trainer.
"""

from __future__ import annotations

import torch


def grpo(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps). A group whose rewards are all equal has
    zero advantage: it carries no learning signal."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: r - group mean, without the std division that over-weights easy/hard prompts."""
    return rewards - rewards.mean(-1, keepdim=True)


def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: each sample's baseline is the mean reward of the *other* samples of its group."""
    m = rewards.shape[-1]
    if m < 2:
        return torch.zeros_like(rewards)
    return (rewards - (rewards.sum(-1, keepdim=True) - rewards) / (m - 1))


def reinforce_pp(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ (baseline variant): subtract the group mean, then normalise by the std over
    the whole batch rather than per group."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (centred.std() + eps) if centred.numel() > 1 else centred


ESTIMATORS = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo, "reinforce_pp": reinforce_pp}


def compute_advantages(name: str, rewards: torch.Tensor) -> torch.Tensor:
    return ESTIMATORS[name](rewards)

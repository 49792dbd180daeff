"""Advantage estimators: rewards of each prompt's group of samples -> per-sample advantages.

The group estimators (`ESTIMATORS`) take rewards [groups, M] (M trained samples per prompt) and
return the same shape, so any of them plugs in at the same place in the trainer. PPO's
(`CRITIC_ESTIMATORS`) work per token instead, from a value model's V(s_t) (ttrl.critic): GAE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tensor methods only: config validation reads the estimators' names without loading torch
    import torch


def grpo(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps). A group whose rewards are all equal has
    zero advantage: it carries no learning signal."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=True) if rewards.shape[-1] > 1 else mean.new_zeros(mean.shape)
    return (rewards - mean) / (std + eps)


def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: r - group mean, without the std division that over-weights easy/hard prompts."""
    return rewards - rewards.mean(-1, keepdim=True)


def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: each sample's baseline is the mean reward of the *other* samples of its group."""
    m = rewards.shape[-1]
    if m < 2:
        return rewards.new_zeros(rewards.shape)
    return (rewards - (rewards.sum(-1, keepdim=True) - rewards) / (m - 1))


def reinforce_pp(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ (baseline variant): subtract the group mean, then normalise by the std over
    the whole batch rather than per group."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (centred.std() + eps) if centred.numel() > 1 else centred


ESTIMATORS = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo, "reinforce_pp": reinforce_pp}


def compute_advantages(name: str, rewards: torch.Tensor) -> torch.Tensor:
    return ESTIMATORS[name](rewards)


# --- token level, with a critic (PPO) -------------------------------------------------------------

def last_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] rewards that are 0 everywhere but at each sample's last token, which holds its
    reward (a vote's verdict is on the whole answer). rewards [batch], mask [batch, seq] 0/1."""
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    out = mask.new_zeros(mask.shape).float()
    return out.scatter_(1, last[:, None], (rewards.to(out) * (mask.sum(-1) > 0))[:, None])


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) as verl computes it, all [batch, seq]:
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = delta_t + gamma lam A_{t+1}, with V = 0 after
    the last token (the answer ends the episode, truncated or not). Returns (advantages, returns =
    A + V, the critic's targets); both 0 where mask is 0. With gamma = lam = 1 and the reward at the
    last token, A_t = reward - V(s_t)."""
    values = values * mask
    out = values.new_zeros(values.shape)
    next_value = values.new_zeros(values[:, 0].shape)
    running = values.new_zeros(values[:, 0].shape)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        m = mask[:, t]
        running = step * m + running * (1 - m)  # a padded position passes the later ones through
        next_value = values[:, t] * m + next_value * (1 - m)
        out[:, t] = running * m
    return out, (out + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the tokens where mask is 1 (unbiased variance), 0 elsewhere:
    verl's masked_whiten of GAE advantages, one scale for the whole step."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1) if n > 1 else mean.new_zeros(mean.shape)
    return (x - mean) * (var + eps).rsqrt() * mask


CRITIC_ESTIMATORS = {"ppo": gae}
"""Estimators that need a critic's V(s_t) per token: (rewards, values, mask, gamma, lam) [batch, seq]
-> (advantages, returns). The trainer builds a value model for these (ttrl.critic)."""

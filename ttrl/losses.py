"""Policy-gradient loss terms on per-token tensors [batch, seq] with a 0/1 mask.

Losses are summed over tokens and divided by `n_tokens`, the token count of the whole
mini-batch, so gradient accumulation over micro-batches gives exactly the token-mean loss.
"""

from __future__ import annotations

import torch


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float, n_tokens: float) -> tuple[torch.Tensor, dict]:
    """PPO/GRPO clipped surrogate. advantages [batch] (one per sample, broadcast over tokens: the
    group estimators) or [batch, seq] (one per token: GAE with a critic).

    Returns (loss, stats) with stats `clipfrac` and `approx_kl` (old -> new, k3) as floats.
    """
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    loss = (per_token * mask).sum() / n_tokens
    with torch.no_grad():
        stats = {
            "clipfrac": float(((clipped > unclipped).float() * mask).sum() / n_tokens),
            "approx_kl": float((((ratio - 1) - log_ratio) * mask).sum() / n_tokens),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, n_tokens: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped value loss as verl's critic: 0.5 max((V - R)^2, (V_clip - R)^2), V_clip = V
    kept within `clip` of the value at sampling time (`old_values`), so one update cannot move a
    value far; all [batch, seq], summed over tokens / `n_tokens` like `policy_loss`.

    Returns (loss, stats) with `vf_clipfrac`, the share of tokens where the clipped term won."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    plain_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * (torch.maximum(plain_err, clipped_err) * mask).sum() / n_tokens
    with torch.no_grad():
        stats = {"vf_clipfrac": float(((clipped_err > plain_err).float() * mask).sum() / n_tokens)}
    return loss, stats


KL_CLAMP = 10.0
"""verl's `low_var_kl` clamps each token's k3 to [-10, 10]: one token far off the reference must
not dominate the loss (k3 >= 0, so only the upper bound acts)."""


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 >= 0,
    unbiased and low-variance for samples drawn from the policy (Schulman, 2020), clamped as verl."""
    d = ref_logp - logp
    return (d.exp() - d - 1).clamp(max=KL_CLAMP)

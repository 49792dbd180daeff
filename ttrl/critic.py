"""PPO's critic: a value model V(s_t) read at every token of an answer, and one step's values.

The critic is a second copy of the policy's backbone (the transformer without its LM head) with a
scalar head, trained by its own AdamW at its own learning rate (`algorithm.critic_lr`, 9e-6 in the
official TTRL scripts), as verl and the TTRL paper run PPO. Why not a value head on the policy's own
backbone, which would save that copy: the value loss would then pull on the features the policy
samples from, and the two losses would need a weight that verl and the paper never tuned. What the
copy costs on one GPU: one more set of weights, gradients and AdamW state (Qwen2.5-1.5B: 12 GB in
bf16, 24 GB in float32); with LoRA (`model.lora_rank` > 0) the critic trains its own
adapter of the same rank plus the head, so only its frozen weights are a second full copy and its
optimizer state stays small. The LM head is dropped (for an untied 7B vocabulary, ~1 GB saved).

The head starts at zero, so every value starts at 0 and the first steps' advantages are the
rewards themselves; only the head learns until it is non-zero, then the backbone too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ttrl.config import ModelConfig
from ttrl.rollout import _cache_kwarg, _checkpointing, group_inputs


class ValueModel(nn.Module):
    """backbone (a transformers base model, LoRA layers included when used) + Linear(hidden, 1).
    The head runs in float32 whatever the backbone's dtype: bf16 would round values near 1 to
    ~0.004, coarser than the differences the critic has to learn."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1, dtype=torch.float32, device=next(backbone.parameters()).device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                n_values: int, **backbone_kwargs) -> torch.Tensor:
        """[batch, n_values]: the value of each of the last `n_values` positions (`backbone_kwargs`:
        a KV cache to read and extend)."""
        backbone_kwargs.setdefault("use_cache", False)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **backbone_kwargs).last_hidden_state[:, -n_values:]
        return self.head(hidden.float()).squeeze(-1)


def load_critic(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu",
                gradient_checkpointing: bool | str = False) -> ValueModel:
    """A value model on the policy's starting weights (`cfg` as the policy's: LoRA gives the
    critic an adapter of its own); activation checkpointing as `algorithm.gradient_checkpointing`."""
    from ttrl.models import load_model, set_gradient_checkpointing

    model, _ = load_model(cfg, seed=seed, device=device)
    set_gradient_checkpointing(model, gradient_checkpointing, device)
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's wrapper
    return ValueModel(causal.base_model, causal.config.hidden_size)


def token_values(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                 group_size: int | list[int] = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """V(s_t) before each completion token t (the state the token was sampled in: the prompt and
    the answer so far), laid out as `ttrl.rollout.score` lays out log-probs, and computed the same
    way: each prompt runs once and its KV cache is expanded to its group of completions, except
    under activation checkpointing (training), where each row runs prompt and completion as one
    sequence. `model`: a ValueModel, wrapped (DDP) or not. `prompts` has one entry per group of
    `group_size` consecutive completions. Returns (values [B, T], 0 past each completion's end;
    mask [B, T])."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    sizes, rows, (p_ids, p_mask), (c_ids, c_mask) = group_inputs(prompts, completions, pad_id, group_size, device)
    width = c_ids.shape[1]
    if model.training and torch.is_grad_enabled() and _checkpointing(model):
        mask = torch.cat([p_mask[rows], c_mask[:, :-1]], 1)
        values = model(input_ids=torch.cat([p_ids[rows], c_ids[:, :-1]], 1), attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0), n_values=width)
        return values * c_mask, c_mask.float()
    cache = DynamicCache()
    cache_kw = {"use_cache": True, _cache_kwarg(getattr(model, "module", model).backbone): cache}
    first = model(input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0),
                  n_values=1, **cache_kw)  # [prompts, 1]: the state before each answer's first token
    if len(set(sizes)) == 1 and sizes[0] > 1:
        cache.batch_repeat_interleave(sizes[0])
    elif len(set(sizes)) > 1:
        cache.batch_select_indices(rows)
    values, p_mask = first[rows], p_mask[rows]
    if width > 1:
        mask = torch.cat([p_mask, c_mask[:, :-1]], 1)
        c_pos = p_mask.sum(-1, keepdim=True) + torch.arange(width - 1, device=device)
        rest = model(input_ids=c_ids[:, :-1], attention_mask=mask, position_ids=c_pos, n_values=width - 1, **cache_kw)
        values = torch.cat([values, rest], 1)
    return values * c_mask, c_mask.float()


def zero_value_loss(model, pad_id: int) -> torch.Tensor:
    """0 through every critic parameter, for a rank out of work in a micro-batch (it must still
    join the gradient all-reduce, as `ttrl.distributed.zero_loss` does for the policy)."""
    values, _ = token_values(model, [[pad_id]], [[pad_id, pad_id]], pad_id)
    return values.sum() * 0.0


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

"""PPO's critic: a value model V(s_t) read at every token of an answer, and one step's values.

The critic is a second copy of the policy's backbone (the transformer without its LM head) with a
scalar head, trained by its own AdamW at its own learning rate (`algorithm.critic_lr`, 9e-6 in the
official TTRL scripts), as verl and the TTRL paper run PPO. Why not a value head on the policy's own
backbone, which would save that copy: the value loss would then pull on the features the policy
samples from, and the two losses would need a weight that verl and the paper never tuned. What the
copy costs on one GPU: one more set of weights, gradients and AdamW state (float32 whatever
model.dtype: Qwen2.5-1.5B, 24 GB); with LoRA (`model.lora_rank` > 0) the critic trains its own
adapter of the same rank plus the head, so only its frozen weights are a second full copy and its
optimizer state stays small. The LM head is dropped (for an untied 7B vocabulary, ~1 GB saved).

The head starts at zero, so every value starts at 0 and the first steps' advantages are the
rewards themselves; only the head learns until it is non-zero, then the backbone too.
"""

from __future__ import annotations

import torch
from torch import nn

from ttrl import batches
from ttrl.advantages import CRITIC_ESTIMATORS, last_token_rewards
from ttrl.config import AlgorithmConfig, ModelConfig
from ttrl.scoring import TeacherForced, cache_kwarg, checkpointing_on, is_sharded
from ttrl.train_batch import StepValues, TrainBatch


class ValueModel(nn.Module):
    """backbone (a transformers base model, LoRA layers included when used) + Linear(hidden, 1).
    The head runs in float32 whatever the backbone's dtype or autocast: bf16 would round values near 1 to
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
        with torch.autocast(hidden.device.type, enabled=False):  # mixed precision would run it in bf16
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
    the answer so far), laid out and run as `ttrl.scoring.score` runs log-probs (`TeacherForced`).
    `model`: a ValueModel, wrapped (DDP) or not. Returns (values [B, T], 0 past each completion's
    end; mask [B, T])."""
    from transformers import DynamicCache

    b = TeacherForced.of(prompts, completions, pad_id, group_size, next(model.parameters()).device)
    if model.training and torch.is_grad_enabled() and checkpointing_on(model):
        return model(**b.whole(), n_values=b.width) * b.c_mask, b.c_mask.float()
    cache = DynamicCache()
    cache_kw = {"use_cache": True, cache_kwarg(getattr(model, "module", model).backbone): cache}
    first = model(**b.prompt_pass(), n_values=1, **cache_kw)  # [prompts, 1]: the state before each answer's first token
    values = b.expand(cache, first)
    if b.width > 1:
        values = torch.cat([values, model(**b.answer_pass(b.width - 1), n_values=b.width - 1, **cache_kw)], 1)
    elif is_sharded(model):  # under FSDP every rank runs as many forwards (each gathers the parameters)
        with torch.no_grad():
            model(**b.answer_pass(1), n_values=1, **cache_kw)
    return values * b.c_mask, b.c_mask.float()


def zero_value_loss(model, pad_id: int) -> torch.Tensor:
    """0 through every critic parameter, for a rank out of work in a micro-batch (it must still
    join the gradient all-reduce, as `ttrl.update.zero_loss` does for the policy)."""
    values, _ = token_values(model, [[pad_id]], [[pad_id, pad_id]], pad_id)
    return values.sum() * 0.0


def critic_values(model, batch: TrainBatch, algo: AlgorithmConfig, pad_id: int, dist) -> StepValues:
    """PPO's reading of a step before any update: the value model's V(s_t) on every token of the
    batch's trained answers (each rank its share of the prompts, then gathered), and GAE over them
    (`algorithm.gamma`, `lam`) with each answer's reward at its last token. `model`: the value
    model as the engine wraps it."""
    lengths, rows, n = batch.lengths, [], 0
    for answers in lengths:
        rows.append(list(range(n, n + len(answers))) if answers else None)
        n += len(answers)
    mine = batches.pack(batches.samples_of(list(dist.share(len(lengths))), lengths), lengths, batch.prompt_lengths,
                        algo.micro_batch_size, algo.micro_batch_tokens)
    model = dist.unwrap(model).eval()
    computed = []
    with torch.no_grad(), dist.autocast(), dist.gathered(model):  # ranks run different numbers of passes
        for pieces in mine:
            prompts, completions, sizes = batch.inputs(pieces)
            v, _ = token_values(model, prompts, completions, pad_id, sizes)
            computed.append(([rows[piece.prompt][j] for piece in pieces for j in piece.samples], v.float().cpu()))
    flat = [length for answers in lengths for length in answers]
    values, mask = torch.zeros(n, max(flat, default=1)), torch.zeros(n, max(flat, default=1))
    for idx, v in dist.gather(computed):
        values[idx, : v.shape[1]] = v
    for r, length in enumerate(flat):
        mask[r, :length] = 1.0
    rewards = last_token_rewards(torch.tensor([x for answers in batch.rewards for x in answers]), mask)
    advantages, returns = CRITIC_ESTIMATORS[algo.advantage](rewards, values, mask, algo.gamma, algo.lam)
    return StepValues(values=values, advantages=advantages, returns=returns, mask=mask, rows=rows)

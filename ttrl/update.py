"""Stage 6 of the loop: clipped policy-gradient steps on the step's trained samples — with PPO
the critic's clipped value loss beside them — in mini-batches of whole prompts (one optimizer step
each) and micro-batches within a token budget (ttrl.batches), so memory is bounded while the
gradient is that of the whole mini-batch. A step whose loss, gradient or resulting logits are not
finite never stays in the weights."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ttrl import batches
from ttrl.config import AlgorithmConfig
from ttrl.critic import token_values, zero_value_loss
from ttrl.distributed import Dist
from ttrl.fsdp import local
from ttrl.losses import kl_k3, policy_loss, value_loss
from ttrl.scoring import score
from ttrl.train_batch import TrainBatch


@dataclass
class Policy:
    """What the update changes and what it measures against."""
    model: object
    """The model as the engine wraps it (DDP, ...): forward and backward through this."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    ref_model: object | None
    """Frozen reference for the KL term (None when algorithm.kl_coef = 0)."""
    pad_id: int
    good: LastGoodWeights | None = None
    """The weights before the last optimizer step, to undo a step that made the logits non-finite."""
    critic: Critic | None = None
    """PPO's value model, stepped beside the policy (None for the group estimators)."""


@dataclass
class Critic:
    """PPO's value model (ttrl.critic) and its own optimizer (algorithm.critic_lr, constant)."""
    model: object
    """As the engine wraps it (DDP): forward and backward through this."""
    optimizer: torch.optim.Optimizer


class LastGoodWeights:
    """A copy, in CPU memory, of the trainable weights (the policy's and, with PPO, the critic's)
    before an optimizer step: weights can blow up without a non-finite loss or gradient (a huge
    learning rate), which shows only in what they compute next. Under FSDP each rank copies its own shards."""

    def __init__(self, *models):
        self.params = [local(p) for model in models for p in model.parameters() if p.requires_grad]
        self.copies = [torch.empty(p.shape, dtype=p.dtype, device="cpu") for p in self.params]
        self.save()

    def save(self) -> None:
        with torch.no_grad():
            for c, p in zip(self.copies, self.params):
                c.copy_(p)

    def restore(self) -> None:
        with torch.no_grad():
            for c, p in zip(self.copies, self.params):
                p.copy_(c)


CRITIC_BLOWN_UP = 1e4
"""A critic whose values exceed this many times the step's largest |return| (at least 1) has blown up:
returns are bounded by the rewards, so such values only come from a catastrophic update (algorithm.critic_lr)."""


def finite_after_step(policy: Policy, batch: TrainBatch, micro_batches: list, algo: AlgorithmConfig,
                      dist: Dist) -> bool:
    """Whether the stepped weights still give finite log-probs on one of the samples just trained on
    and, with PPO, sane values (a forward of one sequence per model and optimizer step)."""
    critic = policy.critic if batch.values is not None else None
    if not micro_batches:
        if dist.sharded:  # under FSDP every rank joins the forward's all-gathers
            with torch.no_grad():
                zero_loss(policy.model, policy.pad_id, batch.temperature)
                if critic:
                    zero_value_loss(critic.model, policy.pad_id)
        return True
    piece = micro_batches[0][0]
    prompt, answer = [batch.prompt_ids[piece.prompt]], [batch.completion_ids[piece.prompt][piece.samples[0]]]
    with torch.no_grad():
        logp, _ = score(policy.model, prompt, answer, batch.temperature, policy.pad_id, chunk_mb=algo.logprob_chunk_mb)
        if critic is None:
            return bool(logp.isfinite().all())
        values, _ = token_values(critic.model, prompt, answer, policy.pad_id)
    limit = CRITIC_BLOWN_UP * max(1.0, float(batch.values.returns.abs().max()))
    return bool(logp.isfinite().all() and values.isfinite().all() and values.abs().max() <= limit)


def update(policy: Policy, batch: TrainBatch, algo: AlgorithmConfig, dist: Dist | None = None) -> dict:
    """Stage 6: clipped policy-gradient steps on the batch's trained samples, `algo.ppo_epochs`
    passes of one optimizer step per mini-batch (ttrl.batches); the scheduler steps once per call.

    `batch` holds the whole step (every rank's prompts), so the token counts that normalise the
    loss are global; this rank trains on its block of each mini-batch's samples (`batches.plan`),
    so the optimizer steps are those of one process.
    With PPO (`batch.values`, `policy.critic`) the critic steps beside the policy on the same
    micro-batches: one backward of the two losses' sum, whose parameters are disjoint, so each model
    gets exactly its own loss's gradient (clipped to algorithm.max_grad_norm on its own)."""
    dist = dist or Dist()
    if not batch.kept:  # nothing to train on; the schedule still moves on a step
        return {"loss/policy": 0.0, "optim/lr": advance_schedule(policy), "optim/steps": 0, "train/updated": 0}
    critic = policy.critic if batch.values is not None else None
    models = [policy.model] + ([critic.model] if critic else [])
    optimizers = [policy.optimizer] + ([critic.optimizer] if critic else [])
    lengths = batch.lengths
    n_mini = batches.n_mini_batches(len(lengths), algo.mini_batch_prompts)
    plan = batches.plan(dist.world, lengths, batch.prompt_lengths, n_mini, algo.micro_batch_size,
                        algo.micro_batch_tokens)
    minis = [[plan[r][j] for r in range(dist.world)] for j in range(n_mini)]
    total_tokens = sum(map(sum, lengths))
    params = [p for p in policy.model.parameters() if p.requires_grad]
    critic_params = [p for p in critic.model.parameters() if p.requires_grad] if critic else []
    totals = {"loss/policy": 0.0, "loss/kl": 0.0, "loss/total": 0.0, "loss/clipfrac": 0.0, "loss/approx_kl": 0.0}
    if critic:
        totals.update({"loss/value": 0.0, "critic/vf_clipfrac": 0.0})
    grad_norm, critic_norm, rejected, norms, critic_norms = 0.0, 0.0, 0, [], []
    for model in models:
        model.train()
    for _ in range(algo.ppo_epochs):
        for mini in minis:
            n_tokens = batches.tokens_of(mini, lengths)
            if n_tokens == 0:
                continue
            mine, n_micro = mini[dist.rank], max(len(m) for m in mini)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            finite = True
            for k in range(n_micro):
                with accumulating(dist, models, sync=k == n_micro - 1):
                    if k >= len(mine) or not finite:  # out of work (or after a NaN): still join the all-reduce
                        dist.backward(idle_loss(policy, critic, batch.temperature))
                        continue
                    loss, stats = micro_batch_loss(policy, batch, mine[k], n_tokens, algo, dist)
                    if critic:
                        v_loss, v_stats = value_micro_batch_loss(critic, batch, mine[k], n_tokens, algo, policy.pad_id)
                        loss, stats = loss + v_loss, {**stats, **v_stats}
                    weight = n_tokens / (total_tokens * algo.ppo_epochs)  # step token-mean over the epochs
                    for key, value in stats.items():
                        totals[key] += value * weight
                    finite = math.isfinite(stats["loss/total"]) and math.isfinite(stats.get("loss/value", 0.0))
                    if not finite and dist.world == 1:
                        break
                    dist.backward(idle_loss(policy, critic, batch.temperature) if not finite
                                  else loss * dist.world)  # the engine averages over ranks; ours is a share of a sum
            finite = dist.all_true(finite)  # one rank's NaN skips the optimizer step on all
            grad_norm = dist.clip_grad_norm_(params, algo.max_grad_norm) if finite else math.nan
            if critic and math.isfinite(grad_norm):
                critic_norm = dist.clip_grad_norm_(critic_params, algo.max_grad_norm)
            if not (math.isfinite(grad_norm) and math.isfinite(critic_norm)):  # a NaN/inf must not reach the weights
                rejected += 1
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                continue
            if policy.good is not None:
                policy.good.save()
            for optimizer in optimizers:
                optimizer.step()
            if policy.good is not None and not dist.all_true(finite_after_step(policy, batch, mine, algo, dist)):
                policy.good.restore()  # weights that blew up without a non-finite loss (a huge learning rate)
                rejected += 1
                continue
            norms.append(grad_norm)
            critic_norms.append(critic_norm)
    for optimizer in optimizers:  # no gradient outlives the update: rollouts and evaluation get the memory
        optimizer.zero_grad(set_to_none=True)
    lr = advance_schedule(policy)
    totals = dict(zip(totals, dist.sum(list(totals.values()))))  # each rank summed its share of the tokens
    mean = lambda xs, last: sum(xs) / len(xs) if xs else last  # noqa: E731  (over the steps taken, as verl)
    critic_stats = {**batch.values.stats(), "critic/grad_norm": mean(critic_norms, critic_norm)} if critic else {}
    return {**totals, "optim/grad_norm": mean(norms, grad_norm), "optim/lr": lr,
            "optim/skipped_updates": rejected, "optim/steps": len(norms),
            "train/updated": len(batch.kept), **critic_stats}


def advance_schedule(policy: Policy) -> float:
    """The learning rate this step trained at; the schedule then moves on one step (once per
    rollout batch, whether or not anything was trained)."""
    lr = policy.scheduler.get_last_lr()[0]
    policy.scheduler.step()
    return lr


@contextmanager
def accumulating(dist: Dist, models: list, sync: bool):
    """`dist.accumulating` for the policy and, with PPO, the critic: both all-reduce on the last micro-batch."""
    with ExitStack() as stack:
        for model in models:
            stack.enter_context(dist.accumulating(model, sync=sync))
        yield


def idle_loss(policy: Policy, critic: Critic | None, temperature: float) -> torch.Tensor:
    """0 through every trained parameter (policy and critic), for a backward that must happen anyway."""
    loss = zero_loss(policy.model, policy.pad_id, temperature)
    return loss + zero_value_loss(critic.model, policy.pad_id) if critic else loss


def zero_loss(model, pad_id: int, temperature: float) -> torch.Tensor:
    """A loss of 0 through every parameter, for a rank out of work in a micro-batch: it still has
    to join the gradient all-reduce (and, under FSDP, as many forwards) as the others."""
    logp, _ = score(model, [[pad_id]], [[pad_id, pad_id]], temperature, pad_id)
    return logp.sum() * 0.0


def micro_batch_loss(policy: Policy, batch: TrainBatch, pieces: batches.MicroBatch, n_tokens: int,
                     algo: AlgorithmConfig, dist: Dist) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch (its share of the mini-batch's token-mean) and its terms as floats."""
    prompts, completions, sizes = batch.inputs(pieces)
    temperature, chunk = batch.temperature, algo.logprob_chunk_mb
    logp, mask = score(policy.model, prompts, completions, temperature, policy.pad_id, group_size=sizes, chunk_mb=chunk)
    old = torch.nn.utils.rnn.pad_sequence(batch.old(pieces), batch_first=True)
    adv = torch.cat([batch.advantages[piece.prompt][list(piece.samples)] for piece in pieces])
    if adv.dim() == 2:  # per token (PPO): from the step's longest answer to this micro-batch's
        adv = adv[:, : logp.shape[1]]
    loss, stats = policy_loss(logp, old[:, : logp.shape[1]].to(logp.device), adv.to(logp.device), mask,
                              algo.clip_eps, n_tokens)
    terms = {"loss/policy": float(loss.detach()), "loss/kl": 0.0, "loss/clipfrac": stats["clipfrac"],
             "loss/approx_kl": stats["approx_kl"]}
    if policy.ref_model is not None:
        with torch.no_grad(), dist.autocast():
            ref_logp, _ = score(policy.ref_model, prompts, completions, temperature, policy.pad_id, group_size=sizes,
                                chunk_mb=chunk)
        kl = (kl_k3(logp, ref_logp) * mask).sum() / n_tokens
        loss = loss + algo.kl_coef * kl
        terms["loss/kl"] = float(kl.detach())
    terms["loss/total"] = float(loss.detach())
    return loss, terms


def value_micro_batch_loss(critic: Critic, batch: TrainBatch, pieces: batches.MicroBatch, n_tokens: int,
                           algo: AlgorithmConfig, pad_id: int) -> tuple[torch.Tensor, dict]:
    """The critic's clipped value loss on one micro-batch (its share of the mini-batch's token-mean)."""
    prompts, completions, sizes = batch.inputs(pieces)
    v, mask = token_values(critic.model, prompts, completions, pad_id, sizes)
    rows = [batch.values.rows[piece.prompt][j] for piece in pieces for j in piece.samples]
    old, returns = (x[rows, : v.shape[1]].to(v.device) for x in (batch.values.values, batch.values.returns))
    loss, stats = value_loss(v, old, returns, mask, algo.value_clip, n_tokens)
    return loss, {"loss/value": float(loss.detach()), "critic/vf_clipfrac": stats["vf_clipfrac"]}

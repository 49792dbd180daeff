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
from ttrl.config import Config
from ttrl.critic import StepValues, token_values, zero_value_loss
from ttrl.distributed import Dist, zero_loss
from ttrl.groups import Group
from ttrl.losses import kl_k3, policy_loss, value_loss
from ttrl.rollout import Rollout, score


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
    """A copy, in CPU memory, of the trainable weights before an optimizer step: weights can blow up
    without a non-finite loss or gradient (a huge learning rate), which shows only in the logits."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
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


def finite_after_step(policy: Policy, rollout: Rollout, groups: list[Group], micro_batches: list, cfg: Config) -> bool:
    """Whether the stepped weights still give finite log-probs on one of the samples just trained on
    (a forward of one sequence per optimizer step)."""
    if not micro_batches:
        return True
    piece = micro_batches[0][0]
    i = rollout.group(piece.prompt)[groups[piece.prompt].train_idx[piece.samples[0]]]
    with torch.no_grad():
        logp, _ = score(policy.model, [rollout.prompt_ids[piece.prompt]], [rollout.completion_ids[i]],
                        cfg.rollout.temperature, policy.pad_id, chunk_mb=cfg.algorithm.logprob_chunk_mb)
    return bool(logp.isfinite().all())


def update(policy: Policy, rollout: Rollout, groups: list[Group], advantages: list[torch.Tensor | None],
           cfg: Config, dist: Dist | None = None, values: StepValues | None = None) -> dict:
    """Stage 6: clipped policy-gradient steps on the trained samples, `algorithm.ppo_epochs` passes
    of one optimizer step per mini-batch (ttrl.batches); the scheduler steps once per call.

    `rollout` and `groups` hold the whole step (every rank's prompts), so the token counts that
    normalise the loss are global; this rank trains on its block of each mini-batch's samples
    (`batches.plan`), so the optimizer steps are those of one process.
    With PPO (`values`, `policy.critic`) the critic steps beside the policy on the same micro-batches:
    one backward of the two losses' sum, whose parameters are disjoint, so each model gets exactly
    its own loss's gradient (clipped to algorithm.max_grad_norm on its own)."""
    dist = dist or Dist()
    algo = cfg.algorithm
    if all(a is None for a in advantages):  # nothing to train on; the schedule still moves on a step
        return {"loss/policy": 0.0, "optim/lr": advance_schedule(policy), "optim/steps": 0, "train/updated": 0}
    critic = policy.critic if values is not None else None
    models = [policy.model] + ([critic.model] if critic else [])
    optimizers = [policy.optimizer] + ([critic.optimizer] if critic else [])
    lengths = [[] if a is None else [len(rollout.completion_ids[rollout.group(p)[i]]) for i in g.train_idx]
               for p, (g, a) in enumerate(zip(groups, advantages))]
    prompt_lengths = [len(ids) for ids in rollout.prompt_ids]
    n_mini = batches.n_mini_batches(len(groups), algo.mini_batch_prompts)
    plan = batches.plan(dist.world, lengths, prompt_lengths, n_mini, algo.micro_batch_size, algo.micro_batch_tokens)
    minis = [[plan[r][j] for r in range(dist.world)] for j in range(n_mini)]
    total_tokens = sum(map(sum, lengths))
    params = [p for p in policy.model.parameters() if p.requires_grad]
    critic_params = [p for p in critic.model.parameters() if p.requires_grad] if critic else []
    totals = {"loss/policy": 0.0, "loss/kl": 0.0, "loss/total": 0.0, "loss/clipfrac": 0.0, "loss/approx_kl": 0.0}
    if critic:
        totals.update({"loss/value": 0.0, "critic/vf_clipfrac": 0.0})
    grad_norm, critic_norm, skipped, norms, critic_norms = 0.0, 0.0, 0, [], []
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
                        dist.backward(idle_loss(policy, critic, cfg))
                        continue
                    loss, stats = micro_batch_loss(policy, rollout, groups, advantages, mine[k], n_tokens, cfg, dist)
                    if critic:
                        v_loss, v_stats = value_micro_batch_loss(critic, rollout, groups, values, mine[k], n_tokens,
                                                                 cfg, policy.pad_id)
                        loss, stats = loss + v_loss, {**stats, **v_stats}
                    weight = n_tokens / (total_tokens * algo.ppo_epochs)  # step token-mean over the epochs
                    for key, value in stats.items():
                        totals[key] += value * weight
                    finite = math.isfinite(stats["loss/total"]) and math.isfinite(stats.get("loss/value", 0.0))
                    if not finite and dist.world == 1:
                        break
                    dist.backward(idle_loss(policy, critic, cfg) if not finite
                                  else loss * dist.world)  # the engine averages over ranks; ours is a share of a sum
            finite = dist.all_true(finite)  # one rank's NaN skips the optimizer step on all
            grad_norm = dist.clip_grad_norm_(params, algo.max_grad_norm) if finite else math.nan
            if critic and math.isfinite(grad_norm):
                critic_norm = dist.clip_grad_norm_(critic_params, algo.max_grad_norm)
            if not (math.isfinite(grad_norm) and math.isfinite(critic_norm)):  # a NaN/inf must not reach the weights
                skipped += 1
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                continue
            if policy.good is not None:
                policy.good.save()
            for optimizer in optimizers:
                optimizer.step()
            if policy.good is not None and not dist.all_true(finite_after_step(policy, rollout, groups, mine, cfg)):
                policy.good.restore()  # weights that blew up without a non-finite loss (a huge learning rate)
                skipped += 1
                continue
            norms.append(grad_norm)
            critic_norms.append(critic_norm)
    lr = advance_schedule(policy)
    totals = dict(zip(totals, dist.sum(list(totals.values()))))  # each rank summed its share of the tokens
    mean = lambda xs, last: sum(xs) / len(xs) if xs else last  # noqa: E731  (over the steps taken, as verl)
    critic_stats = {**values.stats(), "critic/grad_norm": mean(critic_norms, critic_norm)} if critic else {}
    return {**totals, "optim/grad_norm": mean(norms, grad_norm), "optim/lr": lr,
            "optim/skipped_updates": skipped, "optim/steps": len(norms),
            "train/updated": sum(a is not None for a in advantages), **critic_stats}


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


def idle_loss(policy: Policy, critic: Critic | None, cfg: Config) -> torch.Tensor:
    """0 through every trained parameter (policy and critic), for a backward that must happen anyway."""
    loss = zero_loss(policy.model, policy.pad_id, cfg.rollout.temperature)
    return loss + zero_value_loss(critic.model, policy.pad_id) if critic else loss


def micro_batch_inputs(rollout: Rollout, groups: list[Group], pieces: batches.MicroBatch):
    """(sample indices, prompts, completions, group sizes) of a micro-batch's pieces, as `score` takes them."""
    samples = [rollout.group(piece.prompt)[groups[piece.prompt].train_idx[j]] for piece in pieces
               for j in piece.samples]
    return (samples, [rollout.prompt_ids[piece.prompt] for piece in pieces],
            [rollout.completion_ids[i] for i in samples], [len(piece.samples) for piece in pieces])


def micro_batch_loss(policy: Policy, rollout: Rollout, groups: list[Group], advantages: list,
                     pieces: batches.MicroBatch, n_tokens: int, cfg: Config, dist: Dist) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch (its share of the mini-batch's token-mean) and its terms as floats."""
    samples, prompts, completions, sizes = micro_batch_inputs(rollout, groups, pieces)
    temperature = cfg.rollout.temperature
    chunk = cfg.algorithm.logprob_chunk_mb
    logp, mask = score(policy.model, prompts, completions, temperature, policy.pad_id, group_size=sizes, chunk_mb=chunk)
    old = torch.nn.utils.rnn.pad_sequence([rollout.logprobs[i] for i in samples], batch_first=True)
    adv = torch.cat([advantages[piece.prompt][list(piece.samples)] for piece in pieces])
    if adv.dim() == 2:  # per token (PPO): from the step's longest answer to this micro-batch's
        adv = adv[:, : logp.shape[1]]
    loss, stats = policy_loss(logp, old[:, : logp.shape[1]].to(logp.device), adv.to(logp.device), mask,
                              cfg.algorithm.clip_eps, n_tokens)
    terms = {"loss/policy": float(loss.detach()), "loss/kl": 0.0, "loss/clipfrac": stats["clipfrac"],
             "loss/approx_kl": stats["approx_kl"]}
    if policy.ref_model is not None:
        with torch.no_grad(), dist.autocast():
            ref_logp, _ = score(policy.ref_model, prompts, completions, temperature, policy.pad_id, group_size=sizes,
                                chunk_mb=chunk)
        kl = (kl_k3(logp, ref_logp) * mask).sum() / n_tokens
        loss = loss + cfg.algorithm.kl_coef * kl
        terms["loss/kl"] = float(kl.detach())
    terms["loss/total"] = float(loss.detach())
    return loss, terms


def value_micro_batch_loss(critic: Critic, rollout: Rollout, groups: list[Group], values: StepValues,
                           pieces: batches.MicroBatch, n_tokens: int, cfg: Config, pad_id: int) -> tuple[torch.Tensor, dict]:
    """The critic's clipped value loss on one micro-batch (its share of the mini-batch's token-mean)."""
    _, prompts, completions, sizes = micro_batch_inputs(rollout, groups, pieces)
    v, mask = token_values(critic.model, prompts, completions, pad_id, sizes)
    rows = [values.rows[piece.prompt][j] for piece in pieces for j in piece.samples]
    old, returns = (x[rows, : v.shape[1]].to(v.device) for x in (values.values, values.returns))
    loss, stats = value_loss(v, old, returns, mask, cfg.algorithm.value_clip, n_tokens)
    return loss, {"loss/value": float(loss.detach()), "critic/vf_clipfrac": stats["vf_clipfrac"]}

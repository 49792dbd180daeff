"""The TTRL loop, top to bottom: prompts -> samples -> votes -> rewards -> advantages -> update
-> metrics. `train()` shows the stages, one call each; the update is ttrl.update, the
between-steps control ttrl.control, set-up and resume are functions here. Gold answers enter only
`diagnostics()` and evaluation, after the update is done. Checkpoints (ttrl.checkpoint) let a
killed run resume exactly where it stopped."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ttrl import batches
from ttrl.advantages import CRITIC_ESTIMATORS, compute_advantages, last_token_rewards, whiten
from ttrl.checkpoint import CHECKPOINTS, CheckpointError, load_checkpoint, save_checkpoint
from ttrl.config import Config, ConfigError, flatten
from ttrl.critic import StepValues, load_critic, token_values
from ttrl.control import Control, StopSignals
from ttrl.data import Problem, load_sets, run_sets
from ttrl.distributed import Dist, is_main_process, make_accelerator, warn
from ttrl.evaluation import run_evals
from ttrl.groups import Group, contrast, diagnostics, reward, vote
from ttrl.metrics import (MetricsWriter, library_bars, log_rollouts, progress_bar, read_metrics, truncate_metrics,
                          truncate_rollouts, write_atomic)
from ttrl.models import encode_problems, load_model, set_gradient_checkpointing
from ttrl.rewards import BINARY_KINDS
from ttrl.rollout import NonFiniteError, Rollout, Sampler, Sampling, TorchSampler
from ttrl.schedule import make_scheduler
from ttrl.sequential import VoteRounds, sample_in_rounds
from ttrl.update import Critic, LastGoodWeights, Policy, micro_batch_inputs, update


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def total_steps(cfg: Config, n_prompts: int) -> int:
    if cfg.train.steps:
        return cfg.train.steps
    return cfg.train.epochs * math.ceil(n_prompts / min(cfg.train.prompts_per_step, n_prompts))


# --- stages 2 and 5 -------------------------------------------------------------------------------

def sample(sampler: Sampler, model, prompt_ids: list[list[int]], seeds: list[int], sampling: Sampling,
           dist: Dist, rounds: VoteRounds | None = None, choices: list | None = None) -> Rollout | None:
    """Stage 2: each rank samples the votes of its share of the step's prompts: all N, or with
    `rounds` (sequential voting) until each prompt's vote is decided. None on every rank when any
    rank's model produced non-finite logits (its weights have blown up)."""
    share = dist.share(len(prompt_ids))
    mine = lambda items: [items[k] for k in share]  # noqa: E731
    try:
        if rounds is None:
            rollout = sampler.generate(model, mine(prompt_ids), sampling, mine(seeds))
        else:
            rollout = sample_in_rounds(sampler, model, mine(prompt_ids), sampling, mine(seeds), rounds,
                                       mine(choices) if choices else None, lockstep=dist.sharded)
    except NonFiniteError:
        rollout = None
    return rollout if dist.all_true(rollout is not None) else None


def gather_step(rollout: Rollout, groups: list[Group], dist: Dist) -> tuple[Rollout, list[Group]]:
    """Every rank's rollout and groups, concatenated in prompt order, on every rank: advantages and
    metrics are computed over the whole step, exactly as one process would."""
    parts = dist.gather([(rollout, groups)])
    return Rollout.concat([r for r, _ in parts]), [g for _, gs in parts for g in gs]


def critic_values(policy: Policy, rollout: Rollout, groups: list[Group], cfg: Config,
                  dist: Dist) -> StepValues | None:
    """Stage 5 with a critic (PPO; None without): its V(s_t) on every token of the step's trained
    samples before any update (each rank its share of the prompts, then gathered), and GAE over them
    (`algorithm.gamma`, `lam`) with each sample's vote reward at its last token."""
    if policy.critic is None:
        return None
    algo, rows, samples = cfg.algorithm, [], []
    for p, g in enumerate(groups):
        rows.append(None if g.skipped else list(range(len(samples), len(samples) + len(g.train_idx))))
        samples += [] if g.skipped else [rollout.group(p)[i] for i in g.train_idx]
    lengths = [[len(rollout.completion_ids[i]) for i in samples[r[0]:r[-1] + 1]] if r else [] for r in rows]
    prompt_lengths = [len(ids) for ids in rollout.prompt_ids]
    mine = batches.pack(batches.samples_of(list(dist.share(len(groups))), lengths), lengths, prompt_lengths,
                        algo.micro_batch_size, algo.micro_batch_tokens)
    model = dist.unwrap(policy.critic.model).eval()
    computed = []
    with torch.no_grad(), dist.autocast():
        for pieces in mine:
            _, prompts, completions, sizes = micro_batch_inputs(rollout, groups, pieces)
            v, _ = token_values(model, prompts, completions, policy.pad_id, sizes)
            computed.append(([rows[piece.prompt][j] for piece in pieces for j in piece.samples], v.float().cpu()))
    width = max((len(rollout.completion_ids[i]) for i in samples), default=1)
    values, mask = torch.zeros(len(samples), width), torch.zeros(len(samples), width)
    for idx, v in dist.gather(computed):
        values[idx, : v.shape[1]] = v
    for r, i in enumerate(samples):
        mask[r, : len(rollout.completion_ids[i])] = 1.0
    rewards = last_token_rewards(torch.tensor([x for g in groups if not g.skipped for x in g.rewards]), mask)
    advantages, returns = CRITIC_ESTIMATORS[algo.advantage](rewards, values, mask, algo.gamma, algo.lam)
    return StepValues(values=values, advantages=advantages, returns=returns, mask=mask, rows=rows)


def estimate_advantages(estimator: str, groups: list[Group], values: StepValues | None = None
                        ) -> list[torch.Tensor | None]:
    """Stage 5: per group, the advantage of each trained sample [M] (the group estimators) or of each
    of its tokens [M, T] (ppo: the GAE of `values`, whitened over the step's tokens as verl does);
    None for a skipped group. Batch-level estimators (reinforce_pp) see the kept groups only."""
    if estimator in CRITIC_ESTIMATORS:
        if values is None:
            raise ValueError(f"algorithm.advantage={estimator} needs the critic's values (critic_values)")
        adv = whiten(values.advantages, values.mask) if values.mask.sum() > 0 else values.advantages
        return [None if r is None else adv[r] for r in values.rows]
    kept = [g for g in groups if not g.skipped]
    adv = iter(compute_advantages(estimator, torch.tensor([g.rewards for g in kept])) if kept else [])
    return [None if g.skipped else next(adv) for g in groups]


# --- metrics --------------------------------------------------------------------------------------

def rollout_metrics(rollout: Rollout, groups: list[Group], seconds: float) -> dict:
    lengths = [len(c) for c in rollout.completion_ids]
    ent = torch.cat(rollout.entropy) if rollout.entropy else torch.zeros(1)
    trained = [r for g in groups if not g.skipped for r in g.rewards]
    return {
        "train/reward": float(np.mean(trained)) if trained else 0.0,
        "train/majority_ratio": float(np.mean([g.vote.majority_ratio for g in groups])),
        "train/distinct_labels": len({g.vote.pseudo_label for g in groups} - {None}) / max(len(groups), 1),
        "train/skipped_prompts": sum(g.skipped for g in groups),
        "train/no_answer": float(np.mean([a is None for g in groups for a in g.answers])),
        "train/entropy": float(ent.mean()),
        "train/response_length": float(np.mean(lengths)),
        "train/truncated": float(np.mean(rollout.truncated)),
        "train/votes_drawn": float(np.mean(rollout.group_sizes)),
        "perf/rollout_tokens": sum(lengths),
        "perf/rollout_seconds": seconds,
        "perf/tokens_per_second": sum(lengths) / max(seconds, 1e-9),
    }


def rollout_rows(step: int, ids: list[str], groups: list[Group], rollout: Rollout, keep: int = 4) -> list[dict]:
    """rollouts.jsonl rows of a step: per trained prompt its vote, rewards and first samples."""
    return [{"step": step, "prompt_id": pid, "pseudo_label": g.vote.pseudo_label,
             "majority_ratio": g.vote.majority_ratio, "n_votes": len(g.answers), "rewards": g.rewards,
             "samples": [rollout.texts[i] for i in list(rollout.group(p))[:keep]]}
            for p, (pid, g) in enumerate(zip(ids, groups))]


class TrainingStopped(RuntimeError):
    """The run stopped before the end (a signal, or too many non-finite steps in a row) after
    saving a checkpoint; `exit_code` is what a command line should return."""

    def __init__(self, message: str, checkpoint: Path, exit_code: int):
        super().__init__(message)
        self.checkpoint, self.exit_code = checkpoint, exit_code


# --- set-up and resume ----------------------------------------------------------------------------

def resumed_state(run_dir: Path, cfg: Config, model, optimizer, scheduler, critic: tuple | None = None) -> dict | None:
    """Load the latest checkpoint (with PPO, `critic` = (value model, optimizer) too); settings that
    differ from the checkpointed run are named (model.* ones refused: the weights would not fit).
    A key the checkpointed run's version did not have counts as set to its default."""
    state = load_checkpoint(run_dir, model, optimizer, scheduler, critic)
    if state is None:
        warn(f"no checkpoint in {run_dir}/{CHECKPOINTS}; starting from step 0")
        return None
    old, new = {**flatten(Config().to_dict()), **flatten(state["config"])}, flatten(cfg.to_dict())
    free = ("train.steps", "train.save_every", "train.keep_checkpoints", "algorithm.max_bad_steps",
            "train.wandb_project", "rollout.max_batch_rows", "rollout.memory_fraction", "eval.max_batch_rows",
            "eval.memory_fraction")
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in free]
    if any(k.startswith("model.") for k in changed):
        raise CheckpointError(f"cannot resume {run_dir}: the checkpoint was trained with other model settings "
                              f"({', '.join(k for k in changed if k.startswith('model.'))}); use the original config")
    if changed:
        warn("resuming with changed settings (the run will differ from an uninterrupted one): "
             + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
    a = cfg.algorithm
    if old.get("train.steps") != new.get("train.steps") and (a.lr_schedule != "constant" or a.warmup_ratio > 0):
        warn(f"train.steps {old.get('train.steps')!r} -> {new.get('train.steps')!r} with algorithm.lr_schedule="
             f"{a.lr_schedule} (warmup_ratio {a.warmup_ratio}): the schedule is laid over the new length, so the "
             "learning rate jumps at the resumed step")
    if is_main_process():
        print(f"resuming from {state['path']} (step {state['step']})", file=sys.stderr)
    return state


@dataclass
class Run:
    """Everything the loop needs, built by `setup()`."""
    dist: Dist
    policy: Policy
    model: object
    """The plain (unwrapped) model: sample from it, save it."""
    tok: object
    sampler: Sampler
    sampling: Sampling
    rounds: VoteRounds | None
    """Sequential voting's rounds (None: all N votes at once)."""
    adapt: list[Problem]
    prompt_ids: list[list[int]]
    eval_sets: dict[str, list[Problem]]
    control: Control
    start: int
    evals: dict
    writer: MetricsWriter | None


def setup(cfg: Config, run_dir: Path, resume: bool, stop: StopSignals) -> Run:
    """Data, model, optimizer, sampler and (on resume) the checkpoint's state, in the order that
    makes a resumed run continue bit for bit."""
    problems, extra = load_sets(cfg)  # bad data fails before anything is written
    dist = Dist(make_accelerator())
    check_critic_engine(cfg, dist)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    model, tok = load_model(cfg.model, seed=cfg.train.seed, device=dist.device)
    set_gradient_checkpointing(model, cfg.algorithm.gradient_checkpointing, dist.device)
    ref_model = None
    if cfg.algorithm.kl_coef > 0:
        ref_model, _ = load_model(type(cfg.model)(**{**cfg.model.__dict__, "lora_rank": 0}), seed=cfg.train.seed,
                                  device=dist.device)
        ref_model.eval().requires_grad_(False).to(dist.device)
    stop.check()
    eval_sets = run_sets(cfg, problems, extra, tok, model)
    adapt = eval_sets["adapt"]
    dist.check_batch(min(cfg.train.prompts_per_step, len(adapt)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.algorithm.lr, weight_decay=cfg.algorithm.weight_decay)
    steps = total_steps(cfg, len(adapt))
    scheduler = make_scheduler(optimizer, cfg.algorithm.lr_schedule, cfg.algorithm.warmup_ratio, steps)
    # The scheduler stays ours (accelerate's would step once per process); `wrapped` is the
    # engine's wrapper (DDP, ...): forward/backward through it, sample from `model`.
    wrapped, optimizer = dist.prepare(model, optimizer)
    model = dist.unwrap(wrapped)
    critic = make_critic(cfg, dist) if cfg.algorithm.advantage in CRITIC_ESTIMATORS else None
    if cfg.rollout.backend == "vllm":
        from ttrl.vllm_rollout import VLLMSampler

        sampler = VLLMSampler(cfg, model, tok, dist)
    else:
        sampler = TorchSampler(tok, dist.generation)
    # Resume: weights, optimizer, RNGs and eval history from the checkpoint (every rank loads it);
    # metrics rows logged after it (and a torn last line) are dropped, so the file reads as if
    # never interrupted.
    state = resumed_state(run_dir, cfg, model, optimizer, scheduler, critic_parts(critic, dist)) if resume else None
    writer = None
    if dist.is_main:
        if resume:
            truncate_metrics(run_dir, state["metric_rows"] if state else 0)
            truncate_rollouts(run_dir, state["step"] if state else 0)
        write_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
        writer = MetricsWriter(run_dir, purge_step=(state["step"] + 1 if state else 0) if resume else None,
                               wandb_project=cfg.train.wandb_project, config=cfg.to_dict())
    history = dist.broadcast([r for r in read_metrics(run_dir) if "train/reward" in r] if dist.is_main else None)
    if state:
        sampler.sync(model)
        if state["step"] > steps:
            warn(f"the checkpoint is at step {state['step']}, past train.steps={steps}: no step is run, and the "
                 f"final evaluation is logged as step {state['step']}")
    policy = Policy(model=wrapped, optimizer=optimizer, scheduler=scheduler, ref_model=ref_model,
                    pad_id=tok.pad_token_id, good=None if dist.deepspeed else LastGoodWeights(model), critic=critic)
    return Run(dist=dist, policy=policy, model=model, tok=tok, sampler=sampler,
               sampling=Sampling.of(cfg.rollout, n=cfg.rollout.n_votes), rounds=VoteRounds.of(cfg), adapt=adapt,
               prompt_ids=encode_problems(tok, adapt, cfg), eval_sets=eval_sets,
               control=Control.resumed(cfg, max(steps, state["step"]) if state else steps, history,
                                       state["bad_steps"] if state else 0),
               start=state["step"] if state else 0, evals=state["evals"] if state else {}, writer=writer)


def check_critic_engine(cfg: Config, dist: Dist) -> None:
    """PPO's critic runs in one process or under DDP: its checkpoints, and its gradient clipping
    beside the policy's, are not written for sharded engines or fp16 loss scaling yet."""
    mixed = getattr(dist.accelerator, "mixed_precision", "no")
    if cfg.algorithm.advantage in CRITIC_ESTIMATORS and (dist.sharded or mixed == "fp16"):
        raise ConfigError(f"config key 'algorithm.advantage' = {cfg.algorithm.advantage!r}: the critic runs in one "
                          "process or under DDP, in fp32 or bf16; use the multi_gpu or single_gpu accelerate config "
                          f"(this launch uses {'FSDP/DeepSpeed' if dist.sharded else 'fp16'}), or a group estimator "
                          "such as grpo", "algorithm.advantage")


def make_critic(cfg: Config, dist: Dist) -> Critic:
    """PPO's value model on the policy's starting weights, with its own AdamW, wrapped like the policy."""
    model = load_critic(cfg.model, seed=cfg.train.seed, device=dist.device,
                        gradient_checkpointing=cfg.algorithm.gradient_checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.algorithm.critic_lr,
                                  weight_decay=cfg.algorithm.weight_decay)
    return Critic(*dist.prepare(model, optimizer))


def critic_parts(critic: Critic | None, dist: Dist) -> tuple | None:
    """(plain value model, optimizer) as checkpoints save and load them (None without a critic)."""
    return (dist.unwrap(critic.model), critic.optimizer) if critic else None


def export_model(model, tok, run_dir: Path, state_dict=None) -> Path:
    """RUN_DIR/model: the trained model (or LoRA adapter) with its tokenizer, written beside and
    renamed into place, so a kill never leaves weights without a tokenizer."""
    final, tmp = run_dir / "model", run_dir / f".tmp-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tok.save_pretrained(tmp)
    (tmp / "README.md").write_text(how_to_load(model, final), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def how_to_load(model, path: Path) -> str:
    """RUN_DIR/model/README.md: how to use what ttrl saved, from the command line and from Python."""
    lines = [f"# {path}", "", "Saved by `ttrl train`. Evaluate it again on the run's own sets: "
             f"`ttrl eval {path.parent}`.", ""]
    if hasattr(model, "peft_config"):
        base = next(iter(model.peft_config.values())).base_model_name_or_path
        lines += ["This directory holds a **LoRA adapter** (adapter_config.json, adapter_model.safetensors) "
                  f"trained on top of `{base}`, not a whole model. Load base + adapter merged:", "",
                  "```python", "from ttrl.config import ModelConfig", "from ttrl.models import load_model",
                  f'model, tokenizer = load_model(ModelConfig(name="{path}"))', "```", "",
                  "or with peft directly:", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  f'model = PeftModel.from_pretrained(base, "{path}").merge_and_unload()',
                  f'tokenizer = AutoTokenizer.from_pretrained("{path}")', "```", "",
                  "A run whose base had random weights (model.architecture) rebuilds them from the run's seed: "
                  "use `ttrl eval RUN_DIR`, which reads the run's config.json."]
    else:
        lines += ["A whole Hugging Face model with its tokenizer:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'model = AutoModelForCausalLM.from_pretrained("{path}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{path}")', "```"]
    return "\n".join(lines) + "\n"


# --- the loop -------------------------------------------------------------------------------------

def train(cfg: Config, run_dir: str | Path, quiet: bool = False, resume: bool = False) -> dict:
    """Run TTRL end to end; returns the summary also written to RUN_DIR/summary.json.
    `resume`: continue from the latest valid checkpoint in RUN_DIR (from step 0 if there is none).
    `quiet`: no progress output, ours or the libraries' (model loading and saving).
    Under `torchrun` / `accelerate launch` every process runs this; rank 0 writes the files."""
    run_dir = Path(run_dir)
    with StopSignals(announce=is_main_process()) as stop, library_bars(enabled=not quiet):
        r = setup(cfg, run_dir, resume, stop)
        dist, control, path = r.dist, r.control, run_dir / CHECKPOINTS
        try:
            with progress_bar(disable=quiet or not dist.is_main) as bar:
                if cfg.eval.before and not r.start:
                    run_evals(r.policy.model, r.tok, r.eval_sets, cfg, 0, r.writer, r.evals, dist, r.sampler, bar)
                stop.check()
                task = bar.add_task("ttrl train", total=control.steps, completed=r.start, info="")
                for step in range(r.start, control.steps):
                    with stop.deferred():
                        t0, done = time.perf_counter(), step + 1
                        batch = batch_order(len(r.adapt), cfg.train.prompts_per_step, step, cfg.train.seed)
                        seeds = [prompt_seed(cfg.train.seed, step, i) for i in batch]                  # 1 prompts
                        rollout = sample(r.sampler, r.policy.model, [r.prompt_ids[i] for i in batch],  # 2 samples
                                         seeds, r.sampling, dist, r.rounds, [r.adapt[i].choices for i in batch])
                        t_rollout = time.perf_counter() - t0
                        if rollout is None:  # the last optimizer step blew the weights up: undo it
                            r.policy.good.restore()
                            r.sampler.sync(r.policy.model)
                            row = {"step": done, "train/nonfinite_logits": 1, "optim/skipped_updates": 1}
                        else:
                            mine = dist.share(len(batch))
                            groups = vote(rollout, [r.adapt[batch[k]].choices for k in mine])          # 3 votes
                            if cfg.reward.contrast:
                                groups = contrast(groups, dist.gather([g.vote for g in groups]), mine)
                            groups = reward(groups, rollout, cfg.reward, [seeds[k] for k in mine],     # 4 rewards
                                            r.rounds.boundaries()[0] if r.rounds else None)
                            rollout, groups = gather_step(rollout, groups, dist)
                            values = critic_values(r.policy, rollout, groups, cfg, dist)               # 5 advantages
                            advantages = estimate_advantages(cfg.algorithm.advantage, groups, values)  #   (PPO: GAE)
                            stats = update(r.policy, rollout, groups, advantages, cfg, dist, values)   # 6 update
                            r.sampler.sync(r.policy.model)
                            row = {"step": done, **rollout_metrics(rollout, groups, t_rollout),
                                   **stats, **diagnostics(groups, [r.adapt[i].answer for i in batch],
                                                    cfg.reward.kind in BINARY_KINDS),
                                   "perf/step_seconds": time.perf_counter() - t0}
                        evaluate_now = control.after_step(done, row)
                        if dist.is_main:
                            r.writer.log(row)
                            if rollout is not None:
                                log_rollouts(run_dir, rollout_rows(done, [r.adapt[i].id for i in batch], groups,
                                                                   rollout))
                        report_step(bar, task, row, control, done)
                        if evaluate_now:
                            run_evals(r.policy.model, r.tok, r.eval_sets, cfg, done, r.writer, r.evals, dist, r.sampler,
                                      bar)
                        # A signal that lands after this line is handled at the end of the next step; the
                        # ranks agree on it (a signal may reach them at different steps).
                        halt = control.halt(done, first_signal(stop.received, dist))
                        if halt or control.checkpoint_due(done):
                            path = checkpoint(r, cfg, run_dir, done)
                    if halt:
                        dist.close()
                        raise TrainingStopped(halt.message.format(path=path), path, halt.exit_code)
                    if control.finished:
                        break
                received = first_signal(stop.received, dist)  # one that arrived while the last checkpoint was saved
                if received:
                    dist.close()
                    raise TrainingStopped(f"stopped by {received} after step {control.steps}; checkpoint saved in "
                                          f"{path}", path, control.halt(control.steps, received).exit_code)
                run_evals(r.policy.model, r.tok, r.eval_sets, cfg, control.steps, r.writer, r.evals, dist, r.sampler,
                          bar)
        finally:
            if r.writer is not None:
                r.writer.close()
    # Under FSDP / ZeRO-3 the full weights are gathered from every rank (a collective).
    weights = dist.accelerator.get_state_dict(r.policy.model) if dist.sharded else None
    summary = {"steps": control.steps, "evals": r.evals, "stopped_early": control.stopped_early}
    if dist.is_main:
        with library_bars(enabled=not quiet):
            export_model(r.model, r.tok, run_dir, weights)
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    dist.close()
    return summary


def report_step(bar, task, row: dict, control: Control, done: int) -> None:
    """The progress bar's line, and the warnings a step can raise."""
    if "train/reward" in row:
        bar.update(task, advance=1, total=control.steps, info=f"reward {row['train/reward']:.2f} "
                                                              f"majority ratio {row['train/majority_ratio']:.2f}")
    else:
        bar.update(task, advance=1, total=control.steps)
    if row.get("optim/skipped_updates"):
        warn(f"step {done}: NaN/inf loss, gradient or logits; update skipped "
             f"({control.bad_steps} in a row, algorithm.max_bad_steps={control.cfg.algorithm.max_bad_steps})")
    if row.get("collapse_warning") and row.get("stop_reason") != row["collapse_warning"]:  # said once
        warn(f"step {done}: {row['collapse_warning']}")
    if control.stopped_early and row.get("stop_reason"):
        warn(f"stopping early after step {done}: {control.stopped_early}")
    for message in control.signal_warnings(done):
        warn(message)


def checkpoint(r: Run, cfg: Config, run_dir: Path, done: int) -> Path:
    """Save step `done` (rank 0 writes; every rank waits for it)."""
    path = None
    if r.dist.sharded:  # optimizer state is split across ranks; see docs/distributed.md
        warn(f"step {done}: no checkpoint under FSDP/DeepSpeed (not supported yet)")
    elif r.dist.is_main:
        path = save_checkpoint(run_dir, done, r.model, r.policy.optimizer, r.policy.scheduler,
                               keep=cfg.train.keep_checkpoints, critic=critic_parts(r.policy.critic, r.dist),
                               state={"evals": r.evals, "bad_steps": r.control.bad_steps,
                                      "metric_rows": r.writer.n_rows, "config": cfg.to_dict()})
    r.dist.barrier()  # no rank may exit (and so end the job) while rank 0 is still writing
    return path or run_dir / CHECKPOINTS


def first_signal(received: str | None, dist: Dist) -> str | None:
    """The stop signal any rank received (SIGINT/SIGTERM), on every rank, so all stop at the same step."""
    import signal

    code = dist.max(int(signal.Signals[received]) if received else 0)
    return signal.Signals(code).name if code else None

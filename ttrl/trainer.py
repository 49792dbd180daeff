"""Everything around a TTRL step (ttrl.step): set-up and resume, OS signals, the evaluation and
checkpoint schedule, logging, export. Checkpoints (ttrl.checkpoint) let a killed run resume
exactly where it stopped; gold answers never reach the step's training path."""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ttrl.advantages import CRITIC_ESTIMATORS
from ttrl.checkpoint import CHECKPOINTS, CheckpointError, load_checkpoint, save_checkpoint
from ttrl.config import Config, ConfigError, flatten, may_change_on_resume
from ttrl.console import is_main_process, warn
from ttrl.control import Control, StopSignals
from ttrl.critic import load_critic
from ttrl.data import Problem, encode_problems, load_sets, run_sets
from ttrl.distributed import Dist, make_accelerator
from ttrl.evaluation import run_evals
from ttrl.fsdp import full_state_dict, load_sharded, save_sharded
from ttrl.metrics import (MetricsWriter, library_bars, log_rollouts, progress_bar, read_metrics, truncate_metrics,
                          truncate_rollouts, write_atomic)
from ttrl.models import export_model, load_model, set_gradient_checkpointing, trained_weights
from ttrl.plan import check_fits
from ttrl.plugins import use_answer_checker
from ttrl.preview import announce
from ttrl.rollout import Sampling, TorchSampler
from ttrl.schedule import make_scheduler
from ttrl.sequential import VoteRounds
from ttrl.step import Learner, rollout_rows, step
from ttrl.update import Critic, LastGoodWeights, Policy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps(cfg: Config, n_prompts: int) -> int:
    if cfg.train.steps:
        return cfg.train.steps
    return cfg.train.epochs * math.ceil(n_prompts / min(cfg.train.prompts_per_step, n_prompts))


# --- the loop -------------------------------------------------------------------------------------

def train(cfg: Config, run_dir: str | Path, quiet: bool = False, resume: bool = False, started=None) -> dict:
    """Run TTRL end to end; returns the summary also written to RUN_DIR/summary.json.
    `resume`: continue from the latest valid checkpoint in RUN_DIR (from step 0 if there is none).
    `quiet`: no progress output, ours or the libraries' (model loading and saving).
    `started`: called once the run has everything it needs and has written its config.json.
    Under `torchrun` / `accelerate launch` every process runs this; rank 0 writes the files."""
    run_dir = Path(run_dir)
    with StopSignals(announce=is_main_process()) as stop, library_bars(enabled=not quiet):
        r = setup(cfg, run_dir, resume, stop)
        if started is not None:
            started()
        dist, control, path = r.learner.dist, r.control, run_dir / CHECKPOINTS
        announce(cfg, r.eval_sets, dist.device, training=True, quiet=quiet or not dist.is_main)
        evaluate = lambda done, bar: run_evals(r.learner.policy.model, r.tok, r.eval_sets, cfg, done,  # noqa: E731
                                               r.writer, r.evals, dist, r.learner.sampler, bar)
        try:
            with progress_bar(disable=quiet or not dist.is_main) as bar:
                if cfg.eval.before and not r.start:
                    evaluate(0, bar)
                stop.check()
                task = bar.add_task("ttrl train", total=control.steps, completed=r.start, info="")
                halt = None
                for index in range(r.start, control.steps):
                    with stop.deferred():
                        result = step(r.learner, cfg, index)
                        done, row = index + 1, result.row
                        verdict = control.after_step(done, row)
                        row.update(verdict.logged())
                        if dist.is_main:
                            r.writer.log(row)
                            if result.rollout is not None:
                                log_rollouts(run_dir, rollout_rows(result))
                        show_progress(bar, task, row, control.steps)
                        for message in verdict.warnings:
                            warn(message)
                        if verdict.evaluate:
                            evaluate(done, bar)
                        # A signal that lands after this line is handled once the checkpoint below is written (or at
                        # the end of the next step); the ranks agree on it (a signal may reach them at different steps).
                        halt = control.halt(done, first_signal(stop.received, dist))
                        if halt or control.checkpoint_due(done):
                            path = checkpoint(r, cfg, run_dir, done)
                            # one that arrived while it was written: stop now, on the checkpoint just saved
                            halt = halt or control.halt(done, first_signal(stop.received, dist))
                    if halt or control.finished:
                        break
                # One that arrived while the last checkpoint was saved stops the run here, before the final evaluation.
                halt = halt or control.stopped_by(control.steps, first_signal(stop.received, dist))
                if halt:
                    dist.close()
                    raise TrainingStopped(halt.message.format(path=path), path, halt.exit_code)
                handed_back = guard(r, cfg, run_dir)
                evaluate(control.steps, bar)
        finally:
            if r.writer is not None:
                r.writer.close()
    # Under FSDP the full weights are gathered from every rank (a collective).
    weights = full_state_dict(r.model) if dist.sharded else None
    summary = {"steps": control.steps, "evals": r.evals, "stopped_early": control.stopped_early, "model": handed_back}
    if dist.is_main:  # a signal waits for the model to be saved (a second one stops at once)
        with StopSignals(announce=False) as stop, stop.deferred(), library_bars(enabled=not quiet):
            export_model(r.model, r.tok, run_dir, weights)
            write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        if stop.received:
            warn(f"{stop.received} arrived while the trained model was being saved; it was saved first: the run "
                 "is complete")
    dist.close()
    return summary


def guard(r: Training, cfg: Config, run_dir: Path) -> dict:
    """Which step's model the run hands back (evaluates and exports), and why: with train.guard=
    rollback, after the collapse watch stopped training, the weights of the newest checkpoint from
    before the stretch it saw (ttrl.control.Control.rollback_step); otherwise the last step's.
    Reads unlabeled signals only, through the watch."""
    control = r.control
    fired = control.guarded_at or next((row["step"] for row in control.history if row.get("collapse_warning")), None)
    if fired is None:
        return {"step": control.steps, "rolled_back": False,
                "why": "the collapse watch did not fire: the last step's model"}
    if control.guarded_at is None:
        return {"step": control.steps, "rolled_back": False, "collapse_step": fired,
                "why": f"the collapse watch fired at step {fired} and train.guard=warn trained on: the last step's model"}
    upto = control.rollback_step()
    if upto is None:
        return {"step": fired, "rolled_back": False, "collapse_step": fired,
                "why": f"the collapse watch fired at step {fired}; training stopped there (train.guard=stop)"}
    policy, dist = r.learner.policy, r.learner.dist
    state = load_latest(run_dir, cfg, r.model, policy.optimizer, policy.scheduler,
                        critic_parts(policy.critic, dist), dist, upto=upto)
    if state is None:
        out = {"step": fired, "rolled_back": False, "collapse_step": fired,
               "why": f"the collapse watch fired at step {fired}, but no checkpoint of step {upto} or before is kept "
                      f"to roll back to (raise train.keep_checkpoints): step {fired}'s model"}
    else:
        r.learner.sampler.sync(r.learner.policy.model)
        out = {"step": state["step"], "rolled_back": True, "collapse_step": fired,
               "why": f"the collapse watch fired at step {fired} (its window: steps {upto + 1}-{fired}); rolled back "
                      f"to the checkpoint of step {state['step']} (train.guard=rollback)"}
    warn(out["why"])
    return out


def show_progress(bar, task, row: dict, steps: int) -> None:
    """The progress bar's line after a step."""
    if "train/reward" in row:
        bar.update(task, advance=1, total=steps, info=f"reward {row['train/reward']:.2f} "
                                                      f"majority ratio {row['train/majority_ratio']:.2f}")
    else:
        bar.update(task, advance=1, total=steps)


class TrainingStopped(RuntimeError):
    """The run stopped before the end (a signal, or too many non-finite steps in a row) after
    saving a checkpoint; `exit_code` is what a command line should return."""

    def __init__(self, message: str, checkpoint: Path, exit_code: int):
        super().__init__(message)
        self.checkpoint, self.exit_code = checkpoint, exit_code


# --- set-up and resume ----------------------------------------------------------------------------

def resumed_state(run_dir: Path, cfg: Config, model, optimizer, scheduler, critic: tuple | None = None,
                  dist: Dist | None = None) -> dict | None:
    """Load the latest checkpoint (with PPO, `critic` = (value model, optimizer) too; under
    train.parallel=fsdp every rank its shards); settings that differ from the checkpointed run are
    named (model.* ones refused: the weights would not fit). A key the checkpointed run's version
    did not have counts as set to its default."""
    state = load_latest(run_dir, cfg, model, optimizer, scheduler, critic, dist or Dist())
    if state is None:
        warn(f"no checkpoint in {run_dir}/{CHECKPOINTS}; starting from step 0")
        return None
    old, new = {**flatten(Config().to_dict()), **flatten(state["config"])}, flatten(cfg.to_dict())
    free = may_change_on_resume()
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in free]
    if any(k.startswith("model.") for k in changed):
        raise CheckpointError(f"cannot resume {run_dir}: the checkpoint was trained with other model settings "
                              f"({', '.join(k for k in changed if k.startswith('model.'))}); use the original config")
    if changed:
        warn("resuming with changed settings (the run will differ from an uninterrupted one): "
             + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
    if "algorithm.lr" in changed:  # the optimizer and schedule state hold the old base rate
        scheduler.base_lrs = [cfg.algorithm.lr for _ in scheduler.base_lrs]
        for group, f in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = cfg.algorithm.lr, cfg.algorithm.lr * f(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    if "algorithm.critic_lr" in changed and critic:
        for group in critic[1].param_groups:
            group["lr"] = cfg.algorithm.critic_lr
    if state.get("bad_steps") and {"algorithm.lr", "algorithm.critic_lr", "algorithm.max_grad_norm"} & set(changed):
        state["bad_steps"] = 0  # the streak of rejected steps was the old rates'; the new ones start afresh
    a = cfg.algorithm
    before, after = old.get("train.steps") or 0, new.get("train.steps") or 0
    if before != after and (a.lr_schedule != "constant"
                            or int(a.warmup_ratio * before) != int(a.warmup_ratio * after)):  # as make_scheduler
        warn(f"train.steps {old.get('train.steps')!r} -> {new.get('train.steps')!r} with algorithm.lr_schedule="
             f"{a.lr_schedule} (warmup_ratio {a.warmup_ratio}): the schedule is laid over the new length, so the "
             "learning rate jumps at the resumed step")
    if is_main_process():
        print(f"resuming from {state['path']} (step {state['step']})", file=sys.stderr)
    return state


def load_latest(run_dir: Path, cfg: Config, model, optimizer, scheduler, critic: tuple | None, dist: Dist,
                upto: int | None = None) -> dict | None:
    """The newest readable checkpoint (of step `upto` or before, when given) restored, in the format
    train.parallel writes: sharded under fsdp (every rank its shards), whole otherwise; its state or None."""
    if cfg.train.parallel == "fsdp":
        return load_sharded(run_dir, model, optimizer, scheduler, dist, critic, upto=upto)
    return load_checkpoint(run_dir, model, optimizer, scheduler, critic, upto=upto)


@dataclass
class Training:
    """Everything the loop needs, built by `setup()`."""
    learner: Learner
    model: object
    """The plain (unwrapped) model: save it."""
    tok: object
    eval_sets: dict[str, list[Problem]]
    control: Control
    start: int
    evals: dict
    writer: MetricsWriter | None


def setup(cfg: Config, run_dir: Path, resume: bool, stop: StopSignals) -> Training:
    """Data, model, optimizer, sampler and (on resume) the checkpoint's state, in the order that
    makes a resumed run continue bit for bit."""
    problems, extra = load_sets(cfg)  # bad data fails before anything is written
    use_answer_checker(cfg.data.answer_extractor, cfg.data.answer_equivalence)
    dist = Dist(make_accelerator(cfg.model.dtype), cfg.train.parallel)
    check_critic_engine(cfg, dist)
    check_fits(cfg, dist.device)  # on CUDA: a run that cannot fit stops before the model loads
    if cfg.rollout.backend == "vllm":  # what it cannot do fails before the model loads
        from ttrl.vllm_rollout import check

        check(cfg, dist)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    model, tok = load_model(trained_weights(cfg.model), seed=cfg.train.seed, device=dist.device)
    set_gradient_checkpointing(model, cfg.algorithm.gradient_checkpointing, dist.device)
    model = dist.shard(model)  # FSDP: this rank's shards from here on (the reference model stays whole)
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
    state = (resumed_state(run_dir, cfg, model, optimizer, scheduler, critic_parts(critic, dist), dist) if resume
             else None)
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
                    pad_id=tok.pad_token_id, good=LastGoodWeights(model, *([critic.model] if critic else [])),
                    critic=critic)
    learner = Learner(policy=policy, sampler=sampler, sampling=Sampling.of(cfg.rollout, n=cfg.rollout.n_votes),
                      rounds=VoteRounds.of(cfg), adapt=adapt, prompt_ids=encode_problems(tok, adapt, cfg), dist=dist)
    return Training(learner=learner, model=model, tok=tok, eval_sets=eval_sets,
                    control=Control.resumed(cfg, max(steps, state["step"]) if state else steps, history,
                                            state.get("bad_steps", 0) if state else 0),
                    start=state["step"] if state else 0, evals=state["evals"] if state else {}, writer=writer)


def check_critic_engine(cfg: Config, dist: Dist) -> None:
    """PPO's critic is clipped beside the policy, which fp16 loss scaling (one scaler for both) does not do yet."""
    mixed = getattr(dist.accelerator, "mixed_precision", "no")
    if cfg.algorithm.advantage in CRITIC_ESTIMATORS and mixed == "fp16":
        raise ConfigError(f"config key 'algorithm.advantage' = {cfg.algorithm.advantage!r}: the critic trains in "
                          "fp32 or bf16; use the multi_gpu or single_gpu accelerate config (this launch uses fp16), "
                          "or a group estimator such as grpo", "algorithm.advantage")


def make_critic(cfg: Config, dist: Dist) -> Critic:
    """PPO's value model on the policy's starting weights, with its own AdamW, wrapped (or sharded) like the policy."""
    model = dist.shard(load_critic(trained_weights(cfg.model), seed=cfg.train.seed, device=dist.device,
                                   gradient_checkpointing=cfg.algorithm.gradient_checkpointing))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.algorithm.critic_lr,
                                  weight_decay=cfg.algorithm.weight_decay)
    return Critic(*dist.prepare(model, optimizer))


def critic_parts(critic: Critic | None, dist: Dist) -> tuple | None:
    """(plain value model, optimizer) as checkpoints save and load them (None without a critic)."""
    return (dist.unwrap(critic.model), critic.optimizer) if critic else None



def checkpoint(r: Training, cfg: Config, run_dir: Path, done: int) -> Path:
    """Save step `done`: under train.parallel=fsdp every rank writes its shards (ttrl.fsdp), otherwise
    rank 0 writes the whole; every rank waits for it."""
    dist, policy, path = r.learner.dist, r.learner.policy, None
    state = {"evals": r.evals, "bad_steps": r.control.bad_steps, "metric_rows": r.writer.n_rows if r.writer else 0,
             "config": cfg.to_dict()}
    critic = critic_parts(policy.critic, dist)
    if cfg.train.parallel == "fsdp":
        path = save_sharded(run_dir, done, r.model, policy.optimizer, policy.scheduler, dist.broadcast(state), dist,
                            keep=cfg.train.keep_checkpoints, critic=critic)
    elif dist.is_main:
        path = save_checkpoint(run_dir, done, r.model, policy.optimizer, policy.scheduler,
                               keep=cfg.train.keep_checkpoints, critic=critic, state=state)
    dist.barrier()  # no rank may exit (and so end the job) while rank 0 is still writing
    return path or run_dir / CHECKPOINTS


def first_signal(received: str | None, dist: Dist) -> str | None:
    """The stop signal any rank received (SIGINT/SIGTERM), on every rank, so all stop at the same step."""
    import signal

    code = dist.max(int(signal.Signals[received]) if received else 0)
    return signal.Signals(code).name if code else None

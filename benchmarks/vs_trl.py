"""ttrl's trainer vs TRL's GRPOTrainer + ttrl's reward: the same TTRL job, timed side by side in one run
(each side in a fresh process, so neither inherits the other's caches or threads).

The job: SmolLM2-135M-Instruct (float32, CPU), ttrl.data.arithmetic_problems, each step 8 prompts
x 8 samples of at most 8 new tokens (top-k 50, temperature 1), all 64 samples voted on and
trained on, GRPO advantages, clipped token-level loss, no KL, AdamW, same steps. Then avg@16 of
each trained model with one ttrl.evaluation.evaluate call (same settings, same seed).

    .venv/bin/python benchmarks/vs_trl.py                        # full: 32 prompts, 30 steps
    .venv/bin/python benchmarks/vs_trl.py --steps 2 --prompts 8  # smoke check, 1-2 minutes

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

TEMPLATE = "{problem} Answer with just the number."

from _child import in_child


def _problems(args):
    from ttrl.config import ArithmeticConfig
    from ttrl.data import arithmetic_problems

    return arithmetic_problems(ArithmeticConfig(n=args.prompts, seed=args.data_seed))


def _evaluate(model, tok, problems, args) -> dict:
    """avg@k, maj@k, pass@k with the rollout sampler; the same seed for every model."""
    from ttrl.config import EvalConfig
    from ttrl.evaluation import evaluate

    cfg = EvalConfig(n_samples=args.eval_samples, temperature=1.0, top_p=1.0, top_k=50,
                     max_new_tokens=args.new_tokens, greedy=False)
    model.eval()
    summary, _ = evaluate(model, tok, problems, cfg, TEMPLATE, chat_template=True, seed=args.seed + 7919)
    return summary


def run_ttrl(args, queue):
    import torch

    from ttrl.config import (AlgorithmConfig, ArithmeticConfig, Config, DataConfig, EvalConfig, ModelConfig,
                             RewardConfig, RolloutConfig, TrainConfig)
    from ttrl.metrics import read_metrics
    from ttrl.models import load_model
    from ttrl.trainer import train

    torch.set_num_threads(args.threads)
    problems = _problems(args)
    base_model, tok = load_model(ModelConfig(), seed=args.seed)
    base = _evaluate(base_model, tok, problems, args)
    del base_model
    cfg = Config(
        model=ModelConfig(),
        data=DataConfig(train="arithmetic", arithmetic=ArithmeticConfig(n=args.prompts, seed=args.data_seed),
                        holdout=0.0, template=TEMPLATE),
        rollout=RolloutConfig(n_votes=args.samples, temperature=1.0, top_p=1.0, top_k=50,
                              max_new_tokens=args.new_tokens),
        reward=RewardConfig(n_train_samples=args.samples),  # N = M: TRL trains on every sample it votes with
        algorithm=AlgorithmConfig(advantage="grpo", lr=args.lr, kl_coef=0.0, clip_eps=0.2, weight_decay=0.0,
                                  max_grad_norm=1.0, micro_batch_size=args.micro_batch),
        # train() ends with its own evaluation; keep it trivial, the comparison below evaluates both sides alike
        eval=EvalConfig(n_samples=1, max_new_tokens=1, greedy=False, before=False),
        train=TrainConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, seed=args.seed),
    )
    with tempfile.TemporaryDirectory() as run_dir:
        train(cfg, run_dir, quiet=True)
        seconds = [row["perf/step_seconds"] for row in read_metrics(run_dir) if "perf/step_seconds" in row]
        model, tok = load_model(ModelConfig(name=f"{run_dir}/model"))
        after = _evaluate(model, tok, problems, args)
    queue.put({"step_seconds": seconds, "base": base, "after": after})


def run_trl(args, queue):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ttrl.config import ModelConfig
    from ttrl.data import render_prompt
    from ttrl.integrations.trl import MajorityVoteReward
    from ttrl.models import load_model
    from ttrl.rollout import eos_ids
    from ttrl.step import batch_order

    torch.set_num_threads(args.threads)
    problems = _problems(args)
    per_step = min(args.prompts_per_step, len(problems))
    # The prompts ttrl trains on at each step, in its order: with shuffle_dataset=False TRL's sampler takes
    # them step by step, so both sides see the same prompts at the same step.
    batches = [batch_order(len(problems), per_step, step, args.seed) for step in range(args.steps)]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": render_prompt(problems[i], TEMPLATE)}],
                               "answer": problems[i].answer} for batch in batches for i in batch])
    expected = [sorted(render_prompt(problems[i], TEMPLATE) for i in batch for _ in range(args.samples))
                for batch in batches]
    model, tok = load_model(ModelConfig(), seed=args.seed)
    out_dir = tempfile.TemporaryDirectory(prefix="vs_trl-")
    config = GRPOConfig(
        output_dir=out_dir.name, max_steps=args.steps, seed=args.seed,
        # one optimizer step = one generation batch = per_step prompts x num_generations completions,
        # in micro-batches of micro_batch sequences (ttrl's algorithm.micro_batch_size)
        num_generations=args.samples, generation_batch_size=per_step * args.samples,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=per_step * args.samples // args.micro_batch,
        shuffle_dataset=False, max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=50,
        # the loss: GRPO advantages (group std), clip 0.2, one pass, no KL and no reference model;
        # loss_type "dapo" sums token losses over the whole accumulated batch and divides by its token
        # count, as ttrl.losses.policy_loss does
        beta=0.0, epsilon=0.2, num_iterations=1, scale_rewards="group", loss_type="dapo",
        learning_rate=args.lr, optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0,
        # TRL's defaults are bf16 and activation checkpointing: ttrl trains in float32 and recomputes nothing
        bf16=False, activation_checkpointing=False, use_cpu=True,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
    )

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step: generation, reward, forward/backward and update."""

        def __init__(self):
            self.seconds, self.t0 = [], 0.0

        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            self.seconds.append(time.perf_counter() - self.t0)

    class CheckedReward(MajorityVoteReward):
        """Records the prompts of each generation batch, to check they are ttrl's prompts of that step."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.batches = []

        def __call__(self, prompts, completions, **kw):
            self.batches.append(sorted(p[-1]["content"] for p in prompts))
            return super().__call__(prompts, completions, **kw)

    # Cut-off completions have no answer on both sides, as in ttrl's trainer.
    timer, reward = StepTimer(), CheckedReward(num_generations=args.samples, max_completion_length=args.new_tokens,
                                               eos_token_id=sorted(eos_ids(model, tok)))
    trainer = GRPOTrainer(model=model, processing_class=tok, args=config, train_dataset=data,
                          reward_funcs=[reward], callbacks=[timer])
    trainer.train()
    out_dir.cleanup()
    after = _evaluate(trainer.model, tok, problems, args)
    queue.put({"step_seconds": timer.seconds, "after": after, "trl": __import__("trl").__version__,
               "same_prompts": reward.batches == expected})


def _per_step(seconds: list[float]) -> float:
    """Mean step time; the first step (warm-up for both) is left out when there are others."""
    return statistics.mean(seconds[1:] if len(seconds) > 1 else seconds)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps on each side")
    ap.add_argument("--prompts", type=int, default=32, help="arithmetic prompts (ttrl.data.arithmetic_problems)")
    ap.add_argument("--prompts-per-step", type=int, default=8, help="prompts per optimizer step")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (votes = trained samples)")
    ap.add_argument("--new-tokens", type=int, default=8, help="max new tokens per sample, training and eval")
    ap.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward pass")
    ap.add_argument("--eval-samples", type=int, default=16, help="k of avg@k after training")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on each side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the arithmetic generator")
    args = ap.parse_args()
    if (min(args.prompts_per_step, args.prompts) * args.samples) % args.micro_batch:
        ap.error("--micro-batch must divide prompts per step x samples (TRL's gradient accumulation)")

    ours = in_child(run_ttrl, args)
    theirs = in_child(run_trl, args)
    k = args.eval_samples
    t_ours, t_theirs = _per_step(ours["step_seconds"]), _per_step(theirs["step_seconds"])
    acc = {"base": ours["base"][f"avg@{k}"], "ttrl": ours["after"][f"avg@{k}"], "trl": theirs["after"][f"avg@{k}"]}
    print(f"{'trainer':<28}{'s/step':>8}{'steps':>7}{f'avg@{k}':>9}{f'maj@{k}':>8}")
    print(f"{'base model':<28}{'':>8}{'':>7}{acc['base']:>9.3f}{ours['base'][f'maj@{k}']:>8.3f}")
    for name, r, t in (("ttrl.trainer.train", ours, t_ours), (f"trl {theirs['trl']} GRPOTrainer", theirs, t_theirs)):
        print(f"{name:<28}{t:>8.2f}{len(r['step_seconds']):>7}{r['after'][f'avg@{k}']:>9.3f}"
              f"{r['after'][f'maj@{k}']:>8.3f}")
    print(f"ttrl is {t_theirs / t_ours:.2f}x faster per step; avg@{k} {acc['ttrl']:.3f} (ttrl) vs "
          f"{acc['trl']:.3f} (TRL), base {acc['base']:.3f}")
    if not theirs["same_prompts"]:
        print("WARNING: TRL's generation batches did not hold ttrl's prompts of the same steps")
    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "threads": args.threads, "trl": theirs["trl"],
        "steps": args.steps, "prompts": args.prompts, "prompts_per_step": args.prompts_per_step,
        "samples": args.samples, "new_tokens": args.new_tokens, "lr": args.lr,
        "ttrl_step_seconds": round(t_ours, 3), "trl_step_seconds": round(t_theirs, 3),
        "speedup": round(t_theirs / t_ours, 2), "same_prompts_per_step": theirs["same_prompts"],
        f"base_avg@{k}": round(acc["base"], 4), f"ttrl_avg@{k}": round(acc["ttrl"], 4),
        f"trl_avg@{k}": round(acc["trl"], 4),
        "ttrl_step_seconds_all": [round(s, 3) for s in ours["step_seconds"]],
        "trl_step_seconds_all": [round(s, 3) for s in theirs["step_seconds"]],
    }))


if __name__ == "__main__":
    main()

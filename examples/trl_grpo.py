"""TTRL inside TRL: `GRPOTrainer` with ttrl's majority-vote reward, on the embedded
SmolLM2-135M-Instruct and one-digit sums. No label trains the model: the dataset's `answer`
column reaches the reward function only to log `ttrl/label_accuracy` and `ttrl/reward_accuracy`.

    pip install 'ttrl[trl]'
    python examples/trl_grpo.py                         # 16 prompts, 8 steps: minutes on a laptop CPU
    python examples/trl_grpo.py --steps 2 --prompts 8   # a quick look
"""

from __future__ import annotations

import argparse

from ttrl.config import ArithmeticConfig, ModelConfig
from ttrl.data import arithmetic_problems
from ttrl.integrations.trl import MajorityVoteReward, require_trl
from ttrl.models import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps")
    ap.add_argument("--prompts", type=int, default=16, help="unlabeled arithmetic prompts")
    ap.add_argument("--prompts-per-step", type=int, default=4, help="prompts per optimizer step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt: they vote and are trained on")
    ap.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    ap.add_argument("--output-dir", default="runs/trl-grpo", help="where TRL writes the trained model")
    args = ap.parse_args()

    require_trl()  # a clear message naming the extra if trl is missing
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load_model(ModelConfig(name="smollm2-135m"))
    problems = arithmetic_problems(ArithmeticConfig(n=args.prompts))
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"{p.prompt} Answer with just the number."}], "answer": p.answer}
        for p in problems])
    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.steps, learning_rate=args.lr,
        num_generations=args.generations,  # the vote's size: every completion votes and is trained on
        per_device_train_batch_size=args.prompts_per_step * args.generations,  # whole groups per step
        max_completion_length=8, temperature=1.0, top_k=50,
        beta=0.0,  # TTRL trains without a KL penalty, so no reference model is kept
        bf16=False, activation_checkpointing=False, use_cpu=True,  # float32 on CPU; no recomputation
        logging_steps=1, report_to="none", save_strategy="no",
    )
    # A completion cut off at max_completion_length has no answer (as in `ttrl train`).
    reward = MajorityVoteReward(max_completion_length=config.max_completion_length, eos_token_id=tokenizer.eos_token_id)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[reward],
                          args=config, train_dataset=dataset)
    trainer.train()

    print(f"{'step':>4} {'reward':>7} {'majority':>9} {'label acc':>10} {'reward acc':>11}")
    for row in trainer.state.log_history:
        if "ttrl/majority_ratio" in row:
            print(f"{row['step']:>4} {row['reward']:>7.3f} {row['ttrl/majority_ratio']:>9.3f} "
                  f"{row.get('ttrl/label_accuracy', float('nan')):>10.3f} "
                  f"{row.get('ttrl/reward_accuracy', float('nan')):>11.3f}")
    trainer.save_model(args.output_dir)
    print(f"model saved in {args.output_dir}; evaluate it with: ttrl eval --config configs/demo.yaml "
          f"model.name={args.output_dir}")


if __name__ == "__main__":
    main()

"""float32 against bf16 mixed precision (`model.dtype=bfloat16`: float32 trained weights, bf16
forwards under autocast) on the demo's training steps, each dtype in a fresh process: the first
--steps steps of `configs/demo.yaml` (no evaluations), seconds per step split into rollout and the
rest (vote, reward, the update with its KL reference pass), then how far bf16's teacher-forced
log-probs are from float32's on answers its trained model samples (the update's
importance ratio is exp(new - old): a gap of 0.2 nats is already PPO's clip range).

    .venv/bin/python benchmarks/update_dtype.py [--steps 5] [--threads 0]

Last line: one JSON object (`bf16_update_speedup`, `bf16_rollout_speedup`, log-prob gaps).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from _arms import DEMO, run_arm

from _child import in_child


def _gaps(args, queue) -> None:
    """|bf16 - float32| teacher-forced log-probs, as the update scores them, of the answers the
    float32 run's trained model samples (ttrl's sampler, float32) to the demo's first 8 prompts."""
    import torch

    from ttrl.config import ModelConfig, load_config
    from ttrl.data import encode_problems, load_sets
    from ttrl.models import load_model
    from ttrl.rollout import Sampling, TorchSampler
    from ttrl.scoring import score

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    cfg = load_config(args["config"])
    model, tok = load_model(ModelConfig(name=str(Path(args["run"]) / "model")))
    problems, _ = load_sets(cfg)
    prompts = encode_problems(tok, problems[:8], cfg)
    s = Sampling.of(cfg.rollout, n=cfg.rollout.n_votes)
    rollout = TorchSampler(tok).generate(model, prompts, s, list(range(len(prompts))))
    answers = [c or [tok.eos_token_id] for c in rollout.completion_ids]
    with torch.no_grad():
        fp32, mask = score(model, prompts, answers, s.temperature, tok.pad_token_id, group_size=s.n)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, _ = score(model, prompts, answers, s.temperature, tok.pad_token_id, group_size=s.n)
    gap = (bf16 - fp32).abs()[mask.bool()]
    queue.put({"tokens": int(mask.sum()), "mean_gap": round(float(gap.mean()), 4),
               "p99_gap": round(float(gap.quantile(0.99)), 4), "max_gap": round(float(gap.max()), 4),
               "share_over_0.2": round(float((gap > 0.2).float().mean()), 4)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--config", default=str(DEMO))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ttrl-update-dtype-"))
    common = [f"train.steps={args.steps}", "eval.before=false", "eval.every=0", "eval.n_samples=1", "eval.greedy=false"]
    result = {}
    for dtype in ("float32", "bfloat16"):
        t0 = time.perf_counter()
        run = run_arm(root / dtype, [f"model.dtype={dtype}", *common], args.config, args.threads)
        rows = run["rows"][1:]  # the first step also pays for warm-up
        step = sum(r["perf/step_seconds"] for r in rows) / len(rows)
        rollout = sum(r["perf/rollout_seconds"] for r in rows) / len(rows)
        result[dtype] = {"step_s": round(step, 2), "rollout_s": round(rollout, 2), "update_s": round(step - rollout, 2),
                         "rollout_tokens_per_s": round(sum(r["perf/rollout_tokens"] for r in rows)
                                                       / sum(r["perf/rollout_seconds"] for r in rows), 1),
                         "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{dtype}: {result[dtype]}", flush=True)
    gaps = in_child(_gaps, {"run": str(root / "float32"), "config": args.config, "threads": args.threads})
    print(f"bf16 - float32 log-probs on {gaps['tokens']} sampled tokens: {gaps}", flush=True)
    f32, b16 = result["float32"], result["bfloat16"]
    print(json.dumps({"config": Path(args.config).name, "steps": args.steps, "threads": args.threads,
                      "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"), **result,
                      "bf16_update_speedup": round(f32["update_s"] / b16["update_s"], 2),
                      "bf16_rollout_speedup": round(f32["rollout_s"] / b16["rollout_s"], 2),
                      "bf16_step_speedup": round(f32["step_s"] / b16["step_s"], 2), "logprob_gap": gaps}))


if __name__ == "__main__":
    main()

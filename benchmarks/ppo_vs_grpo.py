"""PPO with a critic against GRPO, the two algorithms the TTRL paper runs, on the demo config: the
same seed, prompts, votes, rewards and step budget; only `algorithm.advantage` differs (PPO's
critic at the official scripts' 9e-6). Each side runs in its own process, into DIR/seed-S/ARM
with the arm names of reward_zoo.py (`majority` is GRPO, `majority+algorithm.advantage=ppo` PPO),
and finished runs there are reused (benchmarks/_arms.py).

    .venv/bin/python benchmarks/ppo_vs_grpo.py [--seed 0] [--output-dir DIR] [key=value ...]

Prints, per side, the adapted and held-out avg@16 / maj@16 before and after, seconds per step
(mean of `perf/step_seconds`, and its update part) and the critic's last explained variance; the
last line is one JSON object. `ttrl compare DIR/seed-0/majority*` puts the two runs side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _arms import DEMO, arm_dir, arm_overrides, eval_k, run_arm  # noqa: E402

SIDES = {"grpo": "majority", "ppo": "majority+algorithm.advantage=ppo"}


def figures(run: dict, k: int) -> dict:
    """avg@k and maj@k of both sets before (base) and after, and the per-step costs and signals."""
    evals, rows = run["evals"], run["rows"]
    out = {}
    for name in ("adapt", "heldout"):
        base, after = evals[name][0], evals[name][-1]
        out[name] = {"base_avg": base[f"avg@{k}"], "base_maj": base[f"maj@{k}"],
                     "avg": after[f"avg@{k}"], "maj": after[f"maj@{k}"]}
    step_s = [r["perf/step_seconds"] for r in rows]
    rollout_s = [r["perf/rollout_seconds"] for r in rows]
    out["steps"] = len(rows)
    out["step_seconds"] = round(statistics.mean(step_s), 2)
    out["update_seconds"] = round(statistics.mean(s - r for s, r in zip(step_s, rollout_s)), 2)
    out["train_reward_last5"] = round(statistics.mean(r["train/reward"] for r in rows[-5:]), 3)
    out["majority_ratio_last"] = rows[-1]["train/majority_ratio"]
    if "critic/explained_variance" in rows[-1]:
        ev = [r["critic/explained_variance"] for r in rows[-5:] if r.get("critic/explained_variance") is not None]
        out["critic_explained_variance_last5"] = round(statistics.mean(ev), 3) if ev else None
        out["critic_values_last"] = round(rows[-1]["critic/values"], 3)
    out["train_s"] = run["train_s"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(DEMO))
    ap.add_argument("--output-dir", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="ttrl-ppo-vs-grpo-"))
    results = {}
    for side, arm in SIDES.items():
        overrides = [*arm_overrides(arm), f"algorithm.advantage={side}", f"train.seed={args.seed}", *args.overrides]
        run = run_arm(arm_dir(root, args.seed, arm), overrides, args.config)
        k = eval_k(run["evals"])
        results[side] = figures(run, k)
        print(f"{side}: {'reused' if run['reused'] else 'trained'}, {run['train_s']:.0f} s of training steps",
              flush=True)
    print(f"\n{'':6} {'adapt avg@' + str(k):>13} {'maj':>6} {'held-out avg':>13} {'maj':>6} {'s/step':>7} "
          f"{'update s':>9}")
    base = results["grpo"]
    print(f"{'base':6} {base['adapt']['base_avg']:13.3f} {base['adapt']['base_maj']:6.3f} "
          f"{base['heldout']['base_avg']:13.3f} {base['heldout']['base_maj']:6.3f}")
    for side, r in results.items():
        print(f"{side:6} {r['adapt']['avg']:13.3f} {r['adapt']['maj']:6.3f} {r['heldout']['avg']:13.3f} "
              f"{r['heldout']['maj']:6.3f} {r['step_seconds']:7.2f} {r['update_seconds']:9.2f}")
    print(f"runs in {root} (ttrl compare {root}/seed-{args.seed}/majority*)")
    print(json.dumps({"config": Path(args.config).name, "overrides": args.overrides, "seed": args.seed,
                      "machine": f"{platform.machine()} {platform.processor()}".strip(),
                      "date": time.strftime("%Y-%m-%d"), **results,
                      "ppo_minus_grpo_avg": {n: round(results["ppo"][n]["avg"] - results["grpo"][n]["avg"], 4)
                                             for n in ("adapt", "heldout")},
                      "step_seconds_ratio": round(results["ppo"]["step_seconds"] / results["grpo"]["step_seconds"], 2)}))


if __name__ == "__main__":
    main()

"""Label-free rewards side by side: the same trainer, data and budget (the demo config,
configs/demo.yaml: 32 prompts adapted on, 32 held out), one run per arm and seed, each in a fresh
process, GRPO. Prints a table per seed and the mean and spread over seeds; the last line is JSON.

    .venv/bin/python benchmarks/reward_zoo.py [--config demo.yaml] [--steps 30] [--seeds 0,1,2] [--arms majority,soft_majority]
        [--threads 1] [--output-dir DIR] [key=value ...]

An arm is a reward kind (ttrl.rewards.KINDS, the controls `format` and `random` included),
optionally followed by `+key=value` settings for that arm alone, e.g.
`majority+rollout.vote_round=4+rollout.vote_confidence=0.95` (TTRL with sequential voting).
Per arm: adapted and held-out avg@16 after training, the mean label accuracy over steps (gold,
read only here), the last step's train majority ratio, the votes and rollout tokens per step,
seconds per step, and the step at which the collapse watch fired (if it did). Runs live in
DIR/seed-S/ARM and finished ones are reused (benchmarks/_arms.py): controls.py and ppo_vs_grpo.py
train some of the same arms into the same layout.
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

DEFAULT_ARMS = "majority,soft_majority,penalized_majority,semantic_entropy,similarity,neg_entropy,self_certainty," \
               "format,random"


def figures(run: dict) -> dict:
    """An arm's figures from its run: avg@k after, the base model's (step 0), and per-step signals."""
    evals, rows = run["evals"], run["rows"]
    k = eval_k(evals)
    mean = lambda key: statistics.fmean(r[key] for r in rows if r.get(key) is not None)  # noqa: E731
    votes, prompts = run["config"]["rollout"]["n_votes"], run["config"]["train"]["prompts_per_step"]
    for r in rows:  # runs from before these two were logged drew all N votes of every prompt
        r.setdefault("train/votes_drawn", votes)
        r.setdefault("perf/rollout_tokens", r["train/response_length"] * votes * prompts)
    return {"base": {s: {"avg": evals[s][0][f"avg@{k}"], "maj": evals[s][0][f"maj@{k}"]}
                     for s in ("adapt", "heldout") if evals[s][0]["step"] == 0},
            "adapt_avg": evals["adapt"][-1][f"avg@{k}"], "heldout_avg": evals["heldout"][-1][f"avg@{k}"],
            "adapt_maj": evals["adapt"][-1][f"maj@{k}"],
            "label_accuracy": mean("train/label_accuracy"), "final_majority_ratio": rows[-1]["train/majority_ratio"],
            "votes_drawn": mean("train/votes_drawn"), "rollout_tokens": mean("perf/rollout_tokens"),
            "rollout_s": mean("perf/rollout_seconds"), "step_s": mean("perf/step_seconds"),
            "collapse_step": next((r["step"] for r in rows if r.get("collapse_warning")), None),
            "train_s": run["train_s"]}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEMO))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--arms", "--rewards", default=DEFAULT_ARMS, help="comma-separated arms (see above)")
    ap.add_argument("--advantage", default="grpo")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--output-dir", help="keep the runs here, DIR/seed-S/ARM (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="ttrl-zoo-"))
    seeds, arms = [int(s) for s in args.seeds.split(",")], args.arms.split(",")
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    base = {}
    for seed in seeds:
        for arm in arms:
            overrides = [*arm_overrides(arm), f"train.steps={args.steps}", f"algorithm.advantage={args.advantage}",
                         f"train.seed={seed}", *args.overrides]
            out = figures(run_arm(arm_dir(root, seed, arm), overrides, args.config, args.threads))
            base.setdefault(seed, out.pop("base"))
            runs[arm].append({"seed": seed, **out})
            print(f"seed {seed} {arm}: adapt avg@16 {base[seed]['adapt']['avg']:.3f} -> {out['adapt_avg']:.3f}, "
                  f"held-out {out['heldout_avg']:.3f}, {out['votes_drawn']:.1f} votes, "
                  f"{out['step_s']:.1f} s/step", flush=True)
    summary = {arm: {key: spread([r[key] for r in rs]) for key in
                     ("adapt_avg", "heldout_avg", "label_accuracy", "final_majority_ratio", "votes_drawn",
                      "rollout_tokens", "rollout_s", "step_s")} for arm, rs in runs.items()}
    print(f"\n{len(seeds)} seed(s), {args.steps} steps; mean [min, max] over seeds")
    print(f"{'arm':<58}{'adapt avg@16':>22}{'held-out avg@16':>22}{'votes':>7}{'tokens':>8}{'s/step':>8}")
    for arm, s in summary.items():
        cell = lambda key: f"{s[key]['mean']:.3f} [{s[key]['min']:.3f}, {s[key]['max']:.3f}]"  # noqa: E731
        print(f"{arm:<58}{cell('adapt_avg'):>22}{cell('heldout_avg'):>22}{s['votes_drawn']['mean']:>7.1f}"
              f"{s['rollout_tokens']['mean']:>8.0f}{s['step_s']['mean']:>8.1f}")
    print(f"runs in {root}")
    print(json.dumps({"steps": args.steps, "advantage": args.advantage, "seeds": seeds, "overrides": args.overrides,
                      "threads": args.threads or None, "machine": f"{platform.machine()} {platform.processor()}".strip(),
                      "date": time.strftime("%Y-%m-%d"), "base": {str(s): b for s, b in base.items()},
                      "summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()

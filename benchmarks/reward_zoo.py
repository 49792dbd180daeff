"""Label-free rewards side by side: the same trainer, data and budget (the demo config,
configs/demo.yaml: 32 prompts adapted on, 32 held out), one run per arm and seed, each in a fresh
process, GRPO. Prints a table per seed and the mean and spread over seeds; the last line is JSON.

    .venv/bin/python benchmarks/reward_zoo.py [--steps 30] [--seeds 0,1,2] [--arms majority,soft_majority]
        [--threads 1] [--output-dir DIR] [key=value ...]

An arm is a reward kind (ttrl.rewards.KINDS, the controls `format` and `random` included),
optionally followed by `+key=value` settings for that arm alone, e.g.
`majority+rollout.vote_round=4+rollout.vote_confidence=0.95` (TTRL with sequential voting).
Per arm: adapted and held-out avg@16 after training, the mean label accuracy over steps (gold,
read only here), the last step's train majority ratio, the votes and rollout tokens per step,
seconds per step, and the step at which the collapse watch fired (if it did).
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
from _child import in_child  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARMS = "majority,soft_majority,penalized_majority,semantic_entropy,similarity,neg_entropy,self_certainty," \
               "format,random"


def arm_overrides(arm: str) -> list[str]:
    """`kind+key=value+...` -> [reward.kind=kind, key=value, ...]."""
    kind, *extra = arm.split("+")
    return [f"reward.kind={kind}", *extra]


def run_arm(args, queue) -> None:
    """One arm and seed in a fresh process: train, then put its figures on `queue`."""
    overrides, run_dir, threads = args
    import torch

    from ttrl.config import load_config
    from ttrl.metrics import read_metrics
    from ttrl.trainer import train

    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    summary = train(cfg, run_dir, quiet=True)
    rows = [r for r in read_metrics(Path(run_dir)) if "train/reward" in r]
    mean = lambda key: statistics.fmean(r[key] for r in rows if r.get(key) is not None)  # noqa: E731
    k = cfg.eval.n_samples
    evals = summary["evals"]
    collapse = next((r["step"] for r in rows if r.get("collapse_warning")), None)
    queue.put({"base": {s: {"avg": evals[s][0][f"avg@{k}"], "maj": evals[s][0][f"maj@{k}"]}
                        for s in ("adapt", "heldout") if evals[s][0]["step"] == 0},
               "adapt_avg": evals["adapt"][-1][f"avg@{k}"], "heldout_avg": evals["heldout"][-1][f"avg@{k}"],
               "adapt_maj": evals["adapt"][-1][f"maj@{k}"],
               "label_accuracy": mean("train/label_accuracy"), "final_majority_ratio": rows[-1]["train/majority_ratio"],
               "votes_drawn": mean("train/votes_drawn"), "rollout_tokens": mean("perf/rollout_tokens"),
               "rollout_s": mean("perf/rollout_seconds"), "step_s": mean("perf/step_seconds"),
               "collapse_step": collapse, "wall_s": round(time.time() - t0, 1)})


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        for i, arm in enumerate(arms):
            overrides = [*arm_overrides(arm), f"train.steps={args.steps}", f"algorithm.advantage={args.advantage}",
                         f"train.seed={seed}", "eval.greedy=false", f"eval.before={'true' if i == 0 else 'false'}",
                         *args.overrides]
            out = in_child(run_arm, (overrides, str(root / f"seed-{seed}" / arm), args.threads))
            base.setdefault(seed, out.pop("base"))  # the base model's figures come with a seed's first arm
            runs[arm].append({"seed": seed, **out})
            print(f"seed {seed} {arm}: adapt avg@16 {base[seed]['adapt']['avg']:.3f} -> {out['adapt_avg']:.3f}, "
                  f"held-out {out['heldout_avg']:.3f}, {out['votes_drawn']:.1f} votes, "
                  f"{out['step_s']:.1f} s/step, {out['wall_s']:.0f} s", flush=True)
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

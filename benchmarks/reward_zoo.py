"""Label-free rewards side by side: the same trainer, data and budget (the reproduction task,
configs/demo.yaml), one run per reward, GRPO. Prints one table; last line is JSON.

    .venv/bin/python benchmarks/reward_zoo.py [--steps 15] [--rewards majority,neg_entropy]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ttrl.config import load_config
from ttrl.metrics import read_metrics
from ttrl.rewards import KINDS
from ttrl.trainer import train

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rewards", default=",".join(KINDS))
    ap.add_argument("--advantage", default="grpo")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = None
    table = []
    for i, kind in enumerate(args.rewards.split(",")):
        cfg = load_config(ROOT / "configs" / "demo.yaml",
                          [f"reward.kind={kind}", f"train.steps={args.steps}", f"algorithm.advantage={args.advantage}",
                           "data.holdout=0", "eval.greedy=false", f"eval.before={'true' if i == 0 else 'false'}",
                           *args.overrides])
        k = cfg.eval.n_samples
        t0 = time.time()
        run_dir = Path(tempfile.mkdtemp(prefix=f"ttrl-zoo-{kind}-"))
        summary = train(cfg, run_dir, quiet=True)
        wall = time.time() - t0
        adapt = summary["evals"]["adapt"]
        if base is None:
            base = {"avg": adapt[0][f"avg@{k}"], "maj": adapt[0][f"maj@{k}"]}
        rows = [r for r in read_metrics(run_dir) if "train/label_accuracy" in r]
        table.append({"reward": kind, "base_avg16": base["avg"], "base_maj16": base["maj"],
                      "after_avg16": adapt[-1][f"avg@{k}"],
                      "label_accuracy": sum(r["train/label_accuracy"] for r in rows) / max(1, len(rows)),
                      "final_majority_ratio": adapt[-1]["majority_ratio"], "wall_s": round(wall, 1)})
        print(f"done {kind}: avg@{k} {base['avg']:.3f} -> {adapt[-1][f'avg@{k}']:.3f} in {wall:.0f} s", flush=True)
    print(f"\n{'reward':<18}{'base avg@16':>12}{'after avg@16':>13}{'label acc':>10}{'wall s':>8}")
    for r in table:
        print(f"{r['reward']:<18}{r['base_avg16']:>12.3f}{r['after_avg16']:>13.3f}{r['label_accuracy']:>10.3f}"
              f"{r['wall_s']:>8.0f}")
    print(json.dumps({"steps": args.steps, "advantage": args.advantage, "base_maj16": base["maj"], "runs": table}))


if __name__ == "__main__":
    main()

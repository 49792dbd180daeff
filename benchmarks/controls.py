"""Is the gain the vote? TTRL (majority-vote reward) beside two control arms whose reward ignores
the vote — `format` (1 for any answer) and `random` (a fair coin) — on the demo config, same
seed and step budget, each run in its own process; repeated over seeds. Runs live in
DIR/seed-S/ARM and finished ones are reused (benchmarks/_arms.py): reward_zoo.py shares them.

    .venv/bin/python benchmarks/controls.py [--seeds 0,1] [--output-dir DIR] [key=value ...]

Prints per seed and arm the adapted and held-out avg@16 / maj@16, the margin of TTRL over the
best control, and TTRL's margins over the base model's greedy answer and maj@16 (the bar to beat
is the better of the two). `ttrl compare DIR/seed-0/*` puts a seed's arms side by side. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _arms import DEMO, arm_dir, arm_overrides, eval_k, run_arm  # noqa: E402

ARMS = ("majority", "format", "random")


def figures(evals: dict, k: int, when: int) -> dict:
    """avg@k, maj@k (and greedy) of the adapted and held-out sets at evaluation `when` (0 base, -1 end)."""
    out = {}
    for name in ("adapt", "heldout"):
        row = evals[name][when]
        out[name] = {"avg": row[f"avg@{k}"], "maj": row[f"maj@{k}"], "greedy": row.get("greedy")}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--config", default=str(DEMO))
    ap.add_argument("--output-dir", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="ttrl-controls-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for seed in seeds:
        runs = {}
        for arm in ARMS:
            overrides = [*arm_overrides(arm), f"train.seed={seed}", *args.overrides]
            runs[arm] = run_arm(arm_dir(root, seed, arm), overrides, args.config)
            print(f"seed {seed} {arm}: {'reused' if runs[arm]['reused'] else 'trained'}, "
                  f"{runs[arm]['train_s']:.0f} s of training steps", flush=True)
        k = eval_k(runs["majority"]["evals"])
        base = figures(runs["majority"]["evals"], k, 0)
        after = {arm: figures(r["evals"], k, -1) for arm, r in runs.items()}
        row = {"seed": seed, "base": base, "after": after, "train_s": {a: r["train_s"] for a, r in runs.items()}}
        for name in ("adapt", "heldout"):
            ttrl = after["majority"][name]["avg"]
            best_control = max(after[a][name]["avg"] for a in ARMS if a != "majority")
            bar = max(v for v in (base[name]["greedy"], base[name]["maj"]) if v is not None)
            row[f"{name}_margin_over_best_control"] = ttrl - best_control
            row[f"{name}_margin_over_base_greedy"] = None if base[name]["greedy"] is None else ttrl - base[name]["greedy"]
            row[f"{name}_margin_over_base_maj"] = ttrl - base[name]["maj"]
            row[f"{name}_margin_over_bar"] = ttrl - bar
        results.append(row)
        _print_seed(row, k)
    margins = {name: [r[f"{name}_margin_over_best_control"] for r in results] for name in ("adapt", "heldout")}
    print("\nmargin of TTRL avg@k over the best control: "
          + "; ".join(f"{n} {min(v):+.3f} .. {max(v):+.3f}" for n, v in margins.items()))
    print(f"runs in {root} (ttrl compare {root}/seed-{seeds[0]}/*)")
    print(json.dumps({"config": Path(args.config).name, "overrides": args.overrides, "seeds": seeds,
                      "machine": f"{platform.machine()} {platform.processor()}".strip(),
                      "date": time.strftime("%Y-%m-%d"), "results": results,
                      "min_margin_over_best_control": {n: min(v) for n, v in margins.items()}}))


def _print_seed(row: dict, k: int) -> None:
    print(f"\nseed {row['seed']}          adapt avg@{k}  maj@{k}   held-out avg@{k}  maj@{k}")
    base = row["base"]
    for name, src in [("base greedy", None), ("base", base)] + [(arm, row["after"][arm]) for arm in ARMS]:
        if src is None:
            a, h = base["adapt"]["greedy"], base["heldout"]["greedy"]
            print(f"  {name:<14} {a if a is None else f'{a:10.3f}':>10} {'':>7}   {h if h is None else f'{h:14.3f}':>14}")
            continue
        print(f"  {name:<14} {src['adapt']['avg']:10.3f} {src['adapt']['maj']:7.3f}   "
              f"{src['heldout']['avg']:14.3f} {src['heldout']['maj']:7.3f}")
    for name in ("adapt", "heldout"):
        print(f"  {name}: TTRL - best control {row[f'{name}_margin_over_best_control']:+.3f}, "
              f"- base maj {row[f'{name}_margin_over_base_maj']:+.3f}, - best of base greedy/maj "
              f"{row[f'{name}_margin_over_bar']:+.3f}")


if __name__ == "__main__":
    main()

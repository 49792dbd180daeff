"""Is the gain the vote? TTRL (majority-vote reward) beside two control arms whose reward ignores
the vote — `format` (1 for any answer) and `random` (a fair coin) — on the demo config, same
seed and step budget, each run in its own process; repeated over seeds. Runs live in
DIR/seed-S/ARM and finished ones are reused (benchmarks/_arms.py): reward_zoo.py shares them.

    .venv/bin/python benchmarks/controls.py [--seeds 0,1,2,3,4] [--ttrl ARM,...] [--output-dir DIR] [key=value ...]

The TTRL arms (--ttrl) are ttrl's defaults (`majority`: labels contrasted across prompts, cosine
schedule, KL 0.001, the collapse guard) and the paper's plain vote as `--config demo_plain` runs it
(plain majority, constant rate, no KL, no guard); each seed's guard picks are printed and kept
(`handed_back`). Prints per seed and arm the
adapted and held-out avg@16 / maj@16, each TTRL arm's margin over the best control, and its
margins over the base model's greedy answer and maj@16 (the bar to beat is the better of the
two). `ttrl compare DIR/seed-0/ARM DIR/seed-0/format DIR/seed-0/random` puts a seed's arms side
by side, with the TTRL arm's margin over each control prompt by prompt (± 2 se). The last line is
one JSON object.

On the arithmetic generator (the demo), each final model and the base model are also evaluated
(`ttrl eval RUN data.eval=[DIR/unseen.jsonl]`, into DIR/seed-S/untrained/ARM.json) on the
questions the generator could make but data.arithmetic.n leaves out (36 one-digit sums for the
demo, the same for every seed): with the held-out prompts, every question an arm never trained
on, so the held-out margin is judged on 68 prompts rather than 32 (`untrained` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _arms import DEMO, arm_dir, arm_overrides, eval_k, run_arm  # noqa: E402

CONTROLS = ("format", "random")
TTRL = "majority,majority+reward.contrast=false+algorithm.lr_schedule=constant+algorithm.warmup_ratio=0+algorithm.kl_coef=0+train.guard=warn"


def figures(evals: dict, k: int, when: int) -> dict:
    """avg@k, maj@k (and greedy) of the adapted and held-out sets at evaluation `when` (0 base, -1 end)."""
    out = {}
    for name in ("adapt", "heldout"):
        row = evals[name][when]
        out[name] = {"avg": row[f"avg@{k}"], "maj": row[f"maj@{k}"], "greedy": row.get("greedy")}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--ttrl", default=TTRL, help="TTRL arms, comma-separated `kind+key=value` (default: %(default)s)")
    ap.add_argument("--config", default=str(DEMO))
    ap.add_argument("--output-dir", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="ttrl-controls-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    ttrl_arms = args.ttrl.split(",")
    arms = (*ttrl_arms, *CONTROLS)
    unseen = write_unseen(root, args.config, args.overrides)
    results = []
    for seed in seeds:
        runs = {}
        for arm in arms:
            overrides = [*arm_overrides(arm), f"train.seed={seed}", *args.overrides]
            runs[arm] = run_arm(arm_dir(root, seed, arm), overrides, args.config)
            print(f"seed {seed} {arm}: {'reused' if runs[arm]['reused'] else 'trained'}, "
                  f"{runs[arm]['train_s']:.0f} s of training steps", flush=True)
        k = eval_k(runs[ttrl_arms[0]]["evals"])
        base = figures(runs[ttrl_arms[0]]["evals"], k, 0)
        after = {arm: figures(r["evals"], k, -1) for arm, r in runs.items()}
        row = {"seed": seed, "base": base, "after": after, "train_s": {a: r["train_s"] for a, r in runs.items()},
               "handed_back": {a: r["handed_back"] for a, r in runs.items()},
               "margins": {arm: margins(after[arm], after, base, _noise(runs, arm, after, k)) for arm in ttrl_arms},
               "greedy_change": {arm: greedy_change(runs[arm]["evals"]) for arm in ttrl_arms}}
        if unseen:
            row["untrained"] = untrained(root, seed, arms, ttrl_arms, args.config, args.overrides, unseen)
        results.append(row)
        _print_seed(row, k, arms)
    least = {arm: {n: min(r["margins"][arm][n]["over_best_control"] for r in results) for n in ("adapt", "heldout")}
             for arm in ttrl_arms}
    if unseen:
        for arm in ttrl_arms:
            least[arm]["untrained"] = min(r["untrained"]["margins"][arm]["over_best_control"] for r in results)
    for arm, m in least.items():
        print(f"\n{arm}: smallest margin of avg@{k} over the best control: adapt {m['adapt']:+.3f}, "
              f"held-out {m['heldout']:+.3f}" + (f", untrained {m['untrained']:+.3f}" if "untrained" in m else ""))
    first = root / f"seed-{seeds[0]}"
    print(f"runs in {root} (" + shlex.join(["ttrl", "compare", str(first / ttrl_arms[0]),
                                            *(str(first / c) for c in CONTROLS)]) + ")")
    print(json.dumps({"config": Path(args.config).name, "overrides": args.overrides, "seeds": seeds,
                      "machine": f"{platform.machine()} {platform.processor()}".strip(),
                      "date": time.strftime("%Y-%m-%d"), "results": results,
                      "min_margin_over_best_control": least}))


def write_unseen(root: Path, config: str, overrides: list[str]) -> Path | None:
    """DIR/unseen.jsonl: the arithmetic questions past data.arithmetic.n (none trained on, whatever
    the seed); None when data.train is not the generator or it draws every question."""
    from dataclasses import replace

    from ttrl.config import load_config
    from ttrl.data import arithmetic_problems

    data = load_config(config, overrides).data
    if data.train != "arithmetic":
        return None
    every = replace(data.arithmetic, n=len(data.arithmetic.ops) * (data.arithmetic.high - data.arithmetic.low + 1) ** 2)
    rest = arithmetic_problems(every)[data.arithmetic.n:]
    if not rest:
        return None
    path = root / "unseen.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": p.id, "problem": p.prompt, "answer": p.answer, "choices": p.choices})
                            + "\n" for p in rest))
    return path


def untrained(root: Path, seed: int, arms: tuple, ttrl_arms: list, config: str, overrides: list[str],
              unseen: Path) -> dict:
    """Each arm's and the base model's avg@k over every question it never trained on (held-out ∪
    unseen), and each TTRL arm's margin over the best control there with its paired standard error.
    Evaluations are kept in DIR/seed-S/untrained/ and reused."""
    from statistics import mean

    from ttrl.evaluation import standard_error

    where = root / f"seed-{seed}" / "untrained"
    where.mkdir(parents=True, exist_ok=True)
    extra = [f"data.eval=[{unseen}]"]
    per, greedy_of = {}, {}
    for arm in ("base", *arms):
        out = where / f"{arm}.json"
        if not out.is_file():
            target = (["--config", str(config), f"train.seed={seed}", *overrides] if arm == "base"
                      else [str(arm_dir(root, seed, arm))])
            subprocess.run([sys.executable, "-m", "ttrl", "eval", *target, *extra, "--json", str(out) + ".part"],
                           check=True, stdout=subprocess.DEVNULL)
            Path(str(out) + ".part").replace(out)
        problems = [p for name in ("heldout", unseen.stem) for p in json.loads(out.read_text())["sets"][name]["problems"]]
        per[arm] = {p["id"]: p["n_correct"] / p["n_samples"] for p in problems}
        greedy_of[arm] = {p["id"]: p["greedy_correct"] for p in problems}
        if arm == "base":  # the bar to beat there: the better of its greedy answer and maj@k
            greedy = [p["greedy_correct"] for p in problems]
            base = {"maj": mean(float(p["maj_correct"]) for p in problems),
                    "greedy": None if None in greedy else mean(map(float, greedy))}
    avg = {arm: mean(v.values()) for arm, v in per.items()}
    best = max(CONTROLS, key=avg.get)
    after = {arm: {"untrained": {"avg": v}} for arm, v in avg.items()}  # one set, in figures()' shape
    se = {arm: standard_error([v - per[best][pid] for pid, v in per[arm].items()]) for arm in ttrl_arms}
    moved = {arm: [float(v) - float(greedy_of["base"][pid]) for pid, v in greedy_of[arm].items()
                   if v is not None and greedy_of["base"].get(pid) is not None] for arm in ttrl_arms}
    return {"n_prompts": len(per["base"]), "avg": avg, "base": base, "best_control": best,
            "greedy_change": {arm: [mean(d), standard_error(d)] if d else None for arm, d in moved.items()},
            "margins": {arm: margins(after[arm], after, {"untrained": base}, {"untrained": se[arm]})["untrained"]
                        for arm in ttrl_arms}}


def greedy_change(evals: dict) -> dict:
    """Per set, the arm's final greedy accuracy minus the base model's (its step-0 evaluation), with
    the standard error of the per-prompt differences: {set: [change, se]} (None without greedy scores)."""
    from ttrl.evaluation import paired_change

    out = {}
    for name in ("adapt", "heldout"):
        change = paired_change(evals[name][0], evals[name][-1], "greedy")
        out[name] = None if change is None else [change[0], change[1]]
    return out


def _noise(runs: dict, arm: str, after: dict, k: int) -> dict:
    """Per set, the standard error of the arm's margin over the best control, paired by prompt
    (`ttrl.evaluation.paired_change`); None for runs from before evaluations kept per-prompt scores."""
    from ttrl.evaluation import paired_change

    out = {}
    for name in ("adapt", "heldout"):
        best = max(CONTROLS, key=lambda a: after[a][name]["avg"])
        change = paired_change(runs[best]["evals"][name][-1], runs[arm]["evals"][name][-1], f"avg@{k}")
        out[name] = None if change is None else change[1]
    return out


def margins(ttrl: dict, after: dict, base: dict, noise: dict | None = None) -> dict:
    """A TTRL arm's avg@k minus: the best control's (with that margin's paired standard error, where
    known), the base greedy answer, the base maj@k, and the better of those two (the bar to beat), per
    set of `ttrl`."""
    out = {}
    for name in ttrl:
        avg, greedy = ttrl[name]["avg"], base[name]["greedy"]
        out[name] = {"over_best_control": avg - max(after[a][name]["avg"] for a in CONTROLS),
                     "over_best_control_se": (noise or {}).get(name),
                     "over_base_greedy": None if greedy is None else avg - greedy,
                     "over_base_maj": avg - base[name]["maj"],
                     "over_bar": avg - max(v for v in (greedy, base[name]["maj"]) if v is not None)}
    return out


def _print_seed(row: dict, k: int, arms: tuple) -> None:
    print(f"\nseed {row['seed']}          adapt avg@{k}  maj@{k}   held-out avg@{k}  maj@{k}")
    base = row["base"]
    a, h = base["adapt"]["greedy"], base["heldout"]["greedy"]
    print(f"  {'base greedy':<32} {'—' if a is None else f'{a:.3f}':>10} {'':>7}   {'—' if h is None else f'{h:.3f}':>14}")
    for name, src in [("base", base)] + [(arm, row["after"][arm]) for arm in arms]:
        print(f"  {name:<32} {src['adapt']['avg']:10.3f} {src['adapt']['maj']:7.3f}   "
              f"{src['heldout']['avg']:14.3f} {src['heldout']['maj']:7.3f}")
    for arm, picked in row["handed_back"].items():
        if picked and picked.get("collapse_step"):  # the guard's pick, where the collapse watch fired
            print(f"  {arm}: model of step {picked['step']}: {picked['why']}")
    for arm, m in row["margins"].items():
        se = lambda n: "" if m[n].get("over_best_control_se") is None else f" ± {2 * m[n]['over_best_control_se']:.3f}"  # noqa: E731
        print(f"  {arm}: " + "; ".join(
            f"{n} - best control {m[n]['over_best_control']:+.3f}{se(n)}, - base maj {m[n]['over_base_maj']:+.3f}, "
            f"- bar {m[n]['over_bar']:+.3f}" for n in ("adapt", "heldout")))
    if "untrained" in row:
        u = row["untrained"]
        print(f"  untrained ({u['n_prompts']} prompts: held out and never drawn) avg@{k}: "
              + ", ".join(f"{a} {v:.3f}" for a, v in u["avg"].items()))
        print(f"  untrained base greedy {'—' if u['base']['greedy'] is None else format(u['base']['greedy'], '.3f')}, "
              f"maj@{k} {u['base']['maj']:.3f}")
        for arm, m in u["margins"].items():
            print(f"  {arm}: untrained - best control ({u['best_control']}) {m['over_best_control']:+.3f} "
                  f"± {2 * m['over_best_control_se']:.3f}, - base maj {m['over_base_maj']:+.3f}, - bar {m['over_bar']:+.3f}")


if __name__ == "__main__":
    main()

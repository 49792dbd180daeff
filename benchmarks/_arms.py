"""One arm of a training benchmark: a run of a config with an arm's overrides, trained in a fresh
process into DIR/seed-S/ARM and read back from that run directory.

A finished run already there whose config.json agrees with the arm's settings is reused, not
retrained: benchmarks that share arms (controls.py, reward_zoo.py, ppo_vs_grpo.py all train
`majority` on the demo config) share runs when given the same --output-dir, an interrupted
benchmark goes on where it stopped, and runs made with `ttrl train` into that layout (e.g. two at
a time on two cores) count too. A run there that is not finished is trained again from scratch.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _child import in_child  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


def arm_overrides(arm: str) -> list[str]:
    """`kind+key=value+...` -> [reward.kind=kind, key=value, ...]."""
    kind, *extra = arm.split("+")
    return [f"reward.kind={kind}", *extra]


def arm_dir(root: Path, seed: int, arm: str) -> Path:
    return Path(root) / f"seed-{seed}" / arm


def _train(args, queue) -> None:
    config, overrides, run_dir, threads = args
    import torch

    from ttrl.config import load_config
    from ttrl.trainer import train

    if threads:
        torch.set_num_threads(threads)
    train(load_config(config, overrides), run_dir, quiet=True)
    queue.put({})


def matches(run_dir: Path, config: str | Path, overrides: list[str]) -> bool:
    """A finished run in `run_dir` trained with these settings (keys its version did not have aside)."""
    from ttrl.config import flatten, load_config

    path = Path(run_dir)
    if not (path / "summary.json").is_file() or not (path / "config.json").is_file():
        return False
    done = flatten(json.loads((path / "config.json").read_text()))
    want = flatten(json.loads(json.dumps(load_config(config, overrides).to_dict(), default=str)))
    return all(done[k] == v for k, v in want.items() if k in done)


def run_arm(run_dir: str | Path, overrides: list[str], config: str | Path = DEMO, threads: int = 0) -> dict:
    """Train (or reuse) one arm; returns {"evals": summary's evals, "rows": per-step metrics rows,
    "config": the run's config.json, "train_s": seconds of the training steps (evaluations
    excluded), "handed_back": summary.json's `model` (which step's model the run exported and
    why: train.guard), "reused": bool}."""
    from ttrl.rundir import load_run

    run_dir = Path(run_dir)
    reused = matches(run_dir, config, overrides)
    if not reused:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        in_child(_train, (str(config), overrides, str(run_dir), threads))
    run = load_run(run_dir)
    rows = [r for r in run.steps if "train/reward" in r]
    train_s = round(sum(r.get("perf/step_seconds", 0.0) for r in rows), 1)
    return {"evals": run.evals, "rows": rows, "config": run.config, "train_s": train_s,
            "handed_back": run.handed_back, "reused": reused}


def eval_k(evals: dict) -> int:
    """The k of the evaluations' avg@k."""
    return int(next(key for key in evals["adapt"][0] if key.startswith("avg@"))[4:])

"""Starting a run: what marks a run directory, the checks made before anything is written, the
environment recorded beside it, and `train` / `evaluate_sets` as `ttrl train` / `ttrl eval` run
them, for use from Python too. (Reading a run directory back is ttrl.rundir.)

Order matters for the user's files: every input is checked (config, data, held-out split, model
directory, output path) before the directory is touched, and an existing directory is replaced
only when it holds a ttrl run and `overwrite` was asked for."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ttrl.config import Config, ConfigError, ModelConfig, load_config
from ttrl.data import load_sets, run_sets
from ttrl.metrics import write_atomic
from ttrl.models import ADAPTER_CONFIG, EMBEDDED, ModelError, adapter_base, resolve
from ttrl.rundir import ENVIRONMENT_FILE

def _json_object(path: Path) -> dict:
    if not path.is_file() or path.stat().st_size > 10_000_000:  # never a device or a huge file
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


RUN_ENTRIES = ("config.json", "environment.json", "metrics.jsonl", "metrics.csv", "rollouts.jsonl", "summary.json",
               "checkpoints", "model", "tensorboard", "wandb", "report", "report.html", "report.md")
"""What `ttrl train` (and `ttrl report`) write in a run directory: all that --overwrite removes."""


def holds_run(path: str | Path) -> bool:
    """True when `path` holds what only a ttrl run writes: ttrl's config.json or environment.json, a
    summary with evaluations, or a checkpoint of ttrl's (step-*/state.json). Another tool's
    `checkpoints/` or `metrics.jsonl`, or a model directory's config.json, does not count."""
    path = Path(path)
    if {"model", "rollout", "reward"} <= _json_object(path / "config.json").keys():
        return True
    if any((path / "checkpoints").glob("step-*/state.json")):
        return True
    return "ttrl" in _json_object(path / "environment.json") or "evals" in _json_object(path / "summary.json")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """Fail now, not after hours of work, when `path` can never be written."""
    ancestor = _nearest_existing(path if not path.exists() else path.parent)
    if not ancestor.is_dir():
        raise ConfigError(f"{what} {path} is below {ancestor}, which is a file; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {ancestor} is not writable (permission denied); choose another path")


def check_output_dir(path: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Everything known about the run directory before any work: a usable path, and a directory
    that is empty, or holds a run to resume (`resume`) or to replace (`overwrite`)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --output-dir: give --output-dir, and not --overwrite")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output directory {path} is a file; choose another --output-dir")
    check_writable(path, "output directory")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not holds_run(path):
        raise ConfigError(f"output directory {path} is not empty and holds no ttrl run (no config.json, "
                          "environment.json or checkpoint of ttrl); ttrl replaces only its own runs, even with "
                          "--overwrite: choose another --output-dir")
    if not resume and not overwrite:
        raise ConfigError(f"output directory {path} already holds a run; pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --output-dir")


def check_model(cfg: ModelConfig) -> None:
    """The cheap part of loading a model: the directory exists (and is not a run directory)."""
    if cfg.name == EMBEDDED:
        return
    if holds_run(cfg.name):
        raise ModelError(f"model.name = {cfg.name!r} is a run directory; its trained model is in "
                         f"{Path(cfg.name) / 'model'}")
    resolve(adapter_base(cfg.name) if (Path(cfg.name) / ADAPTER_CONFIG).is_file() else cfg.name)


def prepare_run_dir(path: Path, overwrite: bool) -> None:
    """Create the run directory; with `overwrite`, first remove from one that holds a run (checked
    by `check_output_dir`) what a run writes (`RUN_ENTRIES`, and its unfinished `.tmp-*` exports),
    and nothing else: a file of the user's beside the run stays."""
    if overwrite and path.is_dir() and holds_run(path):
        for entry in path.iterdir():
            if entry.name.removesuffix(".tmp") not in RUN_ENTRIES and not entry.name.startswith(".tmp-model-"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _undo_start(path: Path, created: bool) -> None:
    """A run that failed before writing its config (the model did not load) leaves nothing behind,
    so the corrected command needs no --overwrite."""
    if (path / "config.json").exists():
        return
    (path / ENVIRONMENT_FILE).unlink(missing_ok=True)
    if created and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def train(cfg: Config, run_dir: str | Path, *, quiet: bool = False, resume: bool = False, overwrite: bool = False,
          report: bool = True) -> dict:
    """What `ttrl train` does: check every input, prepare RUN_DIR, record the environment, train
    (ttrl.trainer.train), then write report.html / report.md. Returns the run's summary."""
    from ttrl.distributed import is_main_process
    from ttrl.report import write_report
    from ttrl.trainer import train as train_loop

    run_dir = Path(run_dir)
    main = is_main_process()  # under torchrun / accelerate launch, rank 0 alone writes files
    if main:  # (on the other ranks it would race with rank 0's first file)
        check_output_dir(run_dir, overwrite, resume)
    load_sets(cfg)
    check_model(cfg.model)
    created = not run_dir.exists()
    if main:
        prepare_run_dir(run_dir, overwrite and not resume)
        write_atomic(run_dir / ENVIRONMENT_FILE, json.dumps(environment(), indent=2))
    try:
        summary = train_loop(cfg, run_dir, quiet=quiet, resume=resume)
    except BaseException:
        if main and not resume:
            _undo_start(run_dir, created)
        raise
    if report and main:
        write_report(run_dir)
    return summary


def run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config of a run (RUN_DIR/config.json), set to evaluate the model it saved
    (RUN_DIR/model) unless `overrides` name other model.* settings."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not holds_run(run_dir):
        raise ConfigError(f"{run_dir} is not a ttrl run directory (no config.json of ttrl); give one written "
                          "by `ttrl train`, or use --config")
    overrides = list(overrides or [])
    cfg = load_config(run_dir / "config.json", overrides)
    given = {item.split("=", 1)[0].strip() for item in overrides}
    # The saved model has the run's shape and weights: load it as it is. A LoRA run saved only its
    # adapter: its base is rebuilt as the run built it (the same architecture and seed when random).
    lora = (run_dir / "model" / ADAPTER_CONFIG).is_file()
    for key, value in (("name", str(run_dir / "model")), ("architecture", cfg.model.architecture if lora else {}),
                       ("lora_rank", 0)):
        if f"model.{key}" not in given:
            setattr(cfg.model, key, value)
    return cfg


def evaluate_sets(cfg: Config, quiet: bool = False) -> dict[str, tuple[dict, list]]:
    """What `ttrl eval` does: {set name: (summary, per-problem results)} of cfg.model on the sets
    a run with `cfg` reports (adapt, heldout, each data.eval set), with the trainer's seeds and
    sets, and the trainer's progress lines (`quiet`: none). Data is checked before the model loads."""
    import torch

    from ttrl.metrics import progress_bar
    from ttrl.models import load_model
    from ttrl.evaluation import run_evals

    problems, extra = load_sets(cfg)
    check_model(cfg.model)
    model, tok = load_model(cfg.model, seed=cfg.train.seed, device="cuda" if torch.cuda.is_available() else "cpu")
    store: dict = {}
    with progress_bar(disable=quiet) as bar:
        sets = {name: probs for name, probs in run_sets(cfg, problems, extra, tok, model).items() if probs}
        return run_evals(model, tok, sets, cfg, 0, None, store, bar=bar, label=str(cfg.model.name))


def environment() -> dict:
    """Versions and machine of this process, saved as RUN_DIR/environment.json for the report."""
    import torch
    import transformers

    from ttrl import __version__

    env = {"ttrl": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
           "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])}  # pastes back into a shell
    try:  # the code being run: the commit of the working directory, "-dirty" with uncommitted changes
        git = ["git", "-C", os.getcwd()]
        sha = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
            env["git_commit"] = sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # no git, or not a repository: nothing to record
        pass
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

"""Starting a run: what marks a run directory, the checks made before anything is written, the
environment recorded beside it, and `train` / `evaluate_sets` as `ttrl train` / `ttrl eval` run
them, for use from Python too. (Reading a run directory back is ttrl.rundir.)

Order matters for the user's files: every input is checked (config, data, held-out split, model
directory, output path) before the directory is touched, and an existing directory is replaced
only when it holds a ttrl run and `overwrite` was asked for."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ttrl.checkpoint import CHECKPOINTS, checkpoint_config, is_checkpoint, list_checkpoints, load_policy
from ttrl.config import Config, ConfigError, ModelConfig, load_config
from ttrl.data import load_sets, run_sets
from ttrl.metrics import write_atomic
from ttrl.models import EMBEDDED, ModelError, adapter_base, is_adapter, resolve
from ttrl.plugins import use_answer_checker
from ttrl.rundir import ENVIRONMENT_FILE

def _json_object(path: Path) -> dict:
    if not path.is_file() or path.stat().st_size > 10_000_000:  # never a device or a huge file
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


RUN_ENTRIES = ("config.json", "environment.json", "metrics.jsonl", "rollouts.jsonl", "summary.json", "checkpoints",
               "model", "tensorboard", "wandb")
"""What `ttrl train` writes in a run directory: what --overwrite replaces."""
REPORT_ENTRIES = ("report.html", "report.md", "report", "metrics.csv")
"""What `ttrl report` writes there: replaced too, but only where ttrl's own (a file of the user's
under one of these names stays)."""
REPLACED = ".replaced-"
"""RUN_DIR/.replaced-<pid>/: the run --overwrite replaces, kept until the new run has started."""


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


CLI_WORDS = {"resume": "--resume", "overwrite": "--overwrite", "output_dir": "--output-dir"}
"""How errors name the run-directory options: `ttrl train`'s flags ..."""
API_WORDS = {"resume": "resume=True", "overwrite": "overwrite=True", "output_dir": "run_dir"}
"""... or the arguments of `ttrl.train` (the default: the caller is Python code)."""


def check_output_dir(path: Path, overwrite: bool = False, resume: bool = False, words: dict | None = None) -> None:
    """Everything known about the run directory before any work: a usable path, and a directory
    that is empty, or holds a run to resume (`resume`) or to replace (`overwrite`). `words`: how
    the messages name the options (API_WORDS or CLI_WORDS)."""
    w = words or API_WORDS
    if resume and overwrite:
        raise ConfigError(f"{w['resume']} continues the run in {w['output_dir']}: give {w['output_dir']}, and not "
                          f"{w['overwrite']}")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output directory {path} is a file; choose another {w['output_dir']}")
    check_writable(path, "output directory")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not holds_run(path):
        raise ConfigError(f"output directory {path} is not empty and holds no ttrl run (no config.json, "
                          "environment.json or checkpoint of ttrl); ttrl replaces only its own runs, even with "
                          f"{w['overwrite']}: choose another {w['output_dir']}")
    if not resume and not overwrite:
        raise ConfigError(f"output directory {path} already holds a run; pass {w['resume']} to continue it, "
                          f"{w['overwrite']} to replace it, or choose another {w['output_dir']}")


def check_model(cfg: ModelConfig) -> None:
    """The cheap part of loading a model: the directory exists (and is not a run directory); a
    run's checkpoint names the model of its run."""
    if cfg.name == EMBEDDED:
        return
    path = Path(cfg.name).expanduser()
    if is_checkpoint(path):
        check_model(model_settings(cfg))
        return
    run = next((p for p in (path, path.parent) if holds_run(p)), None)
    if run is not None and not (run / "model" / "config.json").is_file() and \
            not is_adapter(run / "model"):
        saved = list_checkpoints(run)
        where = (f"its latest checkpoint is {saved[-1]}: `ttrl eval {run}` evaluates it, or give "
                 f"model.name={saved[-1]}" if saved else "and it saved no checkpoint either")
        what = "is a run directory, which" if run == path else f"is in the run {run}, which"
        raise ModelError(f"model.name = {cfg.name!r} {what} has no model/ (the run stopped before the end); "
                         + where)
    if run == path:
        raise ModelError(f"model.name = {cfg.name!r} is a run directory; its trained model is in {path / 'model'}")
    if path.name == CHECKPOINTS and holds_run(path.parent):
        names = ", ".join(p.name for p in list_checkpoints(path.parent)) or "none yet"
        raise ModelError(f"model.name = {cfg.name!r} holds the run's checkpoints ({names}); give one of them, "
                         f"e.g. model.name={path / 'step-00000003'}")
    resolve(adapter_base(cfg.name) if is_adapter(path) else cfg.name)


def model_settings(cfg: ModelConfig) -> ModelConfig:
    """The settings that build the model `cfg` names: a checkpoint's are those of the run that wrote
    it (its base model, architecture and LoRA); a saved LoRA adapter's base is that of the adapter."""
    if is_checkpoint(cfg.name):
        from ttrl.config import config_from_dict

        return config_from_dict({"model": checkpoint_config(cfg.name).get("model") or {}}).model
    if is_adapter(cfg.name):
        return dataclasses.replace(cfg, name=adapter_base(cfg.name), lora_rank=0)
    return cfg


def load_for_eval(cfg: ModelConfig, seed: int, device):
    """(model, tokenizer) to evaluate: a model directory as `load_model` loads it, or a checkpoint's
    trained weights in the model its run built (from the run's seed; a LoRA adapter merged in)."""
    from ttrl.models import load_model

    if not is_checkpoint(cfg.name):
        return load_model(cfg, seed=seed, device=device)
    settings = model_settings(cfg)
    run_seed = (checkpoint_config(cfg.name).get("train") or {}).get("seed", seed)
    model, tok = load_model(settings, seed=run_seed, device=device)
    load_policy(cfg.name, model)
    if settings.lora_rank > 0:
        model = model.merge_and_unload()
    return model.eval(), tok


def export_weights(source: str | Path, out: str | Path) -> Path:
    """What `ttrl export` does: a run's trained model (its model/, or its latest checkpoint when it
    stopped before the end) or one checkpoint (RUN/checkpoints/step-N) as a whole Hugging Face
    directory at `out` (a LoRA adapter merged into its base), loadable by from_pretrained."""
    from ttrl.models import save_model

    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty directory; give another --output")
    check_writable(out, "--output")
    if is_checkpoint(source):
        model_cfg, seed = ModelConfig(name=str(source)), 0
    else:
        cfg = run_config(source)
        model_cfg, seed = cfg.model, cfg.train.seed
    model, tok = load_for_eval(model_cfg, seed, "cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_model(model, tok, out, readme=False)


def check_not_inside(cfg: ModelConfig, run_dir: Path) -> None:
    """--overwrite replaces the run in RUN_DIR: the model to start from must not be part of it."""
    if cfg.name == EMBEDDED or not run_dir.is_dir():
        return
    name = Path(cfg.name).expanduser()
    base = Path(adapter_base(name)).expanduser() if is_adapter(name) else name
    for path in {name, base}:
        if path.resolve().is_relative_to(run_dir.resolve()):
            raise ConfigError(f"model.name = {cfg.name!r} is part of the run in {run_dir} that --overwrite would "
                              f"replace; copy it out first (cp -r {path} <elsewhere>) and set model.name to the "
                              "copy, or choose another --output-dir")


@contextlib.contextmanager
def run_lock(path: Path):
    """Hold RUN_DIR for this process alone: an OS lock (flock) on the directory, which the OS
    releases when the process ends however it ends, so a killed run never leaves a stale lock.
    A second `ttrl train` (a new run, --resume or --overwrite) on it stops with one error."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"output directory {path} is in use by another ttrl process (training, resuming or "
                          "replacing it); wait for it to end, or choose another --output-dir") from None
    try:
        yield
    finally:
        os.close(fd)


def _ours(entry: Path) -> bool:
    """Whether RUN_DIR/`entry` is what ttrl wrote there (for a report's files, by their content)."""
    name = entry.name.removesuffix(".tmp")
    if name in RUN_ENTRIES or entry.name.startswith(".tmp-model-"):
        return True
    if name not in REPORT_ENTRIES or entry.is_symlink():
        return False
    if name == "report":
        return entry.is_dir() and all(f.is_file() and f.suffix == ".png" for f in entry.iterdir())
    try:
        with open(entry, encoding="utf-8", errors="replace") as f:
            head = f.read(2000)
    except OSError:
        return False
    if name == "metrics.csv":
        from ttrl.metrics import read_metrics

        columns = head.partition("\n")[0].strip().split(",")
        keys = {k for row in read_metrics(entry.parent) for k in row}
        return columns[0] == "step" and set(columns) <= keys | {"step"}
    return head.startswith("# TTRL report · ") if name == "report.md" else "<title>TTRL report · " in head


def set_aside(path: Path) -> Path | None:
    """--overwrite, first half: move what the run in `path` wrote into `path`/.replaced-<pid>/, and
    nothing else (a file of the user's beside the run stays). `drop_replaced` deletes it once the
    new run has started; `restore_replaced` puts it back if the new run never starts."""
    entries = [e for e in path.iterdir() if _ours(e)]
    if not entries:
        return None
    aside = path / f"{REPLACED}{os.getpid()}"
    aside.mkdir()
    for entry in entries:
        os.rename(entry, aside / entry.name)
    return aside


def restore_replaced(path: Path, aside: Path) -> None:
    """Put back the run moved aside, over what the new run wrote before it failed to start."""
    for entry in aside.iterdir():
        _remove(path / entry.name)
        os.rename(entry, path / entry.name)
    aside.rmdir()


def drop_replaced(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def sweep(path: Path) -> None:
    """What killed processes left in RUN_DIR (called with the lock held, so none is alive): their
    unfinished model exports and checkpoint directories, which would keep a full disk full, and a
    run that --overwrite had moved aside — put back if the new run never started (it wrote no
    config.json), deleted otherwise."""
    for aside in path.glob(f"{REPLACED}*"):
        if (path / "config.json").exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            (path / ENVIRONMENT_FILE).unlink(missing_ok=True)
            restore_replaced(path, aside)
    leftovers = list(path.glob(".tmp-model-*")) + list((path / "checkpoints").glob(".tmp-*")) + \
        list((path / "checkpoints").glob(".old-*"))
    for entry in leftovers:
        shutil.rmtree(entry, ignore_errors=True)


def _undo_start(path: Path, created: bool) -> None:
    """A run that failed before writing its config (the model did not load) leaves nothing behind,
    so the corrected command needs no --overwrite."""
    if (path / "config.json").exists():
        return
    (path / ENVIRONMENT_FILE).unlink(missing_ok=True)
    if created and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def train(cfg: Config, run_dir: str | Path, *, quiet: bool = False, resume: bool = False, overwrite: bool = False,
          report: bool = True, words: dict | None = None) -> dict:
    """What `ttrl train` does: check every input, take RUN_DIR (`run_lock`), train
    (ttrl.trainer.train), then write report.html / report.md. Returns the run's summary.
    With `overwrite` the old run is moved aside and deleted only once the new one has started
    (its model loaded, its config.json written); a new run that fails before leaves the old one
    as it was. `quiet`: no progress output, ours or the libraries'. `words`: how errors name
    resume / overwrite / run_dir (this function's arguments; `ttrl train` passes its flags, CLI_WORDS)."""
    from ttrl.console import is_main_process
    from ttrl.report import write_report
    from ttrl.trainer import train as train_loop

    run_dir = Path(run_dir)
    main = is_main_process()  # under torchrun / accelerate launch, rank 0 alone writes files
    if main:  # (on the other ranks it would race with rank 0's first file)
        check_output_dir(run_dir, overwrite, resume, words)
    load_sets(cfg)
    check_model(cfg.model)
    replace = overwrite and not resume
    if replace:
        check_not_inside(cfg.model, run_dir)
    created = not run_dir.exists()
    with contextlib.ExitStack() as held:
        aside = None
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                held.enter_context(run_lock(run_dir))
            except ConfigError:  # the other process's files are not ours to touch
                if created:
                    with contextlib.suppress(OSError):
                        run_dir.rmdir()
                raise
            sweep(run_dir)
            try:
                check_output_dir(run_dir, overwrite, resume, words)  # again: now no other process can change it
            except ConfigError:
                _undo_start(run_dir, created)
                raise
            aside = set_aside(run_dir) if replace else None
            write_atomic(run_dir / ENVIRONMENT_FILE, json.dumps(environment(), indent=2))
        try:
            summary = train_loop(cfg, run_dir, quiet=quiet, resume=resume, started=lambda: drop_replaced(aside))
        except BaseException:
            if main and not resume:
                _undo_start(run_dir, created)
                if aside is not None and aside.exists() and not (run_dir / "config.json").exists():
                    restore_replaced(run_dir, aside)
            raise
        finally:
            drop_replaced(aside if main and aside and (run_dir / "config.json").exists() else None)
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
    saved = list_checkpoints(run_dir)
    if "model.name" not in given and not (run_dir / "model").is_dir() and saved:
        # Stopped before the end: its latest checkpoint holds the weights (built as the run built them)
        from ttrl.console import warn

        warn(f"{run_dir} has no model/ (the run stopped before the end): evaluating its latest checkpoint, "
             f"{saved[-1]}")
        cfg.model.name = str(saved[-1])
        return cfg
    # The saved model has the run's shape and weights: load it as it is. A LoRA run saved only its
    # adapter: its base is rebuilt as the run built it (the same architecture and seed when random).
    lora = is_adapter(run_dir / "model")
    for key, value in (("name", str(run_dir / "model")), ("architecture", cfg.model.architecture if lora else {}),
                       ("lora_rank", 0)):
        if f"model.{key}" not in given:
            setattr(cfg.model, key, value)
    return cfg


def evaluate_sets(cfg: Config, quiet: bool = False, keep_samples: bool = False) -> dict[str, tuple[dict, list]]:
    """What `ttrl eval` does: {set name: (summary, per-problem results)} of cfg.model on the sets
    a run with `cfg` reports (adapt, heldout, each data.eval set), with the trainer's seeds and
    sets, and the trainer's progress lines (`quiet`: none, the libraries' bars neither). Data is
    checked before the model loads. `keep_samples`: each result keeps its completions and answers."""
    import torch

    from ttrl.evaluation import run_evals
    from ttrl.metrics import library_bars, progress_bar
    from ttrl.preview import announce

    problems, extra = load_sets(cfg)
    check_model(cfg.model)
    use_answer_checker(cfg.data.answer_extractor, cfg.data.answer_equivalence)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    store: dict = {}
    with library_bars(enabled=not quiet), progress_bar(disable=quiet) as bar:
        model, tok = load_for_eval(cfg.model, cfg.train.seed, device)
        sets = {name: probs for name, probs in run_sets(cfg, problems, extra, tok, model).items() if probs}
        announce(cfg, sets, device, quiet=quiet)
        return run_evals(model, tok, sets, cfg, 0, None, store, bar=bar, label=str(cfg.model.name),
                         keep_samples=keep_samples)


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

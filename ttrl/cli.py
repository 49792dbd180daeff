"""`ttrl train | eval | data | export | config | plan | report | compare | demo`: thin argument parsing around config,
runs (run directories), evaluation and report."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
import time
from pathlib import Path

import yaml

from ttrl import __version__
from ttrl.config import CONFIGS_DIR, ConfigError, bundled_configs, config_keys, load_config

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
"""OSErrors that end a command with one `error:` line rather than a traceback: the disk, and a
path the user gave that cannot be written."""
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG)


def _quiet_libraries() -> None:
    """Silence third-party progress bars and warnings that drown our own output."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def before_after_table(evals: dict, k: int) -> str:
    """Plain-text table: per eval set, base vs TTRL greedy, avg@k and maj@k, over the `graded`
    prompts (those with a gold answer), and the change in avg@k with twice its standard error over
    those prompts (paired by problem) where the evaluations kept per-problem scores. Greedy is how
    most users deploy the model, so a fall in greedy or avg@k beyond two standard errors is said
    below the table in plain words."""
    from ttrl.evaluation import paired_change

    def cell(row, key):
        return f"{row[key]:>12.3f}" if row and row.get(key) is not None else f"{'–':>12}"

    lines = [f"{'set':<10} {'prompts':>7} {'graded':>7} {'base greedy':>12} {'base avg@' + str(k):>12} "
             f"{'base maj@' + str(k):>12} {'TTRL greedy':>12} {'TTRL avg@' + str(k):>12} {'TTRL maj@' + str(k):>12} "
             f"{'change ± 2 se':>15}"]
    worse = []
    for name, rows in evals.items():
        if not rows or f"avg@{k}" not in rows[-1]:
            continue
        first, last = rows[0] if rows[0]["step"] == 0 else None, rows[-1]  # no base without eval.before
        change = paired_change(first, last, f"avg@{k}") if first else None
        noise = f" ± {2 * change[1]:.3f}" if change and change[1] is not None else ""
        delta = f"{last[f'avg@{k}'] - first[f'avg@{k}']:+.3f}{noise}" if first else "–"
        lines.append(f"{name:<10} {last['n_prompts']:>7} {last.get('n_labelled', last['n_prompts']):>7} "
                     f"{cell(first, 'greedy')} {cell(first, f'avg@{k}')} {cell(first, f'maj@{k}')} "
                     f"{cell(last, 'greedy')} {cell(last, f'avg@{k}')} {cell(last, f'maj@{k}')} {delta:>15}")
        for metric in ("greedy", f"avg@{k}"):
            moved = paired_change(first, last, metric) if first else None
            if moved and moved[1] is not None and moved[0] < -2 * moved[1]:
                worse.append(f"{name}: {metric} {moved[0]:+.3f} ± {2 * moved[1]:.3f}")
    if len(lines) == 1:
        return "no prompt has a gold answer, so no accuracy was computed (the run's metrics are in metrics.jsonl)"
    if worse:
        lines.append("the trained model is WORSE than the base model, beyond two standard errors, on "
                     + "; ".join(worse) + " (keep the base model, or see docs/method.md on collapse)")
    return "\n".join(lines)


def cmd_train(args) -> int:
    holdout = [f"data.holdout={args.holdout}"] if args.holdout is not None else []  # --holdout 0 means none
    resume = getattr(args, "resume", False)
    if resume and not args.config and args.output_dir:  # the run's own settings, not the defaults
        from ttrl.launch import holds_run

        saved = Path(args.output_dir) / "config.json"
        if saved.is_file() and holds_run(args.output_dir):
            args.config = str(saved)
    cfg = load_config(args.config, args.overrides + holdout)
    if resume and not args.output_dir:
        raise ConfigError("--resume continues the run in --output-dir: give --output-dir")
    from ttrl.checkpoint import CheckpointError
    from ttrl.console import is_main_process
    from ttrl.launch import CLI_WORDS, train
    from ttrl.trainer import TrainingStopped

    out = Path(args.output_dir or f"runs/ttrl-{time.strftime('%Y%m%d-%H%M%S')}")
    again = shlex.join(["ttrl", "train", "--resume", "--output-dir", str(out)]
                       + (["--config", args.config] if args.config else [])
                       + (["--holdout", str(args.holdout)] if args.holdout is not None else []) + args.overrides)
    t0 = time.time()
    try:
        summary = train(cfg, out, quiet=args.quiet, resume=resume, overwrite=args.overwrite, report=False,
                        words=CLI_WORDS)
    except TrainingStopped as e:
        if is_main_process():
            print(f"{e}\nto continue: {again}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        return interrupted(e, out, again)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _disk_full(e):
            raise
        print(f"error: {_os_error(e, out)}; free some space, then continue: {again}", file=sys.stderr)
        return 1
    if not is_main_process():
        return 0
    print(before_after_table(summary["evals"], cfg.eval.n_samples))
    if summary.get("model"):
        print(f"model/: step {summary['model']['step']}'s weights; {summary['model']['why']}")
    if not getattr(args, "no_report", False):  # `ttrl demo` has no --no-report: it always reports
        from ttrl.report import write_report

        print(f"report: {write_report(out)}")
    print(f"\nrun finished in {time.time() - t0:.0f} s; files in {out}/ (metrics.jsonl, summary.json, model/)")
    return 0


def interrupted(e: KeyboardInterrupt, out: Path, again: str) -> int:
    """One line for a run stopped at once by SIGINT/SIGTERM, saying what was kept; 128 + the signal."""
    import signal

    from ttrl.checkpoint import list_checkpoints

    name = e.args[0] if e.args and e.args[0] in ("SIGINT", "SIGTERM") else "SIGINT"
    saved = list_checkpoints(out)
    kept = (f"the last checkpoint ({saved[-1]}) is kept. to continue: {again}" if saved
            else f"no checkpoint was saved yet. to start again: {again}")
    print(f"\ninterrupted by {name}; {kept}", file=sys.stderr)
    return 128 + signal.Signals[name]


def _eval_target(args) -> tuple[Path | None, list[str]]:
    """(run directory, overrides) from `ttrl eval`'s free arguments: key=value items are
    overrides, one other item may name a run directory (an existing directory is one even with
    "=" in its name, as benchmark arms' `majority+reward.contrast=true`)."""
    words = [a for a in args.items if "=" not in a or Path(a).is_dir()]
    overrides = [a for a in args.items if a not in words]
    if len(words) > 1 or (words and not Path(words[0]).is_dir()):
        raise ConfigError(f"{words[-1]!r} is neither a run directory nor a key=value override")
    if words and args.config:
        raise ConfigError("give a run directory or --config, not both (the run directory holds its config)")
    return (Path(words[0]) if words else None), overrides


def cmd_eval(args) -> int:
    from ttrl.console import warn
    from ttrl.health import eval_warning
    from ttrl.launch import check_writable, evaluate_sets, run_config

    from ttrl.preview import holdout_note

    run_dir, overrides = _eval_target(args)
    cfg = run_config(run_dir, overrides) if run_dir else load_config(args.config, overrides)
    note = holdout_note(cfg, overrides)
    if note:
        from ttrl.data import load_sets

        load_sets(cfg)  # a file that cannot be read is the one thing to say
        print(f"note: {note}", file=sys.stderr)
    out = Path(args.json) if args.json else None
    if out is not None:  # before the evaluation, not after it
        if out.is_dir():
            raise ConfigError(f"--json {out} is a directory; give a file name, e.g. {out / 'eval.json'}")
        check_writable(out, "--json")
    results = evaluate_sets(cfg, keep_samples=args.samples)
    sets = {name: summary for name, (summary, _) in results.items()}
    bases = base_evals(run_dir, sets) if run_dir else {}
    print(f"model {cfg.model.name}, data.train {cfg.data.train}, k = {cfg.eval.n_samples}"
          + ("; beside each accuracy, the base model's from the run's evaluation before training" if bases else ""))
    for name, summary in sets.items():
        graded = (f"{summary['n_labelled']} graded" if summary["n_labelled"]
                  else "none has a gold answer, so no accuracy")
        print(f"\n{name}: {summary['n_prompts']} prompts, {graded}")
        base = bases.get(name, {})
        k = cfg.eval.n_samples
        for key, value in summary.items():
            if key not in ("n_prompts", "n_labelled"):
                accuracy = key in ("greedy", f"avg@{k}", f"maj@{k}", f"pass@{k}")
                was = f"   base {base[key]:.4f}" if accuracy and isinstance(base.get(key), float) else ""
                print(f"{key:>16}  {value:.4f}{was}" if isinstance(value, float) else f"{key:>16}  {value}")
    for name, summary in sets.items():  # after the figures, where it is read
        cut = eval_warning(name, summary)
        if cut:
            warn(cut)
    head = {"model": cfg.model.name, "data": cfg.data.train}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        per_set = {name: {**summary, "problems": [r.record() for r in problems]}
                   for name, (summary, problems) in results.items()}
        out.write_text(json.dumps({**head, "sets": per_set}, indent=2))
    print(json.dumps({**head, "sets": sets}))
    return 0


def base_evals(run_dir: Path, sets: dict) -> dict:
    """The base model's evaluation of each of `sets` from the run (its step-0 evaluation, as the
    report reads it), where it covered as many prompts: what the trained model's figures are read against."""
    from ttrl.rundir import ReportError, load_run

    try:
        run = load_run(run_dir)
    except ReportError:
        return {}
    bases = {name: run.base(name) for name in sets}
    return {name: base for name, base in bases.items()
            if base and base.get("n_prompts") == sets[name].get("n_prompts")}


def cmd_export(args) -> int:
    from ttrl.launch import export_weights

    out = export_weights(args.source, args.output)
    print(f"saved {out}: a Hugging Face model directory (from_pretrained, or `ttrl eval --config ... "
          f"model.name={out}`)")
    return 0


def cmd_data(args) -> int:
    from ttrl.preview import describe

    cfg = load_config(args.config, args.overrides)
    print(describe(cfg, show=args.show, overrides=args.overrides))
    return 0


def cmd_config(args) -> int:
    if args.keys:
        for key in config_keys():
            print(f"{key.key} ({key.type}, default {key.default!r})\n    {key.doc}")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_demo(args) -> int:
    args.config = str(CONFIGS_DIR / "demo.yaml")
    args.output_dir = args.output_dir or "runs/demo"
    args.holdout = None
    return cmd_train(args)


def cmd_report(args) -> int:
    from ttrl.report import ReportError, write_report

    try:
        page = write_report(args.run_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{page}\n{page.with_suffix('.md')} (plots in {page.with_suffix('')}/)")
    return 0


def cmd_compare(args) -> int:
    from ttrl.report import ReportError, write_compare

    try:
        page = write_compare(args.run_dirs, args.output)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{page}\n{page.with_suffix('.md')} (plots in {page.with_suffix('')}/)")
    return 0


def cmd_plan(args) -> int:
    from ttrl.plan import GB, plan

    cfg = load_config(args.config, args.overrides)
    p = plan(cfg, args.gpus, args.gpu_memory, None if args.engine == "auto" else args.engine == "fsdp",
             args.prompt_tokens)
    if args.json:
        print(json.dumps({"model": cfg.model.name, **p.to_dict()}))
        return 0 if p.fits else 1
    from rich.console import Console
    from rich.table import Table

    engine = f"FSDP over {p.gpus} GPUs" if p.fsdp else f"DDP over {p.gpus} GPUs" if p.gpus > 1 else "one GPU"
    table = Table(title=f"{cfg.model.name}: predicted memory per GPU (GB), {engine} of {args.gpu_memory:g} GB")
    table.add_column("item")
    for phase in p.phases:
        table.add_column(phase, justify="right")
    items = list(dict.fromkeys(k for items in p.phases.values() for k in items))
    for item in items:
        table.add_row(item, *(f"{p.phases[ph][item] / GB:.2f}" if item in p.phases[ph] else "" for ph in p.phases))
    table.add_row("[bold]peak[/bold]", *(f"[bold]{p.peak(ph) / GB:.2f}[/bold]" for ph in p.phases))
    console = Console(soft_wrap=True)
    console.print(table)
    r, u = p.sizes["rollout"], p.sizes["update"]
    console.print(f"ttrl will decode {r['rows']} samples at once ({r['prompts_at_once']} prompts x N) and train in "
                  f"micro-batches of {u['micro_batch_rows']} answers, {u['micro_batch_tokens']:,} tokens "
                  f"(gradient checkpointing {'on' if u['gradient_checkpointing'] else 'off'}); "
                  f"assumed prompts of {p.sizes['model']['prompt_tokens']} tokens, answers of "
                  f"{p.sizes['model']['answer_tokens']}")
    for name, value in p.host.items():
        console.print(f"host memory per process: {name} {value / GB:.2f} GB")
    for note in p.notes:
        console.print(f"note: {note}")
    verdict = "fits" if p.fits else f"does NOT fit: {p.over_bytes / GB:.1f} GB over"
    console.print(f"peak {p.peak_bytes / GB:.1f} GB in the {p.peak_phase} phase (+1 GB CUDA context and "
                  f"fragmentation): {verdict}")
    for s in p.suggestions:
        console.print(f"  fits with {s['change']}: peak {s['peak_gb']:.1f} GB ({s['phase']})")
    console.print("predicted, not measured: see docs/paper.md (what fits) for how far the prediction has been checked")
    return 0 if p.fits else 1


CONFIG_HELP = (f"YAML config file, or a bundled one by name: {', '.join(bundled_configs())} "
               "(`ttrl config --keys` lists the settings)")
OVERRIDES_HELP = "key.sub=value settings, anywhere on the line, e.g. rollout.n_votes=16"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttrl", description="Test-Time Reinforcement Learning on unlabeled prompts")
    parser.add_argument("--version", action="version", version=f"ttrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="adapt a model on unlabeled prompts with majority-vote rewards")
    train.add_argument("--config", help=CONFIG_HELP)
    train.add_argument("--output-dir", help="run directory (default runs/ttrl-<time>)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory (a ttrl run only)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir from its latest checkpoint, with the settings in "
                            "its config.json (or --config and the same overrides)")
    train.add_argument("--holdout", type=float, default=None,
                       help="fraction of prompts held out for evaluation (same as data.holdout=; 0: none)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--no-report", action="store_true", help="skip writing report.html / report.md at the end")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="avg@k, maj@k, pass@k and greedy accuracy of a model on the sets a run reports",
                        description="Evaluate RUN_DIR/model on the sets that run reported (adapt, heldout, data.eval), "
                                    "or the model and data of --config and overrides.")
    ev.add_argument("--config", help=CONFIG_HELP)
    ev.add_argument("--json", help="also write the results (with per-problem votes) to this file")
    ev.add_argument("--samples", action="store_true",
                    help="keep every sampled completion and the answer extracted from it (in --json's problems)")
    ev.add_argument("items", nargs="*", metavar="[RUN_DIR] key=value",
                    help="a run directory written by `ttrl train`, and/or overrides, e.g. model.name=runs/x/model")
    ev.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="show the prompts as the model reads them, their gold answers and the "
                                       "sets (adapt / heldout / data.eval); loads the tokenizer, no weights")
    data.add_argument("--config", help=CONFIG_HELP)
    data.add_argument("--show", type=int, default=2, metavar="N",
                      help="rendered prompts shown per set (default 2; 0: all)")
    data.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    data.set_defaults(func=cmd_data)

    config = sub.add_parser("config", help="print the resolved config as YAML, or list every key (--keys)")
    config.add_argument("--config", help=CONFIG_HELP)
    config.add_argument("--keys", action="store_true", help="list every setting with its type, default and meaning")
    config.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    config.set_defaults(func=cmd_config)

    demo = sub.add_parser("demo", help="TTRL on the embedded SmolLM2-135M and arithmetic prompts (CPU, minutes)")
    demo.add_argument("--output-dir", help="run directory (default runs/demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing run directory (a ttrl run only)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("overrides", nargs="*", help="key.sub=value settings on top of the demo config")
    demo.set_defaults(func=cmd_demo)

    pl = sub.add_parser("plan", help="predict a run's peak memory per GPU, phase by phase, before renting one",
                        description="Peak memory per GPU of each phase of a training step, predicted from the "
                                    "config and the model's config.json (no weights loaded), the sizes ttrl will "
                                    "choose, whether it fits, and if not the smallest changes that make it fit. "
                                    "Exit status 1 when it does not fit.")
    pl.add_argument("--config", help=CONFIG_HELP)
    pl.add_argument("--gpus", type=int, default=1, help="GPUs (processes) the run uses (default 1)")
    pl.add_argument("--gpu-memory", type=float, default=80.0, help="memory of each GPU in GB (default 80)")
    pl.add_argument("--engine", choices=("auto", "fsdp", "ddp"), default="auto",
                    help="how several GPUs share the model: fsdp shards parameters, gradients and AdamW state; "
                         "ddp copies them (auto: fsdp with more than one GPU)")
    pl.add_argument("--prompt-tokens", type=int, default=256, help="longest prompt in tokens (default 256)")
    pl.add_argument("--json", action="store_true", help="print the numbers as one JSON object instead of a table")
    pl.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    pl.set_defaults(func=cmd_plan)

    export = sub.add_parser("export", help="a run's trained model, or one of its checkpoints, as a Hugging Face "
                                           "directory (LoRA merged)")
    export.add_argument("source", help="a run directory (its model/, or its latest checkpoint if it stopped early) "
                                       "or RUN_DIR/checkpoints/step-N")
    export.add_argument("--output", required=True, help="a new (or empty) directory to write the model into")
    export.set_defaults(func=cmd_export)

    report = sub.add_parser("report", help="write RUN_DIR/report.html (self-contained) and report.md with plots")
    report.add_argument("run_dir", help="a run directory written by `ttrl train`")
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser("compare", help="put runs side by side: compare.html and compare.md, curves overlaid")
    compare.add_argument("run_dirs", nargs="+", help="run directories written by `ttrl train`")
    compare.add_argument("--output", default="compare", help="directory for compare.html/.md (default ./compare)")
    compare.set_defaults(func=cmd_compare)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """argparse, with key=value overrides allowed after options too (`train a=1 --output-dir x b=2`):
    argparse takes the first run of positionals; the later key=value items are appended in order."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    free = "overrides" if hasattr(args, "overrides") else "items" if hasattr(args, "items") else None
    stray = [a for a in extra if free is None or a.startswith("-") or (free == "overrides" and "=" not in a)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        setattr(args, free, getattr(args, free) + extra)
    return args


def _disk_full(e: BaseException) -> bool:
    """An OSError for a full disk, or a library's error that says so in the OS's words (safetensors
    raises its own error type, "... No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno in DISK_FULL
    return any(os.strerror(code) in str(e) for code in DISK_FULL)


def _os_error(e: Exception, place: Path | None = None) -> str:
    filename = getattr(e, "filename", None)
    where = f" ({filename})" if filename else f" (in {place})" if place else ""
    if _disk_full(e):
        return f"no space left on the disk while writing{where}"
    return f"cannot write{where}: {e.strerror}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # Ctrl-C at any point, imports included, is one line
        from ttrl.data import DataError
        from ttrl.models import ModelError

        _quiet_libraries()
        try:
            return args.func(args)
        except (ConfigError, DataError, ModelError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            if e.errno not in DISK_FULL + UNWRITABLE:
                raise
            print(f"error: {_os_error(e)}", file=sys.stderr)
            return 1 if e.errno in DISK_FULL else 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

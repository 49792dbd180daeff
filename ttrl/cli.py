"""`ttrl train | eval | report | compare | demo`: thin argument parsing around config, trainer,
evaluation and report."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from ttrl.config import ConfigError, load_config
from ttrl.report import ENVIRONMENT_FILE, ReportError, environment, write_compare, write_report

CONFIGS_DIR = Path(__file__).parent / "configs"


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


def prepare_run_dir(path: Path, overwrite: bool) -> None:
    """Never overwrite an existing run silently."""
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {path} already holds a run; pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --output-dir")
        import shutil

        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def before_after_table(evals: dict, k: int) -> str:
    """Plain-text table: per eval set, base vs TTRL avg@k and maj@k."""
    lines = [f"{'set':<10} {'prompts':>7} {'base avg@' + str(k):>12} {'base maj@' + str(k):>12} "
             f"{'TTRL avg@' + str(k):>12} {'TTRL maj@' + str(k):>12} {'change':>8}"]
    for name, rows in evals.items():
        if not rows or f"avg@{k}" not in rows[-1]:
            continue
        first, last = rows[0], rows[-1]
        lines.append(f"{name:<10} {last['n_prompts']:>7} {first[f'avg@{k}']:>12.3f} {first[f'maj@{k}']:>12.3f} "
                     f"{last[f'avg@{k}']:>12.3f} {last[f'maj@{k}']:>12.3f} "
                     f"{last[f'avg@{k}'] - first[f'avg@{k}']:>+8.3f}")
    return "\n".join(lines)


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides + ([f"data.holdout={args.holdout}"] if args.holdout else []))
    resume = getattr(args, "resume", False)
    if resume and (args.overwrite or not args.output_dir):
        raise ConfigError("--resume continues the run in --output-dir: give --output-dir, and not --overwrite")
    out = Path(args.output_dir or f"runs/ttrl-{time.strftime('%Y%m%d-%H%M%S')}")
    from ttrl.distributed import is_main_process

    main_process = is_main_process()  # under torchrun / accelerate launch, rank 0 alone writes files
    if not resume and main_process:
        prepare_run_dir(out, args.overwrite)
    from ttrl.checkpoint import CheckpointError
    from ttrl.trainer import TrainingStopped, train

    again = shlex.join(["ttrl", "train", "--resume", "--output-dir", str(out)]
                       + (["--config", args.config] if args.config else [])
                       + (["--holdout", str(args.holdout)] if args.holdout else []) + args.overrides)
    if out.is_dir() and main_process:  # a --resume of a missing directory is left to train() to explain
        (out / ENVIRONMENT_FILE).write_text(json.dumps(environment(), indent=2))
    t0 = time.time()
    try:
        summary = train(cfg, out, quiet=args.quiet, resume=resume)
    except TrainingStopped as e:
        if main_process:
            print(f"{e}\nto continue: {again}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        return interrupted(e, out, again)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not main_process:
        return 0
    print(before_after_table(summary["evals"], cfg.eval.n_samples))
    if not getattr(args, "no_report", False):  # `ttrl demo` has no --no-report: it always reports
        print(f"report: {write_report(out)}")
    print(f"\nrun finished in {time.time() - t0:.0f} s; files in {out}/ (metrics.jsonl, summary.json, model/)")
    return 0


def interrupted(e: KeyboardInterrupt, out: Path, again: str) -> int:
    """One line for a run stopped at once by SIGINT/SIGTERM, saying what was kept; 128 + the signal."""
    import signal

    from ttrl.checkpoint import list_checkpoints

    name = e.args[0] if e.args and e.args[0] in ("SIGINT", "SIGTERM") else "SIGINT"
    saved = list_checkpoints(out)
    kept = (f"checkpoint {saved[-1]} is kept. to continue: {again}" if saved
            else "no checkpoint had been saved yet, so there is nothing to resume")
    print(f"\ninterrupted by {name}; {kept}", file=sys.stderr)
    return 128 + signal.Signals[name]


def cmd_eval(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from ttrl.data import load_problems
    from ttrl.evaluation import eval_seed, evaluate
    from ttrl.models import load_model

    model, tok = load_model(cfg.model, seed=cfg.train.seed)
    problems = load_problems(cfg.data.train, cfg.data)
    summary, results = evaluate(model, tok, problems, cfg.eval, cfg.data.template, cfg.model.chat_template,
                                seed=eval_seed(cfg))
    summary = {"model": cfg.model.name, "data": cfg.data.train, **summary}
    for key, value in summary.items():
        print(f"{key:>16}  {value:.4f}" if isinstance(value, float) else f"{key:>16}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "problems": [r.__dict__ for r in results]}, indent=2))
    print(json.dumps(summary))
    return 0


def cmd_demo(args) -> int:
    args.config = str(CONFIGS_DIR / "demo.yaml")
    args.output_dir = args.output_dir or "runs/demo"
    args.holdout = 0.0
    return cmd_train(args)


def cmd_report(args) -> int:
    try:
        page = write_report(args.run_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{page}\n{page.with_suffix('.md')} (plots in {page.with_suffix('')}/)")
    return 0


def cmd_compare(args) -> int:
    try:
        page = write_compare(args.run_dirs, args.output)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{page}\n{page.with_suffix('.md')} (plots in {page.with_suffix('')}/)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttrl", description="Test-Time Reinforcement Learning on unlabeled prompts")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="adapt a model on unlabeled prompts with majority-vote rewards")
    train.add_argument("--config", help="YAML config file (see configs/)")
    train.add_argument("--output-dir", help="run directory (default runs/ttrl-<time>)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir from its latest checkpoint (same config and overrides)")
    train.add_argument("--holdout", type=float, default=0.0, help="fraction of prompts held out for evaluation")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--no-report", action="store_true", help="skip writing report.html / report.md at the end")
    train.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. rollout.n_votes=16")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="avg@k, maj@k, pass@k and greedy accuracy of a model on a data set")
    ev.add_argument("--config", help="YAML config file")
    ev.add_argument("--json", help="also write the results (with per-problem votes) to this file")
    ev.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. model.name=runs/x/model")
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="TTRL on the embedded SmolLM2-135M and arithmetic prompts (CPU, minutes)")
    demo.add_argument("--output-dir", help="run directory (default runs/demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("overrides", nargs="*", help="key.sub=value settings on top of the demo config")
    demo.set_defaults(func=cmd_demo)

    report = sub.add_parser("report", help="write RUN_DIR/report.html (self-contained) and report.md with plots")
    report.add_argument("run_dir", help="a run directory written by `ttrl train`")
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser("compare", help="put runs side by side: compare.html and compare.md, curves overlaid")
    compare.add_argument("run_dirs", nargs="+", help="run directories written by `ttrl train`")
    compare.add_argument("--output", default="compare", help="directory for compare.html/.md (default ./compare)")
    compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from ttrl.data import DataError
    from ttrl.models import ModelError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Reports a person would rather look at than read: `ttrl report RUN_DIR` writes report.html (one
self-contained file, plots embedded as base64 PNG, no external URL) and report.md (PNGs beside it
in report/); `ttrl compare` puts several runs side by side the same way.

Everything is read back from the run directory (config.json, environment.json, metrics.jsonl,
summary.json), so a report can be rebuilt at any time, also for a run that stopped early.
Content is built once as a list of blocks, then rendered to HTML and to Markdown."""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ttrl.console import warn
from ttrl.evaluation import paired_change
from ttrl.health import learning_warnings
from ttrl.metrics import is_number, write_csv
from ttrl.plots import RUN_COLOURS, Plot, make_plots
from ttrl.plugins import PluginError, use_answer_checker
from ttrl.rundir import ENVIRONMENT_FILE, ReportError, Run, graded, load_run

__all__ = ["ENVIRONMENT_FILE", "ReportError", "Run", "load_run", "write_report", "write_compare",
           "beats_voting"]


# ---------------------------------------------------------------- formatting helpers

def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _short(text, n: int = 48) -> str:
    text = "<none>" if text is None else str(text).replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def describe_model(run: Run) -> str:
    name = str(run.cfg("model.name", "?"))
    if run.cfg("model.architecture"):
        name = f"a randomly initialised model of {name}'s shape"
    lora = run.cfg("model.lora_rank", 0)
    return name + (f" (LoRA rank {lora})" if lora else "")


def set_label(name: str) -> str:
    return {"adapt": "adapt (trained on, transductive)",
            "heldout": "heldout (never trained on)"}.get(name, f"{name} (cross-task, never trained on)")


# ---------------------------------------------------------------- content

@dataclass
class Doc:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def add(self, kind: str, *args) -> None:
        self.blocks.append((kind, *args))


def moved(run: Run) -> list[tuple[str, float, float]]:
    """(set, change, standard error) of each eval set whose avg@k moved from the base model's beyond
    two paired standard errors: evidence that training changed the model, whatever the training
    metrics say."""
    out = []
    for name in run.evals:
        base, final = run.base(name), run.final(name)
        change = paired_change(base, final, f"avg@{run.k}") if base and final else None
        if change is not None and change[1] is not None and beyond(change[0], change[1]) == "beyond":
            out.append((name, change[0], change[1]))
    return out


def signal_warnings(run: Run) -> list[tuple[str, str]]:
    """The training-signal checks (ttrl.health) as report blocks, (kind, text): "warn" as they stand,
    or, where the evaluation moved beyond noise, a "note" that says both, so the box never
    contradicts the table below it."""
    changed = moved(run)
    out = []
    for warning in learning_warnings(run.steps):
        head, body = (part.strip() for part in warning.split(":", 1))
        if not changed:
            out.append(("warn", f"**{head}.** {body}"))
            continue
        where = ", ".join(f"{name} {pts(m)} ± {200 * se:.1f} points" for name, m, se in changed)
        out.append(("note", f"**Weak training signal.** {body} Still, what signal there was moved the model: avg@{run.k} "
                            f"changed from the base model's beyond two standard errors ({where}; paired by prompt), "
                            "so the results below are a real, if small, effect."))
    return out


def beats_voting(run: Run) -> str:
    """The plain answer to "does training beat just voting?": TTRL avg@k against the bar, the
    better of the base model's greedy answer and its maj@k (greedy alone often beats a vote), and
    how each comparison stands against its noise, each named."""
    base, final, k, bar = run.base(), run.final(), run.k, run.bar()
    q = "Does training beat just voting?"
    if not base or not final:
        return f"{q} Not answered: this needs the base model's evaluation (eval.before) and one after training."
    if bar is None or f"avg@{k}" not in final:
        return f"{q} Not answered: the adaptation prompts have no gold answers."
    a, (m, what) = final[f"avg@{k}"], bar
    of = f"the base model's {'greedy answer' if what == 'base greedy' else f'majority vote of {k} samples'}"
    both = is_number(base.get("greedy")) and is_number(base.get(f"maj@{k}"))
    against = f"{of} ({pct(m)} {what.removeprefix('base ')}" + (f", the better of base greedy and maj@{k})" if both
                                                                 else ")")
    small = _noise(base, final, f"avg@{k}", "greedy" if what == "base greedy" else f"maj@{k}", a - m, what)
    where = graded(final)
    small += f" ({where})" if where else ""
    own = _own_change(base, final, k) + _greedy_change(base, final)
    if any(kind == "warn" for kind, _ in signal_warnings(run)):  # nothing (or little) learnt from: not "a tie"
        head = learning_warnings(run.steps)[0].split(":", 1)[0].lower()
        return (f"{q} **No verdict ({head} in training).** After TTRL one sample is right {pct(a)} of the time "
                f"(avg@{k}) against {against}, but with so little to learn from this says little about what "
                f"TTRL did{small}.{own}")
    if a > m:
        verdict = f"**Yes.** After TTRL one sample is right {pct(a)} of the time (avg@{k}), above {against}: " \
                  f"{pts(a - m)} points"
    elif a == m:
        verdict = f"**A tie.** After TTRL one sample is right {pct(a)} of the time (avg@{k}), exactly as " \
                  f"often as {against}"
    else:
        verdict = f"**Not yet.** After TTRL one sample is right {pct(a)} of the time (avg@{k}), below {against}: " \
                  f"{pts(a - m)} points"
    return f"{q} {verdict}{small}.{own}"


def beyond(difference: float, se: float) -> str:
    """"beyond" when a difference is more than two standard errors from 0, else "within"."""
    return "beyond" if abs(difference) > 2 * se else "within"


def _noise(base: dict, final: dict, metric: str, bar_metric: str, gain: float, what: str = "the bar") -> str:
    """How the gap to the bar compares with its noise: twice the standard error of the per-problem
    differences (`evaluation.paired_change`); for runs without per-problem scores, a caution on
    small sets. Names the comparison, so it is not read as the table's change from base avg@k."""
    change = paired_change(base, final, bar_metric, metric)
    if change is None or change[1] is None:
        n = base.get("n_prompts")
        return f"; on {n} prompts a few points are noise" if is_number(n) and n < 50 else ""
    _, se, n = change
    return (f"; this gap to {what} is {beyond(gain, se)} two standard errors of zero (±{200 * se:.1f} points, "
            f"paired over these {n} prompts)")


def _own_change(base: dict, final: dict, k: int) -> str:
    """A sentence on the other comparison, the table's: TTRL avg@k minus the base model's avg@k,
    with its paired noise ("" without per-problem scores)."""
    change = paired_change(base, final, f"avg@{k}")
    if change is None or change[1] is None:
        return ""
    m, se, n = change
    return (f" Against the base model's own avg@{k} (the change in the table below), one sample is right "
            f"{pts(m)} points more often, ±{200 * se:.1f}: {beyond(m, se)} two standard errors of no change "
            f"over these {n} prompts.")


def _greedy_change(base: dict, final: dict) -> str:
    """A sentence on greedy accuracy, how most users deploy the model: trained against base, with
    its paired noise; said as "worse than the base model" when it fell beyond two standard errors."""
    change = paired_change(base, final, "greedy")
    if change is None or change[1] is None:
        return ""
    m, se, n = change
    if m < -2 * se:
        return (f" **The trained model is worse than the base model** at its greedy answer: {pct(final['greedy'])} "
                f"against {pct(base['greedy'])}, {pts(m)} points, ±{200 * se:.1f} (beyond two standard errors over "
                f"these {n} prompts): keep the base model, or see docs/method.md on collapse.")
    return (f" Greedy answer (how most deploy a model): {pct(final['greedy'])} against the base model's "
            f"{pct(base['greedy'])}, {pts(m)} points, ±{200 * se:.1f}: {beyond(m, se)} two standard errors.")


def _mean(run: Run, key: str) -> float | None:
    _, y = run.series(key)
    return sum(y) / len(y) if y else None


def headline(run: Run, doc: Doc) -> None:
    k, steps = run.k, run.cfg("train.steps") or len(run.steps)
    doc.add("p", f"TTRL adapted {describe_model(run)} on **{run.cfg('data.train', '?')}** for {len(run.steps)} "
                 f"step{'s' * (len(run.steps) != 1)} of {str(run.cfg('algorithm.advantage', '?')).upper()} "
                 f"(N = {run.cfg('rollout.n_votes')} votes, M = {run.cfg('reward.n_train_samples')} trained "
                 f"samples, T = {run.cfg('rollout.temperature')}, lr {run.cfg('algorithm.lr')}), evaluated with "
                 f"k = {k} samples." + ("" if run.finished else f" **The run has not finished** "
                                                                f"({len(run.steps)} of {steps} steps logged)."))
    signal = signal_warnings(run)
    no_signal = [text for kind, text in signal if kind == "warn"]
    for kind, text in signal:  # before any number, so that nobody reads a no-signal run as a result
        doc.add(kind, text)
    collapse = next((r for r in run.steps if isinstance(r.get("collapse_warning"), str)), None)
    if collapse:  # recorded by the trainer the step ttrl.stopping.collapse_reason first fired
        doc.add("warn", f"**Collapse watch, step {collapse['step']}.** "
                        f"{collapse['collapse_warning'].removeprefix('collapse watch: ')}.")
    if run.handed_back:  # which step's model the run exported (train.guard)
        doc.add("warn" if run.handed_back.get("rolled_back") else "p",
                f"**Model handed back: step {run.handed_back['step']}'s.** {run.handed_back['why'][:1].upper()}{run.handed_back['why'][1:]}.")
    cards = []
    for name in run.evals:  # the headline number of each eval set: avg@k, base -> after
        base, final, metric = run.base(name), run.final(name), f"avg@{k}"
        if base and final and metric in base and metric in final:
            cards.append((f"{name} {metric}", f"{pct(base[metric])} → {pct(final[metric])}",
                          f"{pts(final[metric] - base[metric])} points" + (f", {graded(final)}" if graded(final)
                                                                           else "")))
    bar, base = run.bar(), run.base() or {}
    if bar:
        parts = [f"{label} {pct(base[key])}" for key, label in ((f"maj@{k}", f"maj@{k}"), ("greedy", "greedy"))
                 if is_number(base.get(key))]
        cards.append(("bar to beat (adapt)", pct(bar[0]), f"best of base {' / '.join(parts)}"))
    la, ra = _mean(run, "train/label_accuracy"), _mean(run, "train/reward_accuracy")
    if la is not None and ra is not None:
        cards.append(("label / reward accuracy", f"{pct(la)} / {pct(ra)}", "mean over steps"))
    _, mr = run.series("train/majority_ratio")
    if mr:
        cards.append(("train majority ratio", f"{pct(mr[0])} → {pct(mr[-1])}",
                      f"N = {run.cfg('rollout.n_votes')} rollouts at T = {run.cfg('rollout.temperature')}, "
                      "first → last step"))
    if cards:
        doc.add("cards", cards)
    doc.add("p", beats_voting(run))
    if la is not None and ra is not None:
        lucky = " — the \"lucky hit\" effect: when the vote is wrong, samples that disagree with it are " \
                "mostly wrong too, so their 0 reward is still right" if ra > la and not no_signal else ""
        doc.add("p", f"Across training the pseudo-label matched gold on {pct(la)} of prompts, and "
                     f"{pct(ra)} of rewards equalled the reward gold would give{lucky}.")
    some_gold = any(ex.get("gold") is not None for rows in run.evals.values() for row in rows
                    for ex in row.get("examples", []))
    if not run.has_gold and some_gold:  # a partly labelled run from before accuracy was graded on the labelled part
        doc.add("note", "**Partly labelled.** Some prompts have reference answers, but this run was evaluated by a "
                        "ttrl that graded accuracy only when every prompt had one, so accuracy is left out; "
                        "`ttrl eval` grades the labelled prompts.")
    elif not run.has_gold:
        doc.add("note", "**No gold answers.** This run's prompts have no reference answers, so accuracy "
                        "(avg@k, maj@k, pass@k, greedy), label/reward accuracy and the accuracy curves are "
                        "left out; the majority ratios, entropy and the vote histograms show how confident the "
                        "model grew, which is not the same as how right it is.")


def results_table(runs: list[Run]) -> tuple[list[str], list[list]]:
    """Before -> after per eval set (and per run when several): accuracy and majority ratio."""
    many = len(runs) > 1
    ks = {r.k for r in runs}
    kk = str(ks.pop()) if len(ks) == 1 else "k"
    metrics = [("avg", f"avg@{kk}"), ("maj", f"maj@{kk}"), ("pass", f"pass@{kk}"), ("greedy", "greedy"),
               ("majority_ratio", "eval majority ratio")]
    headers = (["run"] if many else []) + ["eval set", "prompts"] + [h for _, h in metrics]
    rows = []
    for run in runs:
        for name, evals in run.evals.items():
            base, final = run.base(name), run.final(name)
            if not evals:
                continue
            last = evals[-1]
            prompts = last.get("n_prompts") if last.get("n_prompts") is not None else ""
            if graded(last):  # partly labelled: accuracy is over the prompts with a gold answer
                prompts = f"{prompts} ({last['n_labelled']} graded)"
            row = ([run.name] if many else []) + [name if many else set_label(name), prompts]
            for m, _ in metrics:
                key = f"{m}@{run.k}" if m in ("avg", "maj", "pass") else m
                b, f = (base or {}).get(key), (final or {}).get(key)
                if b is not None and f is not None:
                    row.append((b, f))
                else:
                    row.append(pct(f if f is not None else b))
            rows.append(row)
    keep = [i for i, h in enumerate(headers) if any(row[i] != "–" for row in rows)]  # no gold: no accuracy columns
    return [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]


def setup_table(runs: list[Run]) -> tuple[list[str], list[list]]:
    fields = [("model", describe_model), ("data", lambda r: str(r.cfg("data.train"))),
              ("N", lambda r: r.cfg("rollout.n_votes")), ("M", lambda r: r.cfg("reward.n_train_samples")),
              ("T", lambda r: r.cfg("rollout.temperature")),
              ("algorithm", lambda r: f"{r.cfg('algorithm.advantage')}, {r.cfg('reward.kind')} reward"
                                      + (", contrast" if r.cfg("reward.contrast") else "")),
              ("voting", voting),
              ("lr", lambda r: r.cfg("algorithm.lr")), ("KL coef", lambda r: r.cfg("algorithm.kl_coef")),
              ("steps × prompts", lambda r: f"{len(r.steps)} × {r.cfg('train.prompts_per_step')}"),
              ("holdout", lambda r: r.cfg("data.holdout")), ("eval k, T", lambda r: f"{r.k}, "
                                                                                  f"{r.cfg('eval.temperature')}"),
              ("seed", lambda r: r.cfg("train.seed"))]
    if len(runs) == 1:
        return ["setting", "value"], [[k, str(f(runs[0]))] for k, f in fields]
    return ["run"] + [k for k, _ in fields], [[r.name] + [str(f(r)) for _, f in fields] for r in runs]


def voting(run: Run) -> str:
    """How the N votes were drawn: all at once, or sequentially (rollout.vote_round, vote_confidence)."""
    rounds, confidence = run.cfg("rollout.vote_round") or 0, run.cfg("rollout.vote_confidence") or 0
    if not rounds:
        return "all N at once"
    return f"sequential, rounds of {rounds}" + (f", stop at confidence {confidence}" if confidence else "")


def env_table(run: Run) -> list[list]:
    env = run.env
    keys = [("ttrl", "ttrl"), ("python", "python"), ("torch", "torch"), ("transformers", "transformers"),
            ("device", "device"), ("CPU", "cpu"), ("CPU count", "cpu_count"), ("platform", "platform"),
            ("git commit", "git_commit"), ("started", "started"), ("command", "command")]
    rows = [[label, str(env[key])] for label, key in keys if key in env]
    secs = sum(r.get("perf/step_seconds") or 0 for r in run.steps)
    if secs:
        rows.append(["training time", f"{secs:.0f} s ({secs / max(1, len(run.steps)):.1f} s / step)"])
    return rows


def examples(run: Run, per_set: dict | None = None) -> list[dict]:
    """A few prompts with their vote histograms before and after training."""
    per_set = per_set or {"adapt": 4}
    out = []
    for name, rows in run.evals.items():
        n = per_set.get(name, 2)
        final = rows[-1] if rows else {}
        base = run.base(name) if run.final(name) else None
        before = {e["id"]: e for e in (base or {}).get("examples", [])}
        for ex in final.get("examples", [])[:n]:
            out.append({"set": name, "id": ex["id"], "problem": ex.get("problem") or ex.get("prompt"),
                        "gold": ex.get("gold"), "after": ex, "before": before.get(ex["id"])})
    return out


def build_report(run: Run, plots: list[Plot], missing: list[str]) -> Doc:
    doc = Doc(f"TTRL report · {run.name}")
    headline(run, doc)
    doc.add("h2", "Before and after")
    headers, rows = results_table([run])
    if rows:
        doc.add("table", headers, rows)
        doc.add("small", "adapt: the prompts trained on (TTRL is transductive: it learns on the test prompts "
                         "without their answers); heldout: prompts of the same source never trained on. "
                         "avg@k: mean accuracy of k samples (pass@1); maj@k: accuracy of their majority vote; "
                         "greedy: accuracy of the temperature-0 answer. The bar to beat is the better of the base "
                         "model's greedy and maj@k. pass@k (at least one of k samples right) often falls as TTRL "
                         "sharpens the model: its samples agree more, so fewer prompts get a lucky right one. "
                         "Eval majority ratio: share of the k evaluation samples (at eval.temperature) in the "
                         "winning answer — not the train majority ratio of the N training rollouts."
                         + "".join(f" {name}: accuracy {graded(rows[-1])}, those with a gold answer."
                                   for name, rows in run.evals.items() if rows and graded(rows[-1])))
    else:
        doc.add("note", "No evaluation recorded.")
    doc.add("h2", "Training curves")
    doc.add("figures", plots)
    if missing:
        doc.add("small", "Not shown: " + "; ".join(missing) + ".")
    exs = examples(run)
    if exs:
        doc.add("h2", "Example votes")
        doc.add("small", "Vote histogram over the k evaluation samples (answer → count), before and after "
                         "training; the top answer is the pseudo-label, ✓ marks the gold answer where known.")
        doc.add("examples", exs)
    doc.add("h2", "Setup and environment")
    env = env_table(run) if run.env else env_table(run) + [["", f"({ENVIRONMENT_FILE} was not recorded)"]]
    doc.add("tables", [("Setup", *setup_table([run])), ("Environment", ["", ""], env)])
    doc.add("details", "Full config (config.json)", json.dumps(run.config, indent=2))
    damaged(run, doc)
    return doc


def damaged(run: Run, doc: Doc, many: bool = False) -> None:
    """Say what was left out of the run files as damaged (also printed as warnings)."""
    if run.problems:
        shown = "; ".join(run.problems[:8]) + (f"; and {len(run.problems) - 8} more" if len(run.problems) > 8 else "")
        doc.add("note", f"**Damaged run files{f' in {run.name}' if many else ''}.** Left out: {shown}.")


def paired_table(runs: list[Run], left_out: list[str] | None = None) -> tuple[list[str], list[list]] | None:
    """The first run's final avg@k minus each other run's, per eval set, over the prompts both
    evaluated, with twice the paired standard error (`evaluation.paired_change`): is TTRL (listed
    first) ahead of a control arm beyond noise? None when no pair of evaluations kept per-prompt scores.
    `left_out` gets a sentence per run or set that could have been paired but was not, and why."""
    first, rows = runs[0], []
    said = left_out if left_out is not None else []
    for other in runs[1:]:
        if first.k != other.k:
            said.append(f"{other.name} is left out: it was evaluated with k = {other.k} samples, {first.name} with "
                        f"k = {first.k}; evaluate both with the same eval.n_samples (`ttrl eval RUN "
                        f"eval.n_samples={first.k}`) to pair them")
            continue
        for name in first.evals:
            a, b = first.final(name), other.final(name)
            change = paired_change(b, a, f"avg@{first.k}") if a and b else None
            if change is None and a and b and all(f"avg@{first.k}" in (r.get("scores") or {}) for r in (a, b)):
                said.append(f"{other.name} on {name} is left out: it shares no evaluated prompt with {first.name} "
                            "(other data, or another data.holdout split)")
            if change is None or change[1] is None:
                continue
            mean, se, n = change
            rows.append([other.name, name, f"{pts(mean)} points", f"±{200 * se:.1f}",
                         beyond(mean, se), n])
    if not rows:
        return None
    return ["against", "eval set", f"{first.name} minus it (avg@{first.k})", "2 se", "noise", "prompts"], rows


def build_compare(runs: list[Run], plots: list[Plot], missing: list[str]) -> Doc:
    doc = Doc(f"TTRL comparison · {len(runs)} runs")
    doc.add("p", "Does training beat just voting?")
    for r in runs:
        doc.add("p", f"**{r.name}**: {beats_voting(r).split('? ', 1)[1]}")
        for warning in learning_warnings(r.steps):
            doc.add("warn", f"**{r.name}**: {warning}")
    doc.add("h2", "Results")
    doc.add("table", *results_table(runs))
    left_out: list[str] = []
    paired = paired_table(runs, left_out)
    if paired:
        doc.add("p", f"**{runs[0].name}** against each other run, prompt by prompt (its final avg@k minus the "
                     "other's, on the prompts both evaluated; ± two paired standard errors):")
        doc.add("table", *paired)
    for sentence in left_out:
        doc.add("note", f"**Not paired.** {sentence}.")
    doc.add("h2", "Curves")
    doc.add("legend", [(r.name, RUN_COLOURS[i % len(RUN_COLOURS)]) for i, r in enumerate(runs)])
    doc.add("figures", plots)
    if missing:
        doc.add("small", "Not shown: " + "; ".join(missing) + ".")
    doc.add("h2", "Setup")
    doc.add("table", *setup_table(runs))
    for r in runs:
        damaged(r, doc, many=True)
    return doc


# ---------------------------------------------------------------- rendering

CSS = """
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#111827;
background:#f9fafb;margin:0}
main{max-width:1180px;margin:0 auto;padding:28px 24px 48px}
h1{font-size:24px;margin:0 0 6px}h2{font-size:17px;margin:30px 0 10px;border-bottom:1px solid #e5e7eb;
padding-bottom:4px}
p{margin:8px 0;max-width:900px}.small{color:#6b7280;font-size:12.5px;max-width:900px}
.note{background:#fffbeb;border-left:4px solid #f59e0b;padding:8px 12px;border-radius:4px;max-width:880px}
.warn{background:#fef2f2;border-left:4px solid #dc2626;padding:8px 12px;border-radius:4px;max-width:880px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:150px}
.card .l{color:#6b7280;font-size:12px}.card .v{font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}
.card .d{font-size:12px;color:#6b7280}
table{border-collapse:collapse;background:#fff;border:1px solid #e5e7eb;border-radius:6px;font-size:13px;
font-variant-numeric:tabular-nums}
th,td{padding:5px 10px;border-bottom:1px solid #f3f4f6;text-align:left;vertical-align:top;max-width:460px}
th{background:#f3f4f6;font-weight:600}td.ba{white-space:nowrap}.up{color:#047857}.down{color:#b91c1c}
.flat{color:#9ca3af}td.ba span{font-size:11.5px;margin-left:3px}
.tables{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}.tables h3{font-size:14px;margin:0 0 6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:6px}
figure img{width:100%;display:block}
.ex{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:12px}
.exc{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px 12px;font-size:12.5px}
.exc h3{font-size:13px;margin:0 0 4px}.exc .m{color:#6b7280}
.hist{display:grid;grid-template-columns:40% 1fr 24px;gap:2px 6px;align-items:center;
margin:4px 0 8px}
.bar{height:10px;background:#9ca3af;border-radius:2px}.bar.g{background:#059669}
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:12px;height:12px;
border-radius:2px;margin-right:5px;vertical-align:-1px}
details{margin-top:12px}pre{background:#fff;border:1px solid #e5e7eb;padding:10px;font-size:12px;overflow:auto}
code{font-size:12px}
"""


def _inline(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def _cell_html(cell) -> str:
    if isinstance(cell, tuple):  # (before, after): both, and the change coloured by its sign
        b, f = cell
        sign = "up" if f > b else "down" if f < b else "flat"
        return f'<td class="ba">{pct(b)} → <b>{pct(f)}</b> <span class="{sign}">{pts(f - b)}</span></td>'
    return f"<td>{html.escape(str(cell))}</td>"


def _hist_html(ex: dict | None, gold, when: str) -> str:
    if not ex:
        return f'<div class="m">{when} · not evaluated</div>'
    from ttrl.grading import is_equivalent

    hist = ex.get("histogram") or []
    total = sum(c for _, c in hist) or 1
    rows = []
    for answer, count in hist[:6]:
        ok = gold is not None and answer != "<no answer>" and is_equivalent(answer, gold)
        rows.append(f"<code>{html.escape(_short(answer, 24))}{' ✓' if ok else ''}</code>"
                    f'<div><div class="bar{" g" if ok else ""}" style="width:{100 * count / total:.0f}%"></div></div>'
                    f"<span>{count}</span>")
    if len(hist) > 6:
        rows.append(f"<code>+{len(hist) - 6} more</code><div></div><span>{sum(c for _, c in hist[6:])}</span>")
    return (f'<div class="m">{when} · pseudo-label <strong>{html.escape(_short(ex.get("pseudo_label"), 24))}'
            f'</strong> · majority {pct(ex.get("majority_ratio"))}</div><div class="hist">{"".join(rows)}</div>')


def _table_html(headers: list[str], rows: list[list]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>" if any(headers) else ""
    return f"<table>{head}" + "".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>" for row in rows) \
        + "</table>"


def to_html(doc: Doc, plots_b64: dict) -> str:
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
           f"content='width=device-width,initial-scale=1'><title>{html.escape(doc.title)}</title>"
           f"<style>{CSS}</style></head><body><main><h1>{html.escape(doc.title)}</h1>"]
    for kind, *args in doc.blocks:
        if kind == "h2":
            out.append(f"<h2>{html.escape(args[0])}</h2>")
        elif kind in ("p", "small", "note", "warn"):
            out.append(f'<p class="{kind}">{_inline(args[0])}</p>')
        elif kind == "cards":
            out.append('<div class="cards">' + "".join(
                f'<div class="card"><div class="l">{html.escape(l)}</div><div class="v">{html.escape(v)}</div>'
                f'<div class="d">{html.escape(d)}</div></div>' for l, v, d in args[0]) + "</div>")
        elif kind == "table":
            out.append(_table_html(*args))
        elif kind == "tables":
            out.append('<div class="tables">' + "".join(f"<div><h3>{html.escape(t)}</h3>{_table_html(h, r)}</div>"
                                                       for t, h, r in args[0]) + "</div>")
        elif kind == "figures":
            out.append('<div class="grid">' + "".join(
                f'<figure><img alt="{html.escape(p.title)}" src="data:image/png;base64,{plots_b64[p.slug]}">'
                f"</figure>" for p in args[0]) + "</div>")
        elif kind == "legend":
            out.append('<p class="legend">' + "".join(f'<span><i style="background:{c}"></i>{html.escape(n)}</span>'
                                                      for n, c in args[0]) + "</p>")
        elif kind == "examples":
            cards = []
            for ex in args[0]:
                problem = f'<div>{html.escape(_short(ex["problem"], 200))}</div>' if ex["problem"] else ""
                gold = f'gold <strong>{html.escape(_short(ex["gold"], 30))}</strong>' if ex["gold"] is not None \
                    else "no gold answer"
                cards.append(f'<div class="exc"><h3>{html.escape(_short(ex["id"], 60))} '
                             f'<span class="m">· {html.escape(ex["set"])} · {gold}</span></h3>{problem}'
                             f'{_hist_html(ex["before"], ex["gold"], "before")}'
                             f'{_hist_html(ex["after"], ex["gold"], "after")}</div>')
            out.append('<div class="ex">' + "".join(cards) + "</div>")
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(args[0])}</summary><pre>{html.escape(args[1])}</pre>"
                       "</details>")
    out.append("</main></body></html>")
    return "\n".join(out)


def _md(text) -> str:
    """Text from a run (ids, answers, file names) as literal Markdown: no raw HTML (`<script>`
    stays text, as report.html escapes it) and no stray emphasis, links or table cells."""
    text = html.escape(str(text).replace("\n", " "), quote=False)
    # `_` inside a word (max_new_tokens) never emphasises in CommonMark, so it stays as written
    return re.sub(r"([\\`*\[\]|#]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))", r"\\\1", text)


def _md_prose(text: str) -> str:
    """Our own sentences with their `**bold**` kept and everything else literal: the values in them
    (a run's name, data set, model, stop message) can open no link, HTML or emphasis."""
    parts = re.split(r"\*\*(.+?)\*\*", text)
    return "".join(f"**{_md(part)}**" if i % 2 else _md(part) for i, part in enumerate(parts))


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _printable(text: str) -> str:
    """Control characters from a run's text (a NUL in an answer) as U+FFFD, as a browser shows them."""
    return _CONTROL.sub("\ufffd", text)


def _fence(text: str, lang: str = "") -> list[str]:
    """A code block that no backtick run inside `text` can close early."""
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return [ticks + lang, text, ticks]


def _md_cell(cell) -> str:
    if isinstance(cell, tuple):
        return f"{pct(cell[0])} → **{pct(cell[1])}** ({pts(cell[1] - cell[0])})"
    return _md(cell)


def _hist_md(ex: dict | None, gold) -> list[str]:
    if not ex:
        return ["  not evaluated"]
    from ttrl.grading import is_equivalent

    hist = ex.get("histogram") or []
    total = sum(c for _, c in hist) or 1
    width = max([len(_short(a, 24)) for a, _ in hist[:6]] + [1])
    lines = []
    for answer, count in hist[:6]:
        ok = gold is not None and answer != "<no answer>" and is_equivalent(answer, gold)
        lines.append(f"  {_short(answer, 24):<{width}} {'█' * max(1, round(20 * count / total)):<20} {count}"
                     f"{'  ✓ gold' if ok else ''}")
    if len(hist) > 6:
        lines.append(f"  +{len(hist) - 6} more answers, {sum(c for _, c in hist[6:])} votes")
    return lines


def _table_md(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "---|" * len(headers)] + \
        ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows] + [""]


def to_markdown(doc: Doc, plot_dir: str) -> str:
    out = [f"# {_md(doc.title)}", ""]
    for kind, *args in doc.blocks:
        if kind == "h2":
            out += [f"## {args[0]}", ""]
        elif kind in ("p", "small"):
            out += [_md_prose(args[0]) if kind == "p" else f"<sub>{_md_prose(args[0])}</sub>", ""]
        elif kind == "note":
            out += [f"> {_md_prose(args[0])}", ""]
        elif kind == "warn":
            out += [f"> ⚠ {_md_prose(args[0])}", ""]
        elif kind == "cards":
            out += [f"- **{_md(l)}**: {_md(v)} ({_md(d)})" for l, v, d in args[0]] + [""]
        elif kind == "table":
            out += _table_md(*args)
        elif kind == "tables":
            for title, headers, rows in args[0]:
                out += [f"### {title}", ""] + _table_md(headers, rows)
        elif kind == "figures":
            out += [f"![{p.title}]({plot_dir}/{p.slug}.png)" for p in args[0]] + [""]
        elif kind == "legend":
            out += ["Runs, in plot colour order: " + ", ".join(_md(n) for n, _ in args[0]), ""]
        elif kind == "examples":
            for ex in args[0]:
                gold = f"gold {_md(ex['gold'])}" if ex["gold"] is not None else "no gold answer"
                head = f"**{_md(ex['id'])}** ({_md(ex['set'])}, {gold})" + (f": {_md(_short(ex['problem'], 200))}"
                                                                            if ex["problem"] else "")
                block = []
                for when in ("before", "after"):
                    e = ex[when]
                    label = f"pseudo-label {_short(e.get('pseudo_label'), 24)}, eval majority ratio " \
                            f"{pct(e.get('majority_ratio'))}" if e else ""
                    block += [f"{when}: {label}"] + _hist_md(e, ex["gold"])
                out += [head, ""] + _fence("\n".join(block)) + [""]
        elif kind == "details":
            out += [f"<details><summary>{html.escape(args[0])}</summary>", ""] + _fence(args[1], "json") + \
                ["", "</details>", ""]
    return "\n".join(out)


def _write(doc: Doc, plots: list[Plot], out_dir: Path, stem: str) -> Path:
    try:
        plot_dir = out_dir / stem
        plot_dir.mkdir(parents=True, exist_ok=True)
        for old in plot_dir.glob("*.png"):  # a panel left out this time must not linger from a previous report
            old.unlink()
        for p in plots:
            (plot_dir / f"{p.slug}.png").write_bytes(p.png)
        (out_dir / f"{stem}.md").write_text(_printable(to_markdown(doc, stem)), encoding="utf-8")
        page = to_html(doc, {p.slug: base64.b64encode(p.png).decode() for p in plots})
        (out_dir / f"{stem}.html").write_text(_printable(page), encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot write {stem}.html / {stem}.md in {out_dir}: {e.strerror or e}; "
                          "choose a directory you can write to") from None
    return out_dir / f"{stem}.html"


def write_report(run_dir: str | Path) -> Path:
    """RUN_DIR/report.html, report.md, report/*.png and metrics.csv; returns the HTML path."""
    run = load_run(run_dir)
    data = run.config.get("data", {}) if isinstance(run.config, dict) else {}
    try:  # the examples are graded as the run graded them
        use_answer_checker(str(data.get("answer_extractor") or ""), str(data.get("answer_equivalence") or ""))
    except PluginError as e:
        warn(f"the run's own answer checker does not load ({e}); its examples are graded by ttrl's")
        use_answer_checker()
    plots, missing = make_plots([run])
    page = _write(build_report(run, plots, missing), plots, Path(run_dir), "report")
    write_csv(run_dir)
    return page


def write_compare(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """OUT_DIR/compare.html, compare.md and compare/*.png: runs side by side, curves overlaid."""
    resolved = [Path(d).resolve() for d in run_dirs]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            first = run_dirs[resolved.index(path)]
            also = f" (as {first} and {run_dirs[i]})" if str(first) != str(run_dirs[i]) else ""
            raise ReportError(f"{first} is given twice{also}: a run compared with itself says nothing; "
                              "give different runs")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs both named `run` in different folders: tell them apart by path
        if names.count(r.name) > 1:
            r.name = str(r.path)
    plots, missing = make_plots(runs)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create {out}: {e.strerror or e}; pass another --output") from None
    return _write(build_compare(runs, plots, missing), plots, out, "compare")

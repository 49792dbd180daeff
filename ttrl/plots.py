"""The report's plots: small multiples of the training curves and the eval accuracy over steps,
as PNG bytes (matplotlib, drawn off-screen). One colour per quantity in a run's report; one
colour per run (and a line style per quantity) when runs are compared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ttrl.rundir import Run

# One colour per quantity, the same in every report; compare gives each run its own colour instead.
COLOURS = {"train/rollout_accuracy": "#0072B2", "base": "#555555", "train/label_accuracy": "#E69F00",
           "train/reward_accuracy": "#009E73", "train/majority_ratio": "#CC79A7", "train/entropy": "#D55E00",
           "train/response_length": "#56B4E9", "train/reward": "#117733", "loss/kl": "#882255",
           "loss/approx_kl": "#AA4499", "perf/tokens_per_second": "#332288", "adapt": "#0072B2",
           "heldout": "#E69F00"}
RUN_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#332288"]
STYLES = ["-", "--", ":", "-."]
RC = {"font.size": 8.5, "axes.titlesize": 9.5, "axes.titleweight": "bold", "axes.titlelocation": "left",
      "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e5e7eb",
      "grid.linewidth": 0.6, "axes.edgecolor": "#9ca3af", "legend.frameon": False, "legend.fontsize": 7.5,
      "lines.linewidth": 1.8, "font.family": "DejaVu Sans"}

# (slug, title, [(metric key, label)], y is a fraction in [0, 1])
PANELS = [
    ("accuracy", "Rollout accuracy vs the bar to beat", [("train/rollout_accuracy", "rollout accuracy (pass@1)")],
     True),
    ("label_reward", "Label and reward accuracy", [("train/label_accuracy", "label accuracy"),
                                                  ("train/reward_accuracy", "reward accuracy")], True),
    ("majority_ratio", "Train majority ratio (N rollouts)", [("train/majority_ratio", "train majority ratio")],
     True),
    ("entropy", "Entropy (nats / token)", [("train/entropy", "entropy")], False),
    ("response_length", "Response length (tokens)", [("train/response_length", "mean length")], False),
    ("reward", "Mean reward", [("train/reward", "reward")], True),
    ("kl", "KL", [("loss/kl", "KL to reference"), ("loss/approx_kl", "KL to rollout policy")], False),
    ("throughput", "Rollout tokens / s", [("perf/tokens_per_second", "tokens / s")], False),
]


@dataclass
class Plot:
    slug: str
    title: str
    png: bytes = b""
    caption: str = ""


def _ema(values: list[float], span: int) -> list[float]:
    a, out, acc = 2 / (span + 1), [], None
    for v in values:
        acc = v if acc is None else a * v + (1 - a) * acc
        out.append(acc)
    return out


def _kl_keys(run: Run) -> set[str]:
    """KL terms that were measured: to the reference only with a KL penalty, to the rollout policy only
    when it moves within a step (ppo_epochs > 1; with one epoch it is 0 by construction)."""
    keys = set()
    if (run.cfg("algorithm.kl_coef", 0) or 0) > 0:
        keys.add("loss/kl")
    if (run.cfg("algorithm.ppo_epochs", 1) or 1) > 1:
        keys.add("loss/approx_kl")
    return keys


def make_plots(runs: list[Run]) -> tuple[list[Plot], list[str]]:
    """The small multiples for one run (colour per quantity) or several (colour per run);
    also the reasons for the panels left out."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    many = len(runs) > 1
    plots, missing = [], []
    with rc_context(RC):
        for slug, title, series, unit in PANELS:
            fig = Figure(figsize=(4.3, 2.7), dpi=150, layout="constrained")
            ax = fig.add_subplot()
            drawn, styles = False, set()
            for r, run in enumerate(runs):
                named = False  # compare: the run's name goes on its first curve in the panel
                for j, (key, label) in enumerate(series):
                    if slug == "kl" and key not in _kl_keys(run):
                        continue
                    x, y = run.series(key)
                    if not x:
                        continue
                    colour = RUN_COLOURS[r % len(RUN_COLOURS)] if many else COLOURS[key]
                    style = STYLES[j % len(STYLES)] if many else "-"
                    name = (None if named else run.name) if many else label
                    if len(y) > 30:  # long runs: faint raw curve, bold smoothed one
                        ax.plot(x, y, color=colour, alpha=0.25, linewidth=0.8, linestyle=style)
                        y = _ema(y, max(3, len(y) // 15))
                    ax.plot(x, y, color=colour, linestyle=style, label=name, marker="o" if len(x) <= 12 else None,
                            markersize=3)
                    drawn = named = True
                    styles.add(j)
                if slug == "accuracy" and drawn:
                    _draw_baseline(ax, run, RUN_COLOURS[r % len(RUN_COLOURS)] if many else None)
            if not drawn:
                missing.append(_why_missing(slug, runs))
                continue
            if unit:
                ax.set_ylim(-0.03, 1.03)
                ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
            elif ax.dataLim.y0 >= 0:  # from zero, so that a change of 6.0 -> 5.9 tokens does not look like a cliff
                ax.set_ylim(bottom=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("step")
            ax.set_title(title.replace("@k", f"@{runs[0].k}") if not many or len({r.k for r in runs}) == 1
                         else title)
            if many and len(series) > 1:  # colour tells the run, line style the quantity: grey keys for styles
                for j in sorted(styles):
                    ax.plot([], [], color="#6b7280", linestyle=STYLES[j % len(STYLES)], label=series[j][1])
            if many and slug == "accuracy":
                ax.plot([], [], color="#6b7280", linestyle="--", label="bar: base greedy or maj@k")
                ax.plot([], [], color="#6b7280", linestyle="none", marker="D", label="eval avg@k")
            if ax.get_legend_handles_labels()[0]:
                _legend(ax, many)
            plots.append(Plot(slug, ax.get_title(loc="left"), _png(fig)))
        eval_plot = _eval_plot(runs)
        if eval_plot:
            plots.append(eval_plot)
        elif not any(r.has_gold for r in runs):
            missing.append("eval accuracy over steps: no gold answers")
        else:
            missing.append("eval accuracy over steps: evaluated only before and after training "
                           "(set eval.every to see it during training)")
    return plots, missing


def _draw_baseline(ax, run: Run, colour: str | None) -> None:
    """The bar to beat on the adapt set (the better of base greedy and base maj@k) as a line, and
    eval avg@k at each evaluation as points: does sampled pass@1 climb past what the base model
    already gets by decoding greedily or by voting?"""
    bar, k = run.bar(), run.k
    if bar:
        ax.axhline(bar[0], color=colour or COLOURS["base"], linestyle="--", linewidth=1.2,
                   label=None if colour else f"bar: {bar[1]} (eval)")
    pts_ = [(row["step"], row[f"avg@{k}"]) for row in run.evals.get("adapt", []) if row.get(f"avg@{k}") is not None]
    if pts_:
        ax.plot(*zip(*pts_), linestyle="none", marker="D", markersize=4.5, color=colour or "#111827",
                label=None if colour else f"eval avg@{k}")


def _eval_plot(runs: list[Run]) -> Plot | None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    many = len(runs) > 1
    fig = Figure(figsize=(4.3, 2.7), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    for r, run in enumerate(runs):
        k = run.k
        for s, (name, rows) in enumerate(run.evals.items()):
            rows = [row for row in rows if f"avg@{k}" in row]
            if len({row["step"] for row in rows}) <= 2 or (many and name != "adapt"):
                continue
            colour = RUN_COLOURS[r % len(RUN_COLOURS)] if many else COLOURS.get(name, RUN_COLOURS[(s + 2) % 8])
            x = [row["step"] for row in rows]
            ax.plot(x, [_value(row, f"avg@{k}") for row in rows], color=colour, marker="o", markersize=3,
                    label=run.name if many else f"{name} avg@{k}")
            ax.plot(x, [_value(row, f"maj@{k}") for row in rows], color=colour, linestyle="--", linewidth=1.1,
                    label=None if many else f"{name} maj@{k}")
            if not many and any(f"pass@{k}" in row for row in rows):  # falls as the model sharpens
                ax.plot(x, [_value(row, f"pass@{k}") for row in rows], color=colour, linestyle=":", linewidth=1.1,
                        label=f"{name} pass@{k}")
            drawn = True
    if not drawn:
        return None
    ax.set_ylim(-0.03, 1.03)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_title("Eval accuracy over steps" + (" (adapt; dashed: maj@k)" if many else ""))
    _legend(ax, many)
    return Plot("eval", ax.get_title(loc="left"), _png(fig))


def _value(row: dict, key: str) -> float:
    value = row.get(key)
    return float("nan") if value is None else value  # a gap in the line, not a crash


def _legend(ax, many: bool) -> None:
    if many:  # one entry per run: beside the axes, so no curve hides behind it
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    else:
        ax.legend(loc="best")


def _why_missing(slug: str, runs: list[Run]) -> str:
    if slug in ("accuracy", "label_reward"):
        return f"{slug.replace('_', ' and ')} curves: the prompts trained on have no gold answers"
    if slug == "kl":
        return "KL: not measured (algorithm.kl_coef = 0 keeps no reference model, and with ppo_epochs = 1 " \
               "the policy equals the rollout policy)"
    return f"{slug.replace('_', ' ')}: no training step logged"


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    # No Software tag: matplotlib's names its web site, and the report holds no URL at all.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()

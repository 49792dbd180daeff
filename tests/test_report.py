"""`ttrl report` and `ttrl compare`: from a recorded run, a run without gold answers, a run that
stopped early, a real tiny run, and (slow) rendered in headless Chromium.

tests/data/report_run/ was recorded from a real run of the embedded SmolLM2-135M:
    ttrl train --config configs/tiny.yaml --output-dir RUN 'model.architecture={}' train.steps=4 \
        train.prompts_per_step=3 eval.every=2 algorithm.kl_coef=0.05 data.arithmetic.n=12
then made commit-sized: summary.json keeps 4 examples per evaluation and is written compactly;
model/ and tensorboard/ are left out.
"""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ttrl import report
from ttrl.cli import build_parser, main
from ttrl.launch import environment
from ttrl.report import Run, beats_voting, load_run, write_compare, write_report

FIXTURE = Path(__file__).parent / "data" / "report_run"
TINY = Path(__file__).parents[1] / "ttrl" / "configs" / "tiny.yaml"
GOLD_KEYS = ("train/label_accuracy", "train/reward_accuracy", "train/rollout_accuracy")


def recorded_run(tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / name))


def no_gold_run(tmp_path: Path, name: str = "nogold") -> Path:
    """The recorded run as the trainer writes it for prompts without answers: no gold-based keys."""
    run = recorded_run(tmp_path, name)
    acc = re.compile(r"^(avg|maj|pass)@\d+$|^greedy$")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k not in GOLD_KEYS and not acc.match(k.rsplit("/", 1)[-1])}
            for r in rows]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((run / "summary.json").read_text())
    for entries in summary["evals"].values():
        for entry in entries:
            for key in [k for k in entry if acc.match(k)]:
                del entry[key]
            for ex in entry["examples"]:
                ex.update(gold=None, n_correct=None, maj_correct=None)
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def assert_self_contained(page: Path, pngs: list[Path]) -> None:
    """Every plot embedded as base64 PNG, and nothing that would reach the network."""
    text = page.read_text(encoding="utf-8")
    assert pngs
    for png in pngs:
        assert base64.b64encode(png.read_bytes()).decode() in text, png.name
    assert text.count("data:image/png;base64,") == len(pngs)
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(script|link|iframe)\b|@import|url\(", text)
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', text))


def test_report_from_recorded_run(tmp_path):
    run = recorded_run(tmp_path)
    page = write_report(run)
    pngs = sorted((run / "report").glob("*.png"))
    assert page == run / "report.html"
    assert_self_contained(page, pngs)
    # every curve the issue asks for: the fixture has gold answers, a KL penalty and 3 evaluations
    assert {p.stem for p in pngs} == {"accuracy", "label_reward", "majority_ratio", "entropy", "response_length",
                                      "reward", "kl", "throughput", "eval"}
    md = (run / "report.md").read_text()
    for png in pngs:
        assert f"](report/{png.name})" in md
    text = page.read_text()
    cfg = json.loads((run / "config.json").read_text())
    env = json.loads((run / "environment.json").read_text())
    for needle in ("Does training beat just voting?", "adapt (trained on, transductive)", "heldout (never trained",
                   "avg@4", "maj@4", "pass@4", "greedy", "Example votes", "pseudo-label", env["torch"],
                   env["transformers"], env["python"], cfg["model"]["name"], "N = 8 votes", "M = 4"):
        assert needle in text and needle in md, needle
    assert "No gold answers" not in text


def test_beats_voting_compares_ttrl_avg_with_base_maj():
    def run(avg, maj):
        evals = {"adapt": [{"step": 0, "n_prompts": 100, "avg@4": 0.1, "maj@4": maj},
                           {"step": 5, "n_prompts": 100, "avg@4": avg, "maj@4": 0.9}]}
        return Run(Path("x"), "x", {"eval": {"n_samples": 4}}, {}, [], evals, True)

    assert "**Yes.**" in beats_voting(run(0.5, 0.4)) and "+10.0 points" in beats_voting(run(0.5, 0.4))
    assert "**Not yet.**" in beats_voting(run(0.3, 0.4)) and "-10.0 points" in beats_voting(run(0.3, 0.4))
    assert "**A tie.**" in beats_voting(run(0.4, 0.4))
    no_base = Run(Path("x"), "x", {}, {}, [], {"adapt": [{"step": 5, "avg@4": 0.5}]}, True)
    assert "Not answered" in beats_voting(no_base)


def test_run_without_gold_says_so_and_leaves_out_gold_parts(tmp_path):
    run = no_gold_run(tmp_path)
    page = write_report(run)
    pngs = sorted((run / "report").glob("*.png"))
    assert_self_contained(page, pngs)
    stems = {p.stem for p in pngs}
    assert not stems & {"accuracy", "label_reward", "eval"}
    assert {"majority_ratio", "entropy", "reward"} <= stems
    for text in (page.read_text(), (run / "report.md").read_text()):
        assert "No gold answers" in text
        assert "Not answered: the adaptation prompts have no gold answers" in text
        assert "no gold answer" in text  # the example votes
        assert "avg@4" not in text and "✓" not in text.replace("✓ marks", "")


def test_unfinished_run_reports_what_was_logged(tmp_path):
    run = recorded_run(tmp_path)
    (run / "summary.json").unlink()  # killed before the end: evaluations come from metrics.jsonl
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[:-3]) + '\n{"step": 4, "train/rew')  # and a torn line
    loaded = load_run(run)
    assert not loaded.finished and loaded.evals["adapt"][0]["step"] == 0
    text = write_report(run).read_text()
    assert "The run has not finished" in text


def test_compare_two_runs(tmp_path):
    a, b = recorded_run(tmp_path, "with-gold"), no_gold_run(tmp_path, "without-gold")
    page = write_compare([a, b], tmp_path / "cmp")
    assert page == tmp_path / "cmp" / "compare.html"
    assert_self_contained(page, sorted((tmp_path / "cmp" / "compare").glob("*.png")))
    md = (tmp_path / "cmp" / "compare.md").read_text()
    for text in (page.read_text(), md):
        assert "with-gold" in text and "without-gold" in text
    assert "](compare/majority_ratio.png)" in md


def test_compare_weighs_the_first_run_against_each_other_prompt_by_prompt(tmp_path):
    """A TTRL run listed first, a control after: the difference of their final avg@k on the prompts
    both evaluated, with twice its paired standard error (runs without per-prompt scores: no table)."""
    from ttrl.report import build_compare, paired_table, to_markdown

    def run(name, after):
        ids = [str(i) for i in range(len(after))]
        rows = [{"step": 0, "n_prompts": len(ids), "avg@4": 0.1, "maj@4": 0.2},
                {"step": 5, "n_prompts": len(ids), "avg@4": sum(after) / len(ids), "maj@4": 0.5,
                 "scores": {"id": ids, "avg@4": after}}]
        return Run(Path(name), name, {"eval": {"n_samples": 4}}, {}, [], {"adapt": rows}, True)

    ttrl, control = run("ttrl", [1.0, 0.75, 0.5, 1.0]), run("format", [0.25, 0.25, 0.5, 0.0])
    headers, rows = paired_table([ttrl, control])
    # differences .75 .5 0 1: mean .5625, SE = stdev / 2 = 0.4270 / 2
    assert rows == [["format", "adapt", "+56.2 points", "±42.7", "beyond", 4]]
    md = to_markdown(build_compare([ttrl, control], [], []), "compare")
    assert "±42.7" in md and "ttrl minus it (avg@4)" in md
    assert paired_table([Run(Path("a"), "a", {}, {}, [], {}, True), control]) is None


def test_cli_report_and_compare(tmp_path, capsys):
    run = recorded_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    assert main(["compare", str(run), str(recorded_run(tmp_path, "again")), "--output", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "compare.html").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "holds no ttrl run" in capsys.readouterr().err


def test_train_writes_report_unless_no_report(tmp_path, monkeypatch):
    """cmd_train's wiring, with the training itself replaced by the recorded run."""
    import ttrl.trainer

    def fake_train(cfg, run_dir, **kwargs):
        shutil.copytree(FIXTURE, run_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("environment.json"))
        return json.loads((FIXTURE / "summary.json").read_text())

    monkeypatch.setattr(ttrl.trainer, "train", fake_train)
    assert main(["train", "--config", str(TINY), "--output-dir", str(tmp_path / "a"), "--quiet"]) == 0
    assert (tmp_path / "a" / "report.html").is_file() and (tmp_path / "a" / "environment.json").is_file()
    assert main(["train", "--config", str(TINY), "--output-dir", str(tmp_path / "b"), "--quiet", "--no-report"]) == 0
    assert not (tmp_path / "b" / "report.html").exists() and (tmp_path / "b" / "environment.json").is_file()
    assert build_parser().parse_args(["train", "--no-report"]).no_report


def test_environment_names_versions_and_machine():
    env = environment()
    for key in ("python", "torch", "transformers", "platform", "cpu_count", "device", "ttrl"):
        assert env[key], key
    json.dumps(env)


def test_report_of_a_tiny_run(tmp_path):
    out = tmp_path / "tiny"
    assert main(["train", "--config", str(TINY), "--output-dir", str(out), "--quiet"]) == 0
    env = json.loads((out / "environment.json").read_text())
    assert env["device"] and env["torch"]
    assert_self_contained(out / "report.html", sorted((out / "report").glob("*.png")))
    assert (out / "report.md").is_file()
    base, final = (json.loads((out / "summary.json").read_text())["evals"]["adapt"][i] for i in (0, -1))
    assert len(base["scores"]["id"]) == base["n_labelled"] and base["scores"]["id"] == final["scores"]["id"]
    assert sum(final["scores"]["avg@4"]) / final["n_labelled"] == pytest.approx(final["avg@4"])
    assert "two standard errors of no change" in (out / "report.md").read_text()


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    """The page opens offline and draws: a screenshot with the plots in it (saved as report.png)."""
    from PIL import Image

    run = recorded_run(tmp_path)
    page = write_report(run)
    shot = run / "screenshot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,2600",
                    f"--screenshot={shot}", page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2600)
    colours = image.resize((128, 260)).getcolors(maxcolors=1 << 16)
    assert colours and len(colours) > 200  # plots and tables, not a blank or error page


# --- damaged run files: skipped with a warning naming file:line, never a traceback -----------------

DAMAGE = {
    "metrics list": ("metrics.jsonl", "append", b"[1, 2]\n", "metrics.jsonl:11"),
    "metrics binary": ("metrics.jsonl", "append", b"\x00\xff\xfe\x9c binary\n", "metrics.jsonl:11"),
    "metrics step nine": ("metrics.jsonl", "append", b'{"step": "nine", "train/reward": 0.5}\n', "metrics.jsonl:11"),
    "metrics field type": ("metrics.jsonl", "append", b'{"step": 2, "train/reward": [1], "eval/adapt/avg@4": "x"}\n',
                           "train/reward is [1]"),
    "metrics bad eval key": ("metrics.jsonl", "append", b'{"step": 2, "eval/x": 0.5}\n', "'eval/x'"),
    "summary list": ("summary.json", "write", b"[1, 2]", "summary.json: a JSON list"),
    "summary binary": ("summary.json", "write", b"\x89PNG\r\n\x1a\n\x00\xff", "summary.json:1"),
    "summary evals list": ("summary.json", "write", b'{"steps": 4, "evals": [1]}', "'evals' is [1]"),
    "summary wrong types": ("summary.json", "write", json.dumps({"evals": {"adapt": [
        {"step": "nine"}, {"step": 0, "avg@4": "x", "examples": {"id": 1}},
        {"step": 4, "avg@4": 0.5, "maj@4": float("inf"),
         "examples": [[1], {"id": "a", "gold": {"x": 1}, "histogram": [["3", "two"]]}]}]}}).encode(),
        "evals.adapt[0] is not an evaluation"),
    "summary bad scores": ("summary.json", "write", json.dumps({"evals": {"adapt": [
        {"step": 0, "avg@4": 0.5, "scores": [1]}, {"step": 4, "avg@4": 0.5, "scores": {"id": ["a"], "avg@4": [1, 0]}}
    ]}}).encode(), "scores.avg@4 is not one number per problem"),
    "config list": ("config.json", "write", b"[1, 2]", "config.json: a JSON list"),
    "config wrong types": ("config.json", "write", b'{"eval": {"n_samples": "four"}, "algorithm": {"kl_coef": "x"},'
                           b' "rollout": [1]}', "eval.n_samples is \"four\""),
    "environment list": ("environment.json", "write", b"[1, 2]", "environment.json: a JSON list"),
    "environment binary": ("environment.json", "write", b"\xff\xfe", "environment.json:1"),
    "rollouts garbage": ("rollouts.jsonl", "write", b"[1, 2]\n\xff\n{\"step\": \"nine\"}\n", None),
}


def _damage(run: Path, name: str, how: str, data: bytes) -> None:
    with open(run / name, "ab" if how == "append" else "wb") as f:
        f.write(data)


def test_damaged_run_files_are_skipped_with_a_warning(tmp_path, capsys):
    """Each damage alone: the report is built (plots aside, for time) and says what it left out."""
    from ttrl.report import build_report, to_html, to_markdown

    for case, (name, how, data, needle) in DAMAGE.items():
        path = recorded_run(tmp_path, case.replace(" ", "-"))
        _damage(path, name, how, data)
        run = load_run(path)
        doc = build_report(run, [], [])
        md, page = to_markdown(doc, "report"), to_html(doc, {})
        assert "Before and after" in page and "Setup and environment" in md, case
        err = capsys.readouterr().err
        if needle:  # said on the console and in the report, with the file (and line)
            assert f"warning: {path / name.split('.')[0]}" in err and needle in err, (case, err)
            shown = re.sub(r"\\([\\`*_\[\]|#])", r"\1", md)  # as Markdown displays its escaped text
            assert "Damaged run files" in md and needle.split(":")[0] in shown, case
        else:
            assert not run.problems and not err, case


def test_cli_report_and_compare_of_a_badly_damaged_run(tmp_path, capsys):
    """Every damage at once, through `ttrl report` and `ttrl compare`: exit 0, no traceback."""
    run = recorded_run(tmp_path)
    for case, (name, how, data, _) in DAMAGE.items():
        if how == "append" or case in ("summary wrong types", "config wrong types", "environment binary",
                                       "rollouts garbage"):
            _damage(run, name, how, data)
    assert main(["report", str(run)]) == 0
    assert main(["compare", str(run), str(recorded_run(tmp_path, "other")), "--output", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("warning: ") >= 2 * 10
    assert "Damaged run files" in (run / "report.md").read_text()
    assert "Damaged run files in run" in (tmp_path / "c" / "compare.md").read_text()


# --- Markdown escapes what it shows, as the HTML does ---------------------------------------------

def test_markdown_escapes_ids_answers_and_pipes(tmp_path):
    from markdown_it import MarkdownIt

    run = recorded_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    adapt = summary["evals"]["adapt"]
    for entry in (adapt[0], adapt[-1]):
        entry["examples"][0].update(id="<script>x</script>", gold="a|b", problem="*What* is <b>1</b> | 2?")
    summary["evals"]["odd|set<i>"] = summary["evals"].pop("heldout")
    (run / "summary.json").write_text(json.dumps(summary))
    write_report(run)
    md = (run / "report.md").read_text()
    page = MarkdownIt("commonmark").enable("table").render(md)
    assert "<script>" not in page and "<b>1</b>" not in page and "<i>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "gold a|b" in page and "*What* is &lt;b&gt;1&lt;/b&gt; | 2?" in page
    results = page.split("<table>")[1].split("</table>")[0]
    widths = {row.count("<td") or row.count("<th") for row in results.split("<tr>")[1:]}
    assert widths == {7}, results  # the pipe in the set name did not add a cell
    assert "odd|set&lt;i&gt;" in results
    html_page = (run / "report.html").read_text()  # the HTML escaped them already
    assert "&lt;script&gt;x&lt;/script&gt;" in html_page and "<script>" not in html_page


# --- partly labelled data, no-signal runs, the bar to beat, which majority ratio ---------------------

def _edit_summary(run: Path, edit) -> None:
    summary = json.loads((run / "summary.json").read_text())
    edit(summary)
    (run / "summary.json").write_text(json.dumps(summary))


def test_partly_labelled_sets_report_accuracy_on_the_labelled_prompts(tmp_path):
    run = recorded_run(tmp_path)

    def label_some(summary):
        for entry in summary["evals"]["adapt"]:
            entry["n_labelled"] = 5  # evaluation.summarize: accuracy over the 5 of 9 prompts with gold
        for entry in summary["evals"]["heldout"]:
            entry["n_labelled"] = entry["n_prompts"]  # all labelled: nothing to say

    _edit_summary(run, label_some)
    write_report(run)
    for text in ((run / "report.html").read_text(), (run / "report.md").read_text()):
        assert "graded on 5 of 9 prompts" in text and "9 (5 graded)" in text
        assert "No gold answers" not in text and "no reference answers" not in text
        assert "graded on 3 of 3" not in text
    old = recorded_run(tmp_path, "old")  # a run from before n_labelled: as before
    write_report(old)
    assert "graded on" not in (old / "report.md").read_text()
    # Partly labelled, evaluated before accuracy was graded on the labelled part: no accuracy keys, but
    # the examples show gold answers, so the report must not claim there are none.
    partial = no_gold_run(tmp_path, "partial")
    _edit_summary(partial, lambda s: s["evals"]["adapt"][-1]["examples"][0].update(gold="7"))
    write_report(partial)
    md = (partial / "report.md").read_text()
    assert "gold 7" in md and "Partly labelled" in md and "No gold answers" not in md


def test_a_run_with_no_answers_is_flagged_not_called_a_tie(tmp_path):
    """MATH-500 with short answers: every sample cut off; before and after are both 0."""
    run = recorded_run(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "train/reward" in row:
            row.update({"train/no_answer": 1.0, "train/truncated": 1.0, "train/majority_ratio": 0.0,
                        "train/reward": 0.0, "train/label_accuracy": 0.0, "train/reward_accuracy": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def zero(summary):
        for entries in summary["evals"].values():
            for entry in entries:
                entry.update({"avg@4": 0.0, "maj@4": 0.0, "greedy": 0.0, "pass@4": 0.0})

    _edit_summary(run, zero)
    write_report(run)
    for text in ((run / "report.html").read_text(), (run / "report.md").read_text()):
        assert "No signal" in text and "rollout.max_new_tokens" in text and "100% of the training samples" in text
        assert text.index("No signal") < text.index("Does training beat just voting?")
        assert "A tie" not in text and "lucky hit" not in text
        assert "No verdict" in text


def test_the_bar_to_beat_is_the_better_of_base_greedy_and_maj():
    def run(avg, maj, greedy=None):
        base = {"step": 0, "n_prompts": 100, "avg@4": 0.1, "maj@4": maj}
        if greedy is not None:
            base["greedy"] = greedy
        evals = {"adapt": [base, {"step": 5, "n_prompts": 100, "avg@4": avg, "maj@4": 0.9}]}
        return Run(Path("x"), "x", {"eval": {"n_samples": 4}}, {}, [], evals, True)

    verdict = beats_voting(run(0.5, 0.4, greedy=0.55))  # above maj@4, below greedy: not yet
    assert "**Not yet.**" in verdict and "-5.0 points" in verdict and "greedy answer (55.0% greedy" in verdict
    assert "**Yes.**" in beats_voting(run(0.6, 0.4, greedy=0.55)) and "+5.0 points" in beats_voting(run(0.6, 0.4, 0.55))
    assert "majority vote of 4 samples (40.0% maj@4" in beats_voting(run(0.5, 0.4, greedy=0.3))
    assert run(0.5, 0.4, greedy=0.55).bar() == (0.55, "base greedy")
    assert run(0.5, 0.4).bar() == (0.4, "base maj@4")
    assert "a few points are noise" not in beats_voting(run(0.5, 0.4))  # 100 prompts, no per-problem scores


def test_the_verdict_weighs_the_gain_against_its_paired_standard_error():
    def run(after: list[float], base_maj: list[int]):
        ids = [str(i) for i in range(len(after))]
        base = {"step": 0, "n_prompts": len(ids), "avg@4": 0.1, "maj@4": sum(base_maj) / len(ids),
                "scores": {"id": ids, "maj@4": base_maj}}
        final = {"step": 5, "n_prompts": len(ids), "avg@4": sum(after) / len(ids), "maj@4": 0.9,
                 "scores": {"id": ids, "avg@4": after}}
        return Run(Path("x"), "x", {"eval": {"n_samples": 4}}, {}, [], {"adapt": [base, final]}, True)

    steady = beats_voting(run([0.75] * 8 + [1.0] * 8, [0] * 8 + [1] * 8))  # +0.375: +0.75 on half, 0 on half
    assert "**Yes.**" in steady and "beyond two standard errors" in steady
    noisy = beats_voting(run([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], [0, 1, 1, 0, 0, 1]))  # +1/6 from +1s and -1s
    assert "**Yes.**" in noisy and "within two standard errors" in noisy and "over these 6 prompts" in noisy


def test_the_verdict_says_in_plain_words_when_greedy_fell_below_the_base_model():
    """Greedy is how most deploy the trained model: its change from the base model's greedy answer is
    given with its paired error, and called "worse than the base model" only beyond two of them."""
    def run(base_greedy: list[int], greedy: list[int]):
        ids = [str(i) for i in range(len(greedy))]
        base = {"step": 0, "n_prompts": len(ids), "avg@4": 0.1, "maj@4": 0.2, "greedy": sum(base_greedy) / len(ids),
                "scores": {"id": ids, "avg@4": [0.1] * len(ids), "greedy": base_greedy}}
        final = {"step": 5, "n_prompts": len(ids), "avg@4": 0.3, "maj@4": 0.3, "greedy": sum(greedy) / len(ids),
                 "scores": {"id": ids, "avg@4": [0.3] * len(ids), "greedy": greedy}}
        return Run(Path("x"), "x", {"eval": {"n_samples": 4}}, {}, [], {"adapt": [base, final]}, True)

    collapsed = beats_voting(run([1] * 12 + [0] * 4, [0] * 14 + [1] * 2))  # 12 of 16 right -> 2 of 16
    assert "**The trained model is worse than the base model** at its greedy answer: 12.5% against 75.0%" in collapsed
    assert "beyond two standard errors" in collapsed
    wobble = beats_voting(run([1, 0, 1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 0, 1, 0]))  # -1/8 from +1s and -1s
    assert "worse than the base model" not in wobble
    assert "Greedy answer (how most deploy a model): 37.5% against the base model's 50.0%, -12.5 points" in wobble
    assert "within two standard errors" in wobble.split("Greedy answer")[1]


def test_report_names_the_bar_pass_at_k_and_both_majority_ratios(tmp_path):
    run = recorded_run(tmp_path)

    def greedy_above_maj(summary):
        summary["evals"]["adapt"][0]["greedy"] = 0.5

    _edit_summary(run, greedy_above_maj)
    write_report(run)
    md = (run / "report.md").read_text()
    assert "**bar to beat (adapt)**: 50.0% (best of base maj@4 11.1% / greedy 50.0%)" in md
    assert "below the base model's greedy answer (50.0% greedy" in md
    assert "33.3% → **22.2%** (-11.1)" in md  # pass@4 falls as the model sharpens
    assert "train majority ratio" in md and "| eval majority ratio |" in md and "| majority ratio |" not in md
    assert (run / "metrics.csv").is_file()


def test_environment_command_is_shell_quoted(monkeypatch):
    import shlex

    argv = ["/x/bin/ttrl", "train", "--output-dir", "my runs/a", "data.template=Question: {problem}"]
    monkeypatch.setattr("sys.argv", argv)
    command = environment()["command"]
    assert shlex.split(command) == ["ttrl"] + argv[1:]
    assert "'data.template=Question: {problem}'" in command


def test_the_collapse_watch_recorded_by_the_trainer_is_in_the_headline(tmp_path):
    from ttrl.stopping import collapse_reason

    run = recorded_run(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/reward" in r]
    for i, row in enumerate(train_rows):  # the recorded run's 4 steps, made to saturate and shrink
        row.update({"train/majority_ratio": [0.3, 0.4, 0.95, 1.0][i], "train/entropy": [2.0, 2.0, 0.2, 0.1][i],
                    "train/response_length": [6.0, 6.0, 2.0, 2.0][i]})
    train_rows[-1]["collapse_warning"] = collapse_reason(train_rows, window=2)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(run)
    for text in ((run / "report.html").read_text(), (run / "report.md").read_text()):
        assert "Collapse watch, step 4" in text and "entropy fell 92%" in text
        assert text.index("Collapse watch") < text.index("Does training beat just voting?")


def test_no_signal_box_gives_way_when_the_evaluation_moved_beyond_noise():
    """A short demo: most early samples had no answer, yet avg@k rose beyond two standard errors.
    The report must not open with "No signal" / "No verdict" above a table that shows a real gain,
    and each noise sentence says which comparison it is about."""
    ids = [str(i) for i in range(12)]
    before = [0.0] * 12
    after = [0.25] * 9 + [0.0] * 3  # +0.1875 on average, steady: beyond two standard errors
    base = {"step": 0, "n_prompts": 12, "avg@4": 0.0, "maj@4": 0.25, "greedy": 0.0,
            "scores": {"id": ids, "avg@4": before, "maj@4": [1] * 3 + [0] * 9, "greedy": [0] * 12}}
    final = {"step": 4, "n_prompts": 12, "avg@4": sum(after) / 12, "maj@4": 0.5,
             "scores": {"id": ids, "avg@4": after, "maj@4": [1] * 6 + [0] * 6}}
    steps = [{"step": s, "train/no_answer": v, "train/truncated": v, "train/majority_ratio": 0.3}
             for s, v in ((1, 0.8), (2, 0.7), (3, 0.5), (4, 0.4))]  # mean 0.6 > 0.5
    run = Run(Path("x"), "x", {"eval": {"n_samples": 4}}, {}, steps, {"adapt": [base, final]}, True)
    verdict = beats_voting(run)
    assert "No verdict" not in verdict
    assert "this gap to base maj@4 is" in verdict  # the bar comparison, named
    assert "Against the base model's own avg@4 (the change in the table below)" in verdict
    assert "+18.8 points more often" in verdict and "beyond two standard errors of no change" in verdict
    doc = report.Doc("t")
    report.headline(run, doc)
    kinds = [(kind, text) for kind, text, *_ in doc.blocks if kind in ("warn", "note")]
    assert not any(kind == "warn" for kind, _ in kinds)
    assert any("Weak training signal" in text and "adapt +18.8" in text for _, text in kinds)
    quiet = Run(Path("x"), "x", {"eval": {"n_samples": 4}}, {}, steps,
                {"adapt": [base, {**final, "avg@4": 0.0, "scores": {"id": ids, "avg@4": before}}]}, True)
    assert "No verdict" in beats_voting(quiet)  # nothing moved: the warning stands


def test_markdown_in_headlines_messages_and_run_names_stays_text(tmp_path):
    """A data set, model, stop message or run name holding Markdown (a javascript: link) is written
    as literal text in report.md and compare.md, and a NUL byte in an answer is not written raw."""
    from markdown_it import MarkdownIt

    link = "[x](javascript:alert(1))"
    run = recorded_run(tmp_path, "[run](javascript:alert(2))")
    config = json.loads((run / "config.json").read_text())
    config["data"]["train"], config["model"]["name"] = link, f"<b>{link}</b>"
    (run / "config.json").write_text(json.dumps(config))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    next(r for r in rows if "train/reward" in r)["collapse_warning"] = f"collapse watch: {link} _under_"
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _edit_summary(run, lambda s: s["evals"]["adapt"][-1]["examples"][0]["histogram"].insert(0, ["1\u00002", 1]))
    write_report(run)
    write_compare([run, recorded_run(tmp_path, "other")], tmp_path / "cmp")
    for md in ((run / "report.md").read_text(), (tmp_path / "cmp" / "compare.md").read_text()):
        page = MarkdownIt("commonmark").enable("table").render(md)
        assert "<a " not in page and "<b>" not in page and "<em>under" not in page, page
        assert "\x00" not in md
    assert link in MarkdownIt("commonmark").render((run / "report.md").read_text())
    assert "\x00" not in (run / "report.html").read_text()


def test_compare_says_what_it_leaves_out_and_refuses_a_run_twice(tmp_path, capsys):
    """A run evaluated with another k, or on prompts the first run never saw, is named in a note
    (not silently dropped); the same run given twice is one error line."""
    from ttrl.report import build_compare, paired_table, to_markdown

    def run(name, k, ids):
        rows = [{"step": 0, "n_prompts": len(ids), f"avg@{k}": 0.1},
                {"step": 5, "n_prompts": len(ids), f"avg@{k}": 0.5, "scores": {"id": ids, f"avg@{k}": [0.5] * len(ids)}}]
        return Run(Path(name), name, {"eval": {"n_samples": k}}, {}, [], {"adapt": rows}, True)

    ttrl, other_k, other_data = run("ttrl", 4, ["1", "2"]), run("k8", 8, ["1", "2"]), run("gsm", 4, ["x", "y"])
    left_out = []
    assert paired_table([ttrl, other_k, other_data], left_out) is None
    assert len(left_out) == 2 and "k = 8" in left_out[0] and "eval.n_samples=4" in left_out[0]
    assert "gsm on adapt is left out: it shares no evaluated prompt with ttrl" in left_out[1]
    md = to_markdown(build_compare([ttrl, other_k, other_data], [], []), "compare")
    assert md.count("Not paired.") == 2
    a = recorded_run(tmp_path, "a")
    assert main(["compare", str(a), str(tmp_path / "." / "a"), "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "given twice" in err and "\n" not in err.strip()
    assert not (tmp_path / "c").exists()


def test_setup_table_tells_contrast_and_sequential_voting_apart():
    from ttrl.report import setup_table

    def run(name, **cfg):
        return Run(Path(name), name, {"reward": {"kind": "majority", "contrast": cfg.get("contrast", False)},
                                      "rollout": {"vote_round": cfg.get("rounds", 0),
                                                  "vote_confidence": cfg.get("confidence", 0.0)}},
                   {}, [], {}, True)

    headers, rows = setup_table([run("ttrl"), run("contrast", contrast=True),
                                 run("sequential", rounds=4, confidence=0.95)])
    algorithm, votes = headers.index("algorithm"), headers.index("voting")
    assert len({row[algorithm] + row[votes] for row in rows}) == 3
    assert rows[1][algorithm].endswith("majority reward, contrast")
    assert rows[2][votes] == "sequential, rounds of 4, stop at confidence 0.95" and rows[0][votes] == "all N at once"

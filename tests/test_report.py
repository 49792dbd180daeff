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

from ttrl.cli import build_parser, main
from ttrl.report import Run, beats_voting, environment, load_run, write_compare, write_report

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


def test_cli_report_and_compare(tmp_path, capsys):
    run = recorded_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    assert main(["compare", str(run), str(run), "--output", str(tmp_path / "c")]) == 0
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

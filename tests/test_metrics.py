"""ttrl.metrics: the metrics file read back despite damage, metrics.csv, Weights & Biases offline,
and progress that reaches a log file while it happens and is silent when asked."""

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest

from ttrl.config import ConfigError, load_config
from ttrl.metrics import (METRICS_FILE, MetricsWriter, PlainProgress, progress_bar, read_metrics,
                          truncate_metrics, write_csv)

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def test_read_metrics_skips_damaged_lines_and_says_where(tmp_path):
    good = [{"step": 1, "train/reward": 0.5}, {"step": 2, "train/reward": 0.25}]
    with open(tmp_path / METRICS_FILE, "wb") as f:
        f.write(json.dumps(good[0]).encode() + b"\n")
        f.write(b"[1, 2]\n")                              # a list where an object belongs
        f.write(b"\xff\xfe\x00garbage\n")                 # binary bytes
        f.write(b'{"step": "nine", "train/reward": 1}\n')  # a wrong type in a field
        f.write(b"7\n")
        f.write(json.dumps(good[1]).encode() + b"\n")
        f.write(b'{"step": 3, "train/rew')                 # torn by a kill
    problems = []
    assert read_metrics(tmp_path, problems) == good
    assert [p.split(": ", 1)[0] for p in problems] == [f"{tmp_path / METRICS_FILE}:{n}" for n in (2, 3, 4, 5, 7)]
    assert "not an object" in problems[0] and "not UTF-8" in problems[1] and "step is \"nine\"" in problems[2]
    assert read_metrics(tmp_path) == good  # the trainer's call: silent, same rows
    assert truncate_metrics(tmp_path, 5) == 2 and read_metrics(tmp_path, problems := []) == good and not problems


def test_metrics_csv_has_one_row_per_logged_row(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    rows = [{"step": 0, "eval/adapt/avg@4": 0.25}, {"step": 1, "train/reward": 0.5, "stop_reason": "a, b"},
            {"step": 1, "train/reward": float("nan")}]
    for row in rows:
        writer.log(row)
    writer.close()
    with open(write_csv(tmp_path), newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["step", "eval/adapt/avg@4", "train/reward", "stop_reason"]
    assert [r["step"] for r in table] == ["0", "1", "1"]
    assert table[0]["eval/adapt/avg@4"] == "0.25" and table[0]["train/reward"] == ""
    assert table[1]["stop_reason"] == "a, b" and float(table[1]["train/reward"]) == 0.5
    assert table[2]["train/reward"] == ""  # NaN is logged as null, and null is an empty cell


def test_wandb_offline_receives_every_row(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(tmp_path, tensorboard=False, wandb_project="ttrl-test", config={"rollout": {"n_votes": 8}})
    writer.log({"step": 1, "train/reward": 0.375, "train/majority_ratio": 0.8125})
    writer.close()
    # W&B's service process writes the offline file after finish() returns (ttrl's close) and
    # completes it by the time the process exits, when wandb tears the service down; reading it
    # before that is racy (on a busy machine the file may still hold only its header).
    wandb.teardown()
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    data = logs[0].read_bytes()
    for needle in (b"train/reward", b"0.375", b"train/majority_ratio", b"0.8125", b"n_votes"):
        assert needle in data, needle
    run_id = (tmp_path / "wandb" / "ttrl-run-id").read_text()
    assert run_id in logs[0].name
    # A resumed run continues the same W&B run.
    writer = MetricsWriter(tmp_path, tensorboard=False, purge_step=2, wandb_project="ttrl-test")
    writer.log({"step": 2, "train/reward": 0.5})
    writer.close()
    wandb.teardown()
    assert (tmp_path / "wandb" / "ttrl-run-id").read_text() == run_id
    assert any(b"0.5" in f.read_bytes() for f in (tmp_path / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))


def test_wandb_project_is_validated_before_anything_runs():
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"train.wandb_project.*pip install 'ttrl\[wandb\]'"):
            load_config(TINY, ["train.wandb_project=my-project"])
    else:
        assert load_config(TINY, ["train.wandb_project=my-project"]).train.wandb_project == "my-project"
    assert load_config(TINY).train.wandb_project == ""


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_file_is_plain_periodic_lines():
    log, clock = io.StringIO(), FakeClock()
    with PlainProgress(log, interval=10, clock=clock) as bar:
        task = bar.add_task("ttrl train", total=30, completed=0, info="")
        for step in range(1, 7):
            clock.now += 4.0  # 4 s a step: a line at the start and the first step, then every 10 s
            bar.update(task, advance=1, info=f"reward {step / 10:.2f}")
    lines = log.getvalue().splitlines()
    assert lines == ["ttrl train 0/30 (0%) · elapsed 0:00:00",  # said at once: a log shows what started
                     "ttrl train 1/30 (3%) reward 0.10 · elapsed 0:00:04 · eta 0:01:56",
                     "ttrl train 4/30 (13%) reward 0.40 · elapsed 0:00:16 · eta 0:01:44",
                     "ttrl train 6/30 (20%) reward 0.60 · elapsed 0:00:24 · eta 0:01:36"]  # the last, at exit
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_progress_bar_picks_plain_lines_off_a_terminal_and_nothing_when_disabled():
    log = io.StringIO()
    with progress_bar(stream=log, interval=0) as bar:  # StringIO is not a terminal
        task = bar.add_task("eval adapt", total=2, info="")
        bar.update(task, advance=1)
        bar.update(task, advance=1)
    assert log.getvalue().splitlines()[-1].startswith("eval adapt 2/2 (100%) · elapsed")
    quiet = io.StringIO()
    with progress_bar(disable=True, stream=quiet) as bar:
        bar.update(bar.add_task("ttrl train", total=3, info=""), advance=3)
    assert quiet.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    from rich.progress import Progress

    assert isinstance(progress_bar(stream=Terminal()), Progress)


def test_quiet_training_prints_nothing(tmp_path, capfd):
    """train(quiet=True) from Python: no bar of ours, and none of transformers' ("Writing model shards")."""
    from ttrl.trainer import train

    cfg = load_config(TINY, ["train.steps=1", "eval.before=false", "data.arithmetic.n=4", "data.holdout=0",
                             "rollout.n_votes=2", "reward.n_train_samples=1", "eval.n_samples=1", "eval.greedy=false"])
    train(cfg, tmp_path / "run", quiet=True)
    out, err = capfd.readouterr()
    assert (tmp_path / "run" / "summary.json").is_file()
    assert out == "" and all(line.startswith("warning: ") for line in err.splitlines())  # warnings stay


def test_an_atomic_write_that_fails_leaves_the_old_file_whole(tmp_path):
    from ttrl.metrics import write_atomic

    path = tmp_path / "summary.json"
    write_atomic(path, '{"steps": 3}')
    assert path.read_text() == '{"steps": 3}' and not (tmp_path / "summary.json.tmp").exists()
    (tmp_path / "summary.json.tmp").mkdir()  # the temporary file cannot be written
    with pytest.raises(OSError):
        write_atomic(path, '{"steps": 4, "evals": {')
    assert path.read_text() == '{"steps": 3}'


def test_live_bar_at_80_columns_cuts_no_count_or_time():
    from rich.console import Console

    from ttrl.metrics import rich_progress

    shown = {}
    for width in (80, 140):
        console = Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)
        bar = rich_progress(console)
        task = bar.add_task("eval heldout (base model)", total=32, info="reward 0.41 majority ratio 0.20")
        bar.update(task, completed=12)
        out = Console(file=io.StringIO(), width=width, color_system=None, record=True)
        out.print(bar.make_tasks_table(bar.tasks))
        shown[width] = out.export_text()
    for text in shown.values():
        assert "eval heldout (base model)" in text and "12/32" in text and "0:00:00" in text and "eta" in text
        assert "…" not in text and "majority ratio" in text
        assert max(len(line.rstrip()) for line in text.splitlines()) <= 140


def test_decode_ticks_reach_a_watcher_only_while_watched():
    from ttrl.metrics import tell_decoding, watch_decoding

    seen = []
    with watch_decoding(lambda done, total: seen.append((done, total))):
        tell_decoding(1, 8)
    tell_decoding(2, 8)
    assert seen == [(1, 8)]

import os
import signal

import pytest

from ttrl.config import Config
from ttrl.control import Control, StopSignals


def _control(**train) -> Control:
    cfg = Config()
    for k, v in train.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    return Control(cfg, steps=10)


def test_evaluation_and_checkpoints_fall_due_on_schedule():
    c = _control(eval__every=3, train__save_every=4)
    due = [(s, c.after_step(s, {"train/reward": 0.5})) for s in range(1, 11)]
    assert [s for s, verdict in due if verdict.evaluate] == [3, 6, 9]  # not 10: the final evaluation follows anyway
    # 5: train.guard=rollback (the default) keeps one every stop_window steps to roll back to
    assert [s for s in range(1, 11) if c.checkpoint_due(s)] == [4, 5, 8, 10]
    assert not c.finished and c.halt(10, None) is None
    assert [s for s in range(1, 11) if _control(train__save_every=4, train__guard="warn").checkpoint_due(s)] == [4, 8, 10]


def test_an_early_stopping_rule_ends_the_run_at_that_step():
    c = _control(train__stop_on="reward", train__stop_window=2, train__stop_min_delta=0.01, eval__every=4)
    rows = [{"train/reward": r} for r in (0.1, 0.2, 0.5, 0.5, 0.5, 0.5)]
    verdicts = [c.after_step(s, row) for s, row in enumerate(rows, 1)]
    assert c.finished and c.steps == 6 and "reward plateaued" in verdicts[-1].stop_reason
    assert verdicts[-1].logged() == {"stop_reason": verdicts[-1].stop_reason}
    assert verdicts[-2].stop_reason is None and verdicts[-2].logged() == {}
    assert all("stop_reason" not in row for row in rows)  # the row is the loop's to write
    assert [v.evaluate for v in verdicts] == [False, False, False, True, False, False]
    assert any(w.startswith("stopping early after step 6") for w in verdicts[-1].warnings)
    assert c.checkpoint_due(6)


def test_non_finite_steps_in_a_row_halt_with_exit_code_1():
    c = _control(algorithm__max_bad_steps=2)
    first = c.after_step(1, {"optim/skipped_updates": 1})
    assert c.halt(1, None) is None and "update skipped (1 in a row" in first.warnings[0]
    c.after_step(2, {"optim/skipped_updates": 0})  # a good step resets the streak
    c.after_step(3, {"optim/skipped_updates": 1})
    c.after_step(4, {"optim/skipped_updates": 1})
    halt = c.halt(4, None)
    assert halt.exit_code == 1 and "2 steps in a row" in halt.message and "{path}" in halt.message


def test_a_signal_halts_with_128_plus_its_number():
    halt = _control().halt(3, "SIGTERM")
    assert halt.exit_code == 128 + signal.SIGTERM and "stopped by SIGTERM after step 3 of 10" in halt.message


def test_signals_wait_for_the_step_in_flight_but_not_elsewhere():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN under `cmd &`
    with StopSignals(announce=False) as stop:
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received == "SIGTERM"  # recorded; the step goes on
            with pytest.raises(KeyboardInterrupt):  # a second one stops at once
                os.kill(os.getpid(), signal.SIGINT)
    with StopSignals(announce=False) as stop:
        with pytest.raises(KeyboardInterrupt):  # outside a step (start-up, evaluation): at once
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # and again at the next check, were it swallowed
            stop.check()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored


def test_a_signal_during_the_final_evaluation_stops_the_run_and_resume_finishes_it(tmp_path):
    """SIGTERM once the last checkpoint exists (the final evaluation, or the checkpoint's last
    writes): exit 143 with one line, no summary; the resumed run only evaluates and finishes."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    config = Path(__file__).parent.parent / "configs" / "tiny.yaml"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ttrl", "train", "--config", str(config), "--output-dir", str(out), "--quiet",
           "--no-report", "train.steps=2", "train.prompts_per_step=2", "rollout.n_votes=2",
           "reward.n_train_samples=2", "rollout.max_new_tokens=2", "eval.before=false", "eval.n_samples=16",
           "eval.max_new_tokens=32", "eval.greedy=false", "data.holdout=0", "data.arithmetic.n=4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = out / "checkpoints" / "step-00000002" / "state.json"
    deadline = time.time() + 240
    while not last.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "--resume" in err and not (out / "summary.json").exists()

    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/reward" in r] == [1, 2]  # no step redone
    assert [r["step"] for r in rows if "eval/adapt/avg@16" in r] == [2]  # the final evaluation, once


def test_a_run_without_signal_is_warned_once_after_ten_steps():
    c = _control()
    cut_off = {"train/no_answer": 1.0, "train/truncated": 1.0, "train/majority_ratio": 0.0, "train/reward": 0.0}
    said = []
    for s in range(1, 31):
        said.append((s, c.after_step(s, dict(cut_off)).warnings))
    warned = [(s, w) for s, w in said if w]
    assert [s for s, _ in warned] == [10] and "rollout.max_new_tokens" in warned[0][1][0]
    healthy = _control()
    for s in range(1, 11):
        assert healthy.after_step(s, {"train/no_answer": 0.1, "train/majority_ratio": 0.6,
                                      "train/reward": 0.6}).warnings == []


def test_a_short_run_is_checked_at_its_last_step():
    c = Control(Config(), steps=3)
    said = [c.after_step(s, {"train/no_answer": 0.9, "train/truncated": 0.9, "train/majority_ratio": 0.05}).warnings
            for s in range(1, 4)]
    assert said[:2] == [[], []] and said[2]


def _collapsing_rows(n: int) -> list[dict]:
    """Majority ratio climbing to 1 while entropy and length fall: the collapse watch's pattern."""
    return [{"train/majority_ratio": min(1.0, 0.1 * s), "train/entropy": 2.0 / s, "train/response_length": 8.0 / s}
            for s in range(1, n + 1)]


def test_the_collapse_watch_warns_once_and_stops_only_when_asked():
    c = _control(train__stop_window=2, train__guard="warn")
    rows = _collapsing_rows(12)
    verdicts = [c.after_step(s, row) for s, row in enumerate(rows, 1)]
    warned = [s for s, v in enumerate(verdicts, 1) if v.collapse_warning]
    assert [s for s, v in enumerate(verdicts, 1) if v.warnings] == warned  # said once
    # Step 10: ratio (0.9 + 1.0) / 2 >= 0.9 (step 9: 0.85); entropy 1.5 -> 0.21, length 6 -> 0.84 long before.
    assert warned == [10] and not c.finished
    stopping = _control(train__stop_window=2, train__stop_on="collapse", train__guard="warn")
    rows = _collapsing_rows(12)
    for s, row in enumerate(rows, 1):
        verdict = stopping.after_step(s, row)
        if stopping.finished:
            break
    assert stopping.steps == warned[0] and verdict.stop_reason == verdict.collapse_warning
    assert verdict.warnings == [f"stopping early after step {s}: {verdict.stop_reason}"]  # not said twice


def _steps(control: Control, rows: list[dict], start: int = 1) -> list[dict]:
    """Feed `rows` to the control as steps start, start + 1, ... up to its last step; the rows fed."""
    fed = []
    for s, row in enumerate(rows, start):
        if s > control.steps:
            break
        logged = {**row, "step": s}
        logged.update(control.after_step(s, logged).logged())  # as the loop writes it
        fed.append(logged)
    return fed


def test_a_resumed_run_records_what_an_uninterrupted_one_does():
    """Resumed after step 12 (the watch fired at 10), the collapse warning is not written again; resumed
    after an early stop, the run stays stopped there instead of training on to train.steps."""
    cfg = _control(train__stop_window=2, train__guard="warn").cfg
    whole = _steps(Control(cfg, steps=14), _collapsing_rows(14))
    first = _steps(Control(cfg, steps=12), _collapsing_rows(14)[:12])
    rest = _steps(Control.resumed(cfg, 14, list(first)), _collapsing_rows(14)[12:], start=13)
    assert [("collapse_warning" in r) for r in first + rest] == [("collapse_warning" in r) for r in whole]
    assert sum("collapse_warning" in r for r in rest) == 0 and len(rest) == 2

    stop_cfg = _control(train__stop_window=2, train__stop_on="collapse", train__guard="warn").cfg
    stopped = Control(stop_cfg, steps=14)
    rows = _steps(stopped, _collapsing_rows(14))
    assert stopped.steps == 10 and len(rows) == 10
    again = Control.resumed(stop_cfg, 14, list(rows))
    assert again.finished and again.steps == 10 and again.stopped_early == rows[-1]["stop_reason"]
    fresh = Control.resumed(stop_cfg, 14, [])
    assert not fresh.finished and fresh.steps == 14 and not fresh.collapse_warned


@pytest.mark.parametrize("guard", ["rollback", "stop", "warn"])
def test_the_guard_ends_training_where_the_watch_fires_and_names_the_step_to_roll_back_to(guard):
    """Step 10 fires the watch (stop_window 2). rollback: training ends there, no checkpoint is written
    at step 10 (its model is discarded, and writing one would retire the older ones), and the step to
    roll back to is 8, before the watch's window 9-10; stop: ends there, saving step 10; warn: trains
    on. A resumed run remembers where the guard fired."""
    c = _control(train__stop_window=2, train__guard=guard)
    c.steps = 14
    rows = _steps(c, _collapsing_rows(14))
    fired = [r["step"] for r in rows if "collapse_warning" in r]
    assert fired == [10]
    if guard == "warn":
        assert not c.finished and len(rows) == 14 and c.guarded_at is None and c.rollback_step() is None
        return
    assert c.finished and c.steps == 10 and len(rows) == 10 and c.guarded_at == 10
    assert rows[-1]["stop_reason"] == rows[-1]["collapse_warning"]
    assert c.rollback_step() == (8 if guard == "rollback" else None)
    assert c.checkpoint_due(10) == (guard == "stop")
    assert [s for s in range(1, 10) if c.checkpoint_due(s)] == ([2, 4, 6, 8] if guard == "rollback" else [])
    again = Control.resumed(c.cfg, 14, list(rows))
    assert again.finished and again.guarded_at == 10 and again.rollback_step() == c.rollback_step()

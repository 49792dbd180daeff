"""What the loop does between steps besides the algorithm: stop early by an unlabeled rule
(and flag collapse), give up after repeated non-finite steps, evaluate and checkpoint on
schedule, obey the OS signals SIGINT and SIGTERM. Kept apart from the loop so the loop reads as the algorithm,
and tested on its own."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from ttrl.config import Config
from ttrl.health import learning_warnings
from ttrl.stopping import collapse_reason, stop_reason


HEALTH_WINDOW = 10
"""Steps over which the no-signal check averages (ttrl.health)."""


@dataclass
class Verdict:
    """What the loop must do after a step, and what it must say and log."""
    evaluate: bool = False
    """An evaluation is due now."""
    stop_reason: str | None = None
    """An early-stopping rule fired: training ends after this step."""
    collapse_warning: str | None = None
    """The collapse watch fired (the first time in a run)."""
    warnings: list[str] = field(default_factory=list)
    """Lines for the terminal, in order."""

    def logged(self) -> dict:
        """The metrics row's record of the verdict (`stop_reason`, `collapse_warning`)."""
        return {k: v for k, v in (("collapse_warning", self.collapse_warning), ("stop_reason", self.stop_reason)) if v}


@dataclass
class Halt:
    """Training must end now, after saving a checkpoint; `message` has a `{path}` slot for it."""
    message: str
    exit_code: int


@dataclass
class Control:
    """The loop's bookkeeping across steps: `history` holds the training rows so far (resumed
    ones included), `bad_steps` the current streak of steps whose update was skipped."""
    cfg: Config
    steps: int
    """The last step; lowered when an early-stopping rule fires."""
    history: list[dict] = field(default_factory=list)
    bad_steps: int = 0
    stopped_early: str | None = None
    said: set = field(default_factory=set)
    """Kinds of no-signal warning already given ("No signal", "Weak signal")."""
    collapse_warned: bool = False
    """The collapse watch has fired (it is said once a run)."""
    guarded_at: int | None = None
    """The step at which the collapse watch stopped training (train.guard rollback or stop)."""

    @classmethod
    def resumed(cls, cfg: Config, steps: int, history: list[dict], bad_steps: int = 0) -> Control:
        """The bookkeeping of a run continued after `history` (its rows up to the checkpoint), so it
        goes on as if never interrupted: a collapse watch that fired is not recorded again, and a
        run that stopped early stays stopped at that step."""
        stop = next((r for r in reversed(history) if r.get("stop_reason")), None)
        guarded = stop is not None and stop.get("stop_reason") == stop.get("collapse_warning")
        return cls(cfg, stop["step"] if stop else steps, history, bad_steps,
                   stopped_early=stop["stop_reason"] if stop else None,
                   collapse_warned=any(r.get("collapse_warning") for r in history),
                   guarded_at=stop["step"] if guarded and cfg.train.guard != "warn" else None)

    def after_step(self, done: int, row: dict) -> Verdict:
        """Record step `done`'s metrics row and decide what follows it: stop early (a stopping rule
        fired), flag collapse (the first time the watch fires), evaluate now, warn."""
        t = self.cfg.train
        self.history.append(row)
        self.bad_steps = self.bad_steps + 1 if row.get("optim/skipped_updates") else 0
        verdict = Verdict()
        if row.get("optim/skipped_updates"):
            verdict.warnings.append(f"step {done}: NaN/inf loss, gradient or logits; update skipped ({self.bad_steps} "
                                    f"in a row, algorithm.max_bad_steps={self.cfg.algorithm.max_bad_steps})")
        if not self.collapse_warned:
            verdict.collapse_warning = collapse_reason(self.history, t.stop_window, t.collapse_ratio, t.collapse_drift)
            self.collapse_warned = bool(verdict.collapse_warning)
        reason = stop_reason(self.history, t.stop_on, t.stop_window, t.stop_min_delta, t.entropy_floor,
                             t.collapse_ratio, t.collapse_drift)
        if verdict.collapse_warning and t.guard != "warn":  # the guard ends training on it, whatever stop_on says
            reason, self.guarded_at = verdict.collapse_warning, done
        if verdict.collapse_warning and verdict.collapse_warning != reason:  # said once
            verdict.warnings.append(f"step {done}: {verdict.collapse_warning}")
        if reason:
            verdict.stop_reason = self.stopped_early = reason
            self.steps = done
            verdict.warnings.append(f"stopping early after step {done}: {reason}")
        verdict.warnings += self.health_warnings(done)
        every = self.cfg.eval.every
        verdict.evaluate = bool(every) and done % every == 0 and done < self.steps
        return verdict

    @property
    def finished(self) -> bool:
        return self.stopped_early is not None

    def halt(self, done: int, signal_name: str | None) -> Halt | None:
        """Why training must end after step `done` other than reaching its last step, if it must."""
        if self.bad_steps >= self.cfg.algorithm.max_bad_steps:
            rates = "algorithm.lr or algorithm.critic_lr" if self.cfg.algorithm.advantage == "ppo" else "algorithm.lr"
            return Halt(f"stopped after step {done}: {self.bad_steps} steps in a row had a NaN/inf loss, gradient "
                        "or logits, or a critic that blew up (algorithm.max_bad_steps); their updates were undone, so "
                        f"{{path}} holds the last good weights. Lower {rates} or algorithm.max_grad_norm, or use "
                        "model.dtype=float32; --resume with a lower rate continues from there", 1)
        return self.stopped_by(done, signal_name)

    def stopped_by(self, done: int, signal_name: str | None) -> Halt | None:
        """The halt an OS signal (SIGINT/SIGTERM) received by step `done` calls for, if one was."""
        if signal_name:
            return Halt(f"stopped by {signal_name} after step {done} of {self.steps}; checkpoint saved in {{path}}",
                        128 + signal.Signals[signal_name])
        return None

    def health_warnings(self, done: int) -> list[str]:
        """ttrl.health's no-signal warnings over the last HEALTH_WINDOW steps, checked when that many
        have run (and every HEALTH_WINDOW steps after, or at the last step of a shorter run), each
        kind said once: early enough to stop a run that learns nothing, late enough that a run
        whose vote is still forming (the demo's first steps) is not called weak."""
        due = done % HEALTH_WINDOW == 0 or (done == self.steps and done < HEALTH_WINDOW)
        if not due:
            return []
        new = [w for w in learning_warnings(self.history[-HEALTH_WINDOW:]) if w.split(":")[0] not in self.said]
        self.said.update(w.split(":")[0] for w in new)
        return new

    def checkpoint_due(self, done: int) -> bool:
        """At the last step, every train.save_every steps, and with train.guard=rollback every
        stop_window steps (what the guard rolls back to) but not at the step it rolls back from,
        whose model is discarded (so the older checkpoints it needs are not retired)."""
        t = self.cfg.train
        if t.guard == "rollback" and self.guarded_at == done:
            return False
        return (done == self.steps or bool(t.save_every and done % t.save_every == 0)
                or (t.guard == "rollback" and done % t.stop_window == 0))

    def rollback_step(self) -> int | None:
        """With train.guard=rollback, after the collapse watch stopped training: the newest step a
        checkpoint may hold to be before the stretch the watch saw (its last stop_window steps)."""
        if self.guarded_at is None or self.cfg.train.guard != "rollback":
            return None
        return self.guarded_at - self.cfg.train.stop_window


class StopSignals:
    """SIGINT/SIGTERM while active. Inside `deferred()` (a training step, a periodic evaluation) a
    signal is recorded and the loop stops after the step in flight, saving a checkpoint; a second
    one stops at once, keeping the previous checkpoint. Outside it (start-up, the evaluations
    before and after training, nothing unsaved), a signal stops at once; were that interrupt
    swallowed (Python ignores exceptions raised inside a destructor), `check()` raises it again."""

    def __init__(self, announce: bool = True):
        self.received: str | None = None
        self.announce = announce
        self._deferred = False
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextmanager
    def deferred(self):
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal arrived while stopping at once was due."""
        if self.received and not self._deferred:
            raise KeyboardInterrupt(self.received)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None or not self._deferred:
            self.received = self.received or name
            raise KeyboardInterrupt(name)
        self.received = name
        if self.announce:  # every rank of a distributed run gets the signal; one says so
            print(f"\n{name} received: finishing the step in flight, then saving a checkpoint "
                  "(send it again to stop at once and keep the previous checkpoint)", file=sys.stderr)

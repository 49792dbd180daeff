"""A hard time budget for one call, in any thread.

Why: sympy (behind math-verify) can run for minutes on an answer a model may well write
(`\\sin(x)^{40}\\cos(x)^{40}` vs `\\frac{\\sin(2x)^{40}}{2^{40}}`: 126 s), and math-verify's own
timeout uses `signal.alarm`, which works only in the main thread; ttrl grades in threads too.
A watchdog thread raises `DeadlineExceeded` inside the late thread (`PyThreadState_SetAsyncExc`),
which stops Python code (sympy, latex2sympy, antlr) between two bytecodes. It cannot stop one
long C call, so the grader still keeps huge integers away from sympy (`grading._is_risky`).
The budget is the calling thread's own CPU time (Linux), so that a loaded machine does not
change which calls finish, with a wall-clock ceiling so that a thread starved of CPU returns too;
where per-thread CPU clocks are missing (macOS) only the ceiling applies. On a Python without
`ctypes.pythonapi` (not CPython) calls run unbounded.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")

RETRY_SECONDS = 0.25  # raise again while a call still runs (nothing should swallow the first)
POLL_SECONDS = 0.02  # how often the watchdog reads the CPU clocks of running calls


class DeadlineExceeded(BaseException):
    """Raised inside a call past its budget. A BaseException, so that the libraries' many
    `except Exception:` cannot swallow it and carry on."""


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Schedule `exc` in that thread (None cancels one scheduled and not yet raised)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               None if exc is None else ctypes.py_object(exc))  # None: NULL


_SUPPORTED = hasattr(ctypes, "pythonapi") and hasattr(ctypes.pythonapi, "PyThreadState_SetAsyncExc")


def _cpu_clock() -> int | None:
    """The calling thread's CPU-time clock, or None where there is none."""
    try:
        return time.pthread_getcpuclockid(threading.get_ident())
    except (AttributeError, OSError):
        return None


class _Call:
    __slots__ = ("deadline", "clock", "cpu_deadline", "running")

    def __init__(self, cpu_seconds: float, wall_seconds: float):
        self.deadline = time.monotonic() + wall_seconds
        self.clock = _cpu_clock()
        self.cpu_deadline = None if self.clock is None else time.clock_gettime(self.clock) + cpu_seconds
        self.running = True

    def late(self, now: float) -> bool:
        return now >= self.deadline or (
            self.clock is not None and time.clock_gettime(self.clock) >= self.cpu_deadline)

    def retry(self, now: float) -> None:
        self.deadline = now + RETRY_SECONDS
        self.clock = None  # from now on the wall clock alone says when to raise again


_cond = threading.Condition()
_calls: dict[int, _Call] = {}  # thread id -> its bounded call
_watchdog: threading.Thread | None = None


def call_within(cpu_seconds: float, wall_seconds: float, fn: Callable[..., T], *args) -> T:
    """`fn(*args)`, or DeadlineExceeded once this thread has spent `cpu_seconds` of CPU time in it
    or `wall_seconds` have passed. A call nested in another bounded call keeps the outer budget.
    Nothing is left scheduled in the thread afterwards."""
    tid = threading.get_ident()
    outer = _calls.get(tid)
    if not _SUPPORTED or (outer is not None and outer.running):
        return fn(*args)
    call = _Call(cpu_seconds, wall_seconds)
    with _cond:
        _calls[tid] = call
        _start_watchdog()
        _cond.notify()
    finished = False
    try:
        result, finished = fn(*args), True
    except DeadlineExceeded:
        pass
    finally:
        call.running = False  # from here the watchdog leaves this thread alone
        _leave(tid, call)
    if not finished:
        raise DeadlineExceeded(f"over the budget of {cpu_seconds:g} s of CPU or {wall_seconds:g} s")
    return result


def _leave(tid: int, call: _Call) -> None:
    """Unregister, then cancel a raise the watchdog scheduled just before; that raise may land in
    here, so retry (the watchdog schedules nothing for a call that is no longer running)."""
    for _ in range(3):
        try:
            with _cond:
                if _calls.get(tid) is call:
                    del _calls[tid]
            _raise_in(tid, None)
            return
        except DeadlineExceeded:
            continue


def _start_watchdog() -> None:
    global _watchdog
    if _watchdog is None:
        _watchdog = threading.Thread(target=_watch, name="ttrl-deadline-watchdog", daemon=True)
        _watchdog.start()


def _watch() -> None:
    """Sleep until the earliest wall deadline (or the next poll of CPU clocks); raise in every
    thread past its budget. Runs under the lock, so it never raises in a call that has left."""
    with _cond:
        while True:
            now = time.monotonic()
            for tid, call in list(_calls.items()):
                if not call.running:
                    del _calls[tid]  # its thread is leaving (or left during a raise)
                elif call.late(now):
                    _raise_in(tid, DeadlineExceeded)
                    call.retry(now)
            waits = [call.deadline - now for call in _calls.values()]
            waits += [POLL_SECONDS for call in _calls.values() if call.clock is not None]
            _cond.wait(max(min(waits), 0.001) if waits else None)


def _reset_after_fork() -> None:
    """A forked child has no watchdog thread and may inherit a held lock: start afresh."""
    global _cond, _watchdog
    _cond, _watchdog = threading.Condition(), None
    _calls.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)

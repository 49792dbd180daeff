"""A hard time budget that interrupts Python work in the main thread and in worker threads."""

import threading
import time

import pytest

from ttrl.deadline import DeadlineExceeded, call_within


def spin(progress: list, seconds: float = 30.0) -> str:
    """Pure-Python work that would run `seconds`; counts its iterations in `progress`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        progress[0] += 1
    return "done"


def swallowing(progress: list) -> str:
    """Work that catches every Exception, as sympy and math-verify do in many places."""
    while True:
        try:
            return spin(progress)
        except Exception:
            continue


CPU_CLOCKS = hasattr(time, "pthread_getcpuclockid")


@pytest.mark.skipif(not CPU_CLOCKS, reason="no per-thread CPU clocks here: the wall clock alone bounds calls")
@pytest.mark.parametrize("work", [spin, swallowing])
def test_an_over_budget_call_is_interrupted_and_really_stops(work):
    progress = [0]
    cpu, wall = time.thread_time(), time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        call_within(0.2, 30.0, work, progress)
    assert 0.19 < time.thread_time() - cpu < 0.6  # the budget is this thread's CPU time ...
    assert time.perf_counter() - wall < 10.0  # ... however loaded the machine
    stopped_at = progress[0]
    time.sleep(0.2)
    assert progress[0] == stopped_at  # nothing keeps running behind our back


@pytest.mark.skipif(not CPU_CLOCKS, reason="no per-thread CPU clocks here: the wall clock alone bounds calls")
def test_the_budget_counts_cpu_time_so_waiting_is_not_charged():
    def mostly_waiting() -> str:
        for _ in range(10):
            time.sleep(0.05)  # 0.5 s of wall time, almost no CPU
        return "done"

    assert call_within(0.1, 5.0, mostly_waiting) == "done"


def test_eight_threads_are_each_interrupted_on_their_own_budget():
    outcomes = {}

    def worker(i: int) -> None:
        start = time.perf_counter()
        try:
            outcomes[i] = call_within(5.0, 0.3, spin, [0], 0.05 if i % 2 else 30.0)
        except DeadlineExceeded:
            outcomes[i] = "interrupted"
        outcomes[i, "seconds"] = time.perf_counter() - start

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert [outcomes[i] for i in range(8)] == ["interrupted", "done"] * 4
    assert max(outcomes[i, "seconds"] for i in range(8)) < 2.0


def test_a_call_within_budget_returns_and_leaves_nothing_scheduled():
    assert call_within(0.05, 0.05, lambda x: x + 1, 41) == 42
    spin([0], 0.4)  # past the budget and the watchdog's retry: no late DeadlineExceeded lands here


def test_errors_of_the_call_propagate():
    with pytest.raises(ZeroDivisionError):
        call_within(1.0, 1.0, lambda: 1 / 0)


def test_a_nested_call_keeps_the_outer_budget():
    start = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        call_within(0.2, 0.2, lambda: call_within(60.0, 60.0, spin, [0]))
    assert time.perf_counter() - start < 3.0

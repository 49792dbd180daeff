"""Run one side of a benchmark in a fresh process, so its timings and peak memory are its own."""

import multiprocessing as mp
import os
import queue
import sys
import tempfile
import traceback

TAIL_LINES = 30


class ChildFailed(RuntimeError):
    """The child process died (an exception, a crash, out of memory) before putting its result."""

    def __init__(self, name: str, exitcode: int | None, tail: str):
        super().__init__(f"{name} exited with code {exitcode} before reporting; last lines of its stderr:\n{tail}")
        self.exitcode, self.tail = exitcode, tail


def _main(fn, args, q, log_path):
    # stderr goes to a file the parent echoes as it grows, so a crash's last words survive the crash.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    try:
        fn(args, q)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def in_child(fn, args, poll_s: float = 0.5) -> dict:
    """Call fn(args, queue) in a spawned process and return what it put on the queue. Raises
    ChildFailed (exit code and stderr tail) as soon as the child dies without a result."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.NamedTemporaryFile(prefix="bench-child-", suffix=".log", delete=False) as log:
        log_path = log.name
    p = ctx.Process(target=_main, args=(fn, args, q, log_path))
    p.start()
    seen = 0
    try:
        while True:
            seen = _echo(log_path, seen)
            try:
                out = q.get(timeout=poll_s)
                break
            except queue.Empty:
                if p.is_alive():
                    continue
                try:  # it may have put its result just before exiting
                    out = q.get(timeout=poll_s)
                    break
                except queue.Empty:
                    _echo(log_path, seen)
                    lines = open(log_path, errors="replace").read().splitlines()
                    raise ChildFailed(getattr(fn, "__name__", "child"), p.exitcode,
                                      "\n".join(lines[-TAIL_LINES:])) from None
        p.join()
        _echo(log_path, seen)
        return out
    finally:
        if p.is_alive():
            p.kill()
        os.unlink(log_path)


def _echo(path: str, seen: int) -> int:
    """Copy what the child wrote to its stderr since byte `seen` to ours."""
    with open(path, "rb") as f:
        f.seek(seen)
        data = f.read()
    if data:
        sys.stderr.write(data.decode(errors="replace"))
        sys.stderr.flush()
    return seen + len(data)

"""Run one side of a benchmark in a fresh process, so its timings and peak RSS are its own."""

import multiprocessing as mp


def in_child(fn, args) -> dict:
    """Call fn(args, queue) in a spawned process and return what it put on the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(args, q))
    p.start()
    out = q.get()
    p.join()
    return out

"""The benchmark scripts' own helpers (benchmarks/ is not a package: imported by path)."""

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from _child import ChildFailed, in_child  # noqa: E402


def _dies(args, queue):
    print("loading the model ...", file=sys.stderr)
    print("CUDA out of memory: tried to allocate 60 GiB", file=sys.stderr, flush=True)
    os._exit(args)  # as a crash or the OOM killer would: no exception, no result


def _raises(args, queue):
    raise ValueError(f"bad shape {args}")


def _answers(args, queue):
    queue.put({"twice": 2 * args})


def test_child_result_comes_back():
    assert in_child(_answers, 21) == {"twice": 42}


@pytest.mark.parametrize("fn, code, says", [(_dies, 3, "CUDA out of memory"), (_raises, 1, "ValueError: bad shape 7")])
def test_a_dead_child_fails_fast_with_its_exit_code_and_stderr(fn, code, says):
    t0 = time.perf_counter()
    with pytest.raises(ChildFailed) as e:
        in_child(fn, code if fn is _dies else 7)
    assert time.perf_counter() - t0 < 20  # the old helper waited forever on the queue
    assert e.value.exitcode == code and says in e.value.tail and says in str(e.value)

"""The user's own code at ttrl's extension points, named `package.module:function` (importable
from the user's environment) or `path/to/file.py:function`:

- `reward.kind`: a reward `fn(vote, texts, indices) -> list[float]`, the rewards of the samples at
  `indices` of one prompt (`vote`: ttrl.voting.Vote over the prompt's N answers: pseudo_label,
  majority_ratio, cluster_of, counts; `texts`: the N completions);
- `data.answer_extractor`: `fn(text) -> str | None`, a completion's final answer (None: none);
- `data.answer_equivalence`: `fn(a, b) -> bool`, whether two answers are the same.

Votes, rewards, evaluation, reports and the TRL adapter all read answers through
ttrl.grading.extract_answer / is_equivalent, which call the user's functions once
`use_answer_checker` has installed them, so every stage judges answers alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable


class PluginError(ValueError):
    """A plug-in could not be loaded; the message says which and why."""


def is_plugin(name: str) -> bool:
    """`module:function` or `file.py:function` (the bundled kinds have no colon)."""
    return ":" in name


def load(spec: str, arity: int) -> Callable:
    """The function named by `spec`, checked to take `arity` positional arguments."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr.isidentifier():
        raise PluginError(f"{spec!r} is not 'package.module:function' or 'path/to/file.py:function'")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise PluginError(f"{spec!r}: no file {path}")
        name = f"ttrl_plugin_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            try:
                loader.loader.exec_module(module)
            except Exception as e:
                raise PluginError(f"{spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
            sys.modules[name] = module
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise PluginError(f"{spec!r}: cannot import {target} ({type(e).__name__}: {e}); is it installed, "
                              "or give a file path: path/to/file.py:function") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PluginError(f"{spec!r}: {target} has no function {attr}")
    try:
        inspect.signature(fn).bind(*range(arity))
    except TypeError:
        raise PluginError(f"{spec!r}: {attr} must take {arity} positional argument(s)") from None
    except ValueError:  # builtins without a signature: trust them
        pass
    return fn


def use_answer_checker(extractor: str = "", equivalence: str = "") -> None:
    """Install the user's answer extractor and equivalence for this process ("" = ttrl's own)."""
    from ttrl import grading

    grading.CUSTOM["extract"] = load(extractor, 1) if extractor else None
    grading.CUSTOM["equivalent"] = load(equivalence, 2) if equivalence else None

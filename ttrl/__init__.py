"""ttrl: Test-Time Reinforcement Learning — adapt a language model on unlabeled prompts with
rewards from its own majority vote.

The names below are imported on first use, so `import ttrl` stays cheap (no torch)."""

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "ttrl.config", "load_config": "ttrl.config", "config_keys": "ttrl.config",
    "train": "ttrl.launch", "evaluate_sets": "ttrl.launch", "run_config": "ttrl.launch",
    "evaluate": "ttrl.evaluation", "load_model": "ttrl.models", "load_problems": "ttrl.data",
    "majority_vote": "ttrl.voting", "write_report": "ttrl.report", "write_compare": "ttrl.report",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ttrl' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

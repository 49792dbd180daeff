"""Typed settings for every ttrl command: YAML file + `key.sub=value` overrides, validated
before any model is loaded so a typo costs seconds, not a model load."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad setting: the message names the key and what to do."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """Local Hugging Face model directory, or `smollm2-135m` (the embedded SmolLM2-135M-Instruct)."""
    architecture: dict = field(default_factory=dict)
    """Config overrides, e.g. {num_hidden_layers: 2}: build a RANDOMLY initialised model of the
    named model's shape (tests, benchmarks). Empty = load the pretrained weights."""
    dtype: str = "float32"
    """float32 (fastest on CPU), bfloat16 or float16 (GPU)."""
    chat_template: bool = True
    """Wrap each prompt as a user chat turn when the tokenizer has a template."""
    lora_rank: int = 0
    """0 = full fine-tune; >0 = train a LoRA adapter of this rank (peft)."""
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ArithmeticConfig:
    n: int = 64
    """How many questions the generator makes."""
    low: int = 0
    high: int = 9
    """Operands are drawn uniformly from [low, high]."""
    ops: list = field(default_factory=lambda: ["+"])
    seed: int = 0


@dataclass
class DataConfig:
    train: str = "arithmetic"
    """Prompts to adapt on: a bundled name (aime2024, amc, math500, arithmetic) or a .jsonl/.json/.parquet file."""
    eval: list = field(default_factory=list)
    """Extra evaluation sets (bundled names or files), reported separately from `train`."""
    holdout: float = 0.0
    """Fraction of `train` kept aside (seeded) and only evaluated: the held-out split."""
    prompt_field: str = "problem"
    answer_field: str = "answer"
    """Gold answers: read for diagnostics and evaluation only, never for training."""
    id_field: str = "id"
    limit: int = 0
    """Use only the first `limit` prompts (0 = all)."""
    template: str = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
    """How a problem becomes the user message; `{problem}` is replaced."""
    stop: list = field(default_factory=list)
    """Strings that end an answer besides end-of-sequence (e.g. "</answer>" for a template that asks
    for one), in training rollouts and evaluation alike; the answer keeps the stop string."""
    too_long: str = "skip"
    """A prompt that leaves no room for max_new_tokens in the model's context: skip (with a
    counted warning) or fail (stop with an error naming the prompt)."""
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)


@dataclass
class RolloutConfig:
    n_votes: int = 64
    """N: samples per prompt that vote on the pseudo-label (official TTRL scripts: 64)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k truncation."""
    max_new_tokens: int = 3072
    backend: str = "torch"
    """torch (built in, CPU and CUDA) or vllm (optional extra, GPU)."""
    max_batch_rows: int = 512
    """At most this many samples decode at once (whole prompts, all N samples of each); a step's
    other prompts are sampled in turn. Samples do not depend on it."""
    memory_fraction: float = 0.9
    """On CUDA: the share of free device memory the rollout's KV caches and per-step buffers may
    fill; fewer prompts decode at once when they would not fit (ttrl.rollout.decode_rows)."""


@dataclass
class RewardConfig:
    n_train_samples: int = 32
    """M: samples per prompt that are rewarded and trained on, drawn from the N votes."""
    kind: str = "majority"
    """majority (TTRL: 1 if equivalent to the pseudo-label), similarity (ROUGE-L to the consensus text),
    semantic_entropy (EMPO), neg_entropy (RENT) or self_certainty (Intuitor); see ttrl/rewards.py."""
    min_majority_ratio: float = 0.0
    """Prompts whose majority ratio is below this are skipped for training."""


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    """grpo (group-normalised), dr_grpo (no std division), rloo (leave-one-out) or reinforce_pp."""
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    """Weight of the k3 KL penalty to the frozen reference model (0 = no reference model kept)."""
    lr: float = 5e-7
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    ppo_epochs: int = 1
    """Optimisation passes over each rollout batch."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass (gradient accumulation beyond it)."""
    gradient_checkpointing: bool | str = "auto"
    """Recompute each layer's activations in the backward pass instead of keeping them: memory for
    long answers at about a third more update time. auto = on with CUDA, off on CPU."""
    logprob_chunk_mb: float = 64
    """Log-probs are computed from at most this many MB of float32 logits at a time, each chunk
    recomputed in the backward, so update memory grows with tokens x hidden size rather than tokens x
    vocabulary (32 x 3,072 tokens x Qwen's 151,936 would be 60 GB at once). 0 = all at once."""
    max_bad_steps: int = 3
    """Stop (with a checkpoint of the last good weights) after this many steps in a row whose
    update was skipped for a NaN/inf loss or gradient."""


@dataclass
class EvalConfig:
    n_samples: int = 16
    """k in avg@k / maj@k / pass@k (paper: 16)."""
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 3072
    greedy: bool = True
    """Also report greedy (temperature 0) accuracy."""
    before: bool = True
    """Evaluate the base model before training (the baselines every report compares against)."""
    every: int = 0
    """Evaluate every this many steps during training (0 = only before and after)."""


@dataclass
class TrainConfig:
    steps: int = 0
    """Optimiser steps; 0 = run `epochs` passes over the prompts."""
    epochs: int = 1
    prompts_per_step: int = 8
    seed: int = 0
    save_every: int = 0
    """Checkpoint every this many steps (0 = only at the end, or when stopped by a signal)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep in RUN_DIR/checkpoints."""
    stop_on: str = ""
    """Optional early stop on an unlabeled signal: majority_ratio or reward (plateau over
    stop_window steps), or entropy (below entropy_floor). Never on gold-based metrics."""
    stop_window: int = 5
    stop_min_delta: float = 0.01
    entropy_floor: float = 0.05

@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "rollout.backend": ("torch", "vllm"),
    "reward.kind": ("majority", "similarity", "semantic_entropy", "neg_entropy", "self_certainty"),
    "train.stop_on": ("", "majority_ratio", "reward", "entropy"),
    "algorithm.advantage": ("grpo", "dr_grpo", "rloo", "reinforce_pp"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.too_long": ("skip", "fail"),
}


def validate(cfg: Config) -> Config:
    """Impossible values fail here, naming the key, before anything expensive happens."""
    checks = [
        ("rollout.n_votes", cfg.rollout.n_votes >= 2, "must be >= 2: a vote needs several samples"),
        ("rollout.temperature", cfg.rollout.temperature > 0, "must be > 0 for sampling"),
        ("rollout.top_p", 0 < cfg.rollout.top_p <= 1, "must be in (0, 1]"),
        ("rollout.top_k", cfg.rollout.top_k >= 0, "must be >= 0 (0 = off)"),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens >= 1, "must be >= 1"),
        ("reward.n_train_samples", 1 <= cfg.reward.n_train_samples <= cfg.rollout.n_votes,
         f"must be between 1 and rollout.n_votes ({cfg.rollout.n_votes}): M samples are drawn from the N votes"),
        ("reward.min_majority_ratio", 0 <= cfg.reward.min_majority_ratio <= 1, "must be in [0, 1]"),
        ("algorithm.lr", cfg.algorithm.lr > 0, "must be > 0"),
        ("algorithm.clip_eps", cfg.algorithm.clip_eps > 0, "must be > 0"),
        ("algorithm.kl_coef", cfg.algorithm.kl_coef >= 0, "must be >= 0"),
        ("algorithm.ppo_epochs", cfg.algorithm.ppo_epochs >= 1, "must be >= 1"),
        ("algorithm.micro_batch_size", cfg.algorithm.micro_batch_size >= 1, "must be >= 1"),
        ("algorithm.weight_decay", cfg.algorithm.weight_decay >= 0, "must be >= 0"),
        ("algorithm.max_grad_norm", cfg.algorithm.max_grad_norm > 0, "must be > 0"),
        ("algorithm.warmup_steps", cfg.algorithm.warmup_steps >= 0, "must be >= 0"),
        ("algorithm.max_bad_steps", cfg.algorithm.max_bad_steps >= 1, "must be >= 1"),
        ("algorithm.gradient_checkpointing", isinstance(cfg.algorithm.gradient_checkpointing, bool)
         or cfg.algorithm.gradient_checkpointing == "auto", "must be true, false or auto (on with CUDA)"),
        ("algorithm.logprob_chunk_mb", cfg.algorithm.logprob_chunk_mb >= 0, "must be >= 0 (0 = all logits at once)"),
        ("rollout.max_batch_rows", cfg.rollout.max_batch_rows >= 1, "must be >= 1"),
        ("rollout.memory_fraction", 0 < cfg.rollout.memory_fraction <= 1, "must be in (0, 1]"),
        ("eval.n_samples", cfg.eval.n_samples >= 1, "must be >= 1"),
        ("eval.temperature", cfg.eval.temperature > 0, "must be > 0 (greedy is reported separately by eval.greedy)"),
        ("eval.top_p", 0 < cfg.eval.top_p <= 1, "must be in (0, 1]"),
        ("eval.top_k", cfg.eval.top_k >= 0, "must be >= 0 (0 = off)"),
        ("eval.max_new_tokens", cfg.eval.max_new_tokens >= 1, "must be >= 1"),
        ("eval.every", cfg.eval.every >= 0, "must be >= 0"),
        ("train.steps", cfg.train.steps >= 0, "must be >= 0"),
        ("train.epochs", cfg.train.epochs >= 1, "must be >= 1"),
        ("train.prompts_per_step", cfg.train.prompts_per_step >= 1, "must be >= 1"),
        ("train.save_every", cfg.train.save_every >= 0, "must be >= 0 (0 = only at the end)"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1, "must be >= 1"),
        ("data.holdout", 0 <= cfg.data.holdout < 1, "must be in [0, 1)"),
        ("data.limit", cfg.data.limit >= 0, "must be >= 0 (0 = all)"),
        ("data.template", "{problem}" in cfg.data.template, "must contain {problem}"),
        ("data.prompt_field", cfg.data.prompt_field != "", "must name the field holding the question"),
        ("data.arithmetic.n", cfg.data.arithmetic.n >= 1, "must be >= 1"),
        ("data.arithmetic.high", cfg.data.arithmetic.high >= cfg.data.arithmetic.low, "must be >= data.arithmetic.low"),
        ("model.lora_rank", cfg.model.lora_rank >= 0, "must be >= 0 (0 = full fine-tune)"),
        ("model.lora_dropout", 0 <= cfg.model.lora_dropout < 1, "must be in [0, 1)"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' = {_get(cfg, key)!r}: {why}")
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"config key '{key}' = {_get(cfg, key)!r}: must be one of {', '.join(allowed)}")
    for op in cfg.data.arithmetic.ops:
        if op not in ("+", "-", "*"):
            raise ConfigError(f"config key 'data.arithmetic.ops' has {op!r}: use +, - or *")
    for key in cfg.model.architecture:
        if not isinstance(key, str):
            raise ConfigError(f"config key 'model.architecture' has {key!r}: keys must be setting names "
                              "(e.g. num_hidden_layers)")
    for key in ("data.eval", "data.stop", "model.lora_target_modules"):
        for item in _get(cfg, key):
            if not isinstance(item, str) or (key == "data.stop" and not item):
                raise ConfigError(f"config key '{key}' has {item!r}: every entry must be a non-empty string")
    return cfg


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) one value against its dataclass field type."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of settings, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # strings too: YAML 1.1 reads `1e-5` (no dot) as a string
                number = float(value)
            except (ValueError, OverflowError):
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (list, dict):
        if tp is list and isinstance(value, str):
            return [value]
        if isinstance(value, tp):
            return value
    else:
        return value
    raise ConfigError(f"config key '{key}' must be of type {tp.__name__}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """`key=value` overrides use YAML scalars: 1e-5, true, [a, b], 'text'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. rollout.n_votes=16)")
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + overrides -> validated Config."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: bytes that are not UTF-8 (at byte {e.start}); "
                              "re-save the file as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = _build(Config, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return validate(cfg)


def config_from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections (model:, data:, ...), got {type(raw).__name__}")
    return validate(_build(Config, raw))


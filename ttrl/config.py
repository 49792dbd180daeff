"""Typed settings for every ttrl command: YAML file + `key.sub=value` overrides, validated
before any model is loaded so a typo costs seconds, not a model load."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ttrl.plugins import PluginError, is_plugin
from ttrl.plugins import load as load_plugin


CONFIGS_DIR = Path(__file__).parent / "configs"
"""The bundled configs (`configs/` in the repository is a link to it)."""

SEED_LIMIT = 10_000_000
"""train.seed must be below this: the per-prompt streams derived from it (step.prompt_seed
multiplies it by ~1e12) must fit the 64 bits of a torch seed."""


MAY_CHANGE_ON_RESUME = {"may_change_on_resume": True}
"""Field metadata of the settings a resumed run may change without a warning: they change how it
runs (length, memory, checkpoints, logging), not what it computes (`may_change_on_resume`)."""


class ConfigError(ValueError):
    """A bad setting: the message names the key and what to do. `key` is the dotted key at fault
    (when one is), so the caller can say where it was set."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """Local Hugging Face model directory, or `smollm2-135m` (the embedded SmolLM2-135M-Instruct)."""
    architecture: dict = field(default_factory=dict)
    """Config overrides, e.g. {num_hidden_layers: 2}: build a RANDOMLY initialised model of the
    named model's shape (tests, benchmarks). Empty = load the pretrained weights."""
    dtype: str = "float32"
    """The dtype forwards compute in: float32, bfloat16 or float16 (GPU). Trained weights stay
    float32 (mixed precision: AdamW's small steps would round away in bf16); frozen ones (LoRA's
    base, the KL reference) are held in this dtype."""
    chat_template: bool = True
    """Wrap each prompt as a user chat turn when the tokenizer has a template."""
    lora_rank: int = 0
    """0 = full fine-tune; >0 = train a LoRA adapter of this rank (peft)."""
    lora_alpha: int = 32
    """LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training (0 keeps sampling and scoring identical)."""
    lora_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get an adapter (matched by peft against module names)."""


@dataclass
class ArithmeticConfig:
    n: int = 64
    """How many questions the generator makes."""
    low: int = 0
    """Smallest operand."""
    high: int = 9
    """Largest operand: operands are drawn uniformly from [low, high]."""
    ops: list = field(default_factory=lambda: ["+"])
    """Operators to draw from: any of +, - and *."""
    seed: int = 0
    """Seed of the generator (independent of train.seed, so the questions stay put)."""
    choices: int = 0
    """0 = open answers; 2..26 = multiple choice: the result among this many shuffled options
    (the others near it), the gold a letter. Render them with `{choices}` in data.template."""


@dataclass
class DataConfig:
    train: str = "arithmetic"
    """Prompts to adapt on: a bundled name (aime2024, amc, math500, arithmetic) or a .jsonl/.json/.parquet file."""
    eval: list = field(default_factory=list)
    """Extra evaluation sets (bundled names or files), reported separately from `train`."""
    holdout: float = 0.0
    """Fraction of `train` kept aside (seeded) and only evaluated: the held-out split."""
    prompt_field: str = "problem"
    """Field of each record that holds the question."""
    answer_field: str = "answer"
    """Gold answers: read for diagnostics and evaluation only, never for training."""
    id_field: str = "id"
    """Field that names each record in logs and reports (its position in the file, from 0, when absent)."""
    choices_field: str = "choices"
    """Multiple-choice options: a list of 2..26 texts, A, B, ... in order; a record without the
    field is an open question. Its gold may be a letter or an option's text. "" = never read."""
    limit: int = 0
    """Use only the first `limit` prompts of data.train and of each data.eval set (0 = all)."""
    template: str = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
    """How a problem becomes the user message; `{problem}` is replaced, and `{choices}` by a
    multiple-choice problem's options as "A) ..." lines (after the problem if there is no `{choices}`)."""
    answer_extractor: str = ""
    """Your own answer extraction, `package.module:function` or `file.py:function`: text -> answer
    or None (ttrl/plugins.py); "" = ttrl's (\\boxed{}, "the answer is", the last number)."""
    answer_equivalence: str = ""
    """Your own equivalence of two answers, `package.module:function` or `file.py:function`:
    (a, b) -> bool, for votes, rewards and evaluation alike; "" = ttrl's maths equivalence."""
    system_prompt: str = ""
    """A system message put before each prompt through the tokenizer's chat template (in training
    and evaluation alike); without a chat template it precedes the prompt, a blank line between.
    "" = none."""
    too_long: str = "skip"
    """A prompt that leaves no room for max_new_tokens in the model's context: skip (with a
    counted warning) or fail (stop with an error naming the prompt)."""
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    """The seeded arithmetic generator behind `train: arithmetic`."""


@dataclass
class SamplingConfig:
    """How answers are sampled: one type for the training rollouts (`rollout:`) and evaluation
    (`eval:`), which differ only in their defaults and in what they add."""
    temperature: float = 1.0
    """Softmax temperature, > 0 (greedy accuracy is eval.greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    max_new_tokens: int = 3072
    """Answer length limit in tokens; a sample cut off here has no answer (no vote, reward 0)."""
    stop: list = field(default_factory=list)
    """Strings that end an answer besides end-of-sequence (e.g. "</answer>" for a template that asks
    for one); the answer keeps the stop string. Set it in rollout: and eval: alike."""
    max_batch_rows: int = field(default=512, metadata=MAY_CHANGE_ON_RESUME)
    """At most this many samples decode at once (whole prompts, all samples of each); the other
    prompts are sampled in turn. Samples do not depend on it."""
    memory_fraction: float = field(default=0.9, metadata=MAY_CHANGE_ON_RESUME)
    """On CUDA: the share of free device memory the KV caches and per-step buffers may fill; fewer
    prompts decode at once when they would not fit (ttrl.rollout.decode_rows)."""


@dataclass
class RolloutConfig(SamplingConfig):
    n_votes: int = 64
    """N: samples per prompt that vote on the pseudo-label (official TTRL scripts: 64)."""
    backend: str = "torch"
    """torch (built in, CPU and CUDA) or vllm (optional extra, GPU)."""
    vote_round: int = 0
    """Sequential voting (ttrl.sequential): draw a prompt's votes this many at a time (the first
    round at least M) and stop once its vote is decided; at most n_votes. 0 = all N at once."""
    vote_confidence: float = 0.0
    """With vote_round: also stop a prompt once the posterior probability that its leading answer
    beats the runner-up reaches this (e.g. 0.95); 0 = stop only when the leader can no longer be
    overtaken, so the pseudo-label is exactly that of N votes."""


@dataclass
class RewardConfig:
    n_train_samples: int = 0
    """M: samples per prompt that are rewarded and trained on, drawn from the N votes; 0 = half
    of rollout.n_votes (official TTRL scripts: 32 of 64)."""
    kind: str = "majority"
    """majority (TTRL: 1 if equivalent to the pseudo-label), similarity (ROUGE-L to the consensus text),
    semantic_entropy (EMPO), neg_entropy (RENT), self_certainty (Intuitor), soft_majority (RESTRAIN:
    every answer a label weighted by its sharpened vote share) or penalized_majority (SCRL/TTPO: a
    penalty for disagreeing with a confident vote); the controls format (1 for any answer) and
    random (a coin) measure what a reward that ignores the vote gives; see ttrl/rewards.py and
    docs/method.md. Or your own, `package.module:function` / `file.py:function` taking (vote,
    texts, indices) (ttrl/plugins.py)."""
    random_p: float = 0.5
    """Probability of reward 1 under the random control (reward.kind=random)."""
    label_temperature: float = 0.5
    """soft_majority: answer class j earns share_j^(1/T), normalised over the classes; 1 = the vote
    shares (as semantic_entropy), towards 0 = majority's all-or-nothing."""
    penalty: float = 1.0
    """penalized_majority: a sample that disagrees with a confident vote earns -penalty (not 0)."""
    penalty_min_ratio: float = 0.5
    """penalized_majority: the vote is confident, and disagreeing is penalised, from this majority ratio on."""
    penalty_entropy_gate: bool = True
    """penalized_majority: penalise only disagreeing samples whose mean token entropy is above their
    prompt's mean (SCRL's gate: a sure minority answer may be right; needs the torch backend)."""
    min_majority_ratio: float = 0.0
    """Prompts whose majority ratio is below this are skipped for training."""
    contrast: bool = True
    """Elect each pseudo-label by its lift over the step's other prompts (its share here minus its
    mean share there) instead of its share alone, so an answer the policy gives to every question
    earns nothing (`voting.contrastive_vote`); where a step's questions have different answers it is
    the majority vote. Changes the label of the kinds that use one (majority, penalized_majority);
    the others ignore it. false: the paper's plain majority vote (configs/paper/*, --config
    demo_plain), which on the demo collapsed onto one answer for every question on four seeds of
    five (benchmarks/README.md). Off for multiple choice, where letters repeat across questions."""


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    """grpo (group-normalised), dr_grpo (no std division), rloo (leave-one-out), reinforce_pp, or ppo:
    token-level GAE advantages from a critic (a value model trained beside the policy, ttrl/critic.py)."""
    clip_eps: float = 0.2
    """PPO clip range: the probability ratio is clipped to [1 - clip_eps, 1 + clip_eps]."""
    kl_coef: float = 0.001
    """Weight of the k3 KL penalty to the frozen reference model (official TTRL scripts: 0.001;
    0 = no reference model kept, which saves its memory)."""
    lr: float = 5e-7
    """AdamW learning rate (official TTRL scripts: 5e-7)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global L2 norm before each optimizer step."""
    lr_schedule: str = "cosine"
    """constant, or cosine: a half cosine from lr towards 0, reached one step after the last
    (verl's formula; official TTRL scripts)."""
    warmup_ratio: float = 0.03
    """Share of the run's steps over which the learning rate rises linearly from 0 (official
    TTRL scripts: 0.03); as verl, the first warm-up step trains at lr 0."""
    ppo_epochs: int = 1
    """Optimisation passes over each rollout batch."""
    mini_batch_prompts: int = 0
    """Prompts per optimizer step (whole prompts, all their M samples): 0 = one optimizer step per
    rollout batch; 1 with 8 prompts a step = 8 optimizer steps, as the official TTRL scripts do."""
    micro_batch_size: int = 16
    """At most this many sequences per forward/backward pass (gradients accumulate over them); a
    prompt's M samples may be split over several, its prompt then scored once per piece."""
    micro_batch_tokens: int = 0
    """At most this many prompt + answer tokens per forward/backward pass (0 = no token bound): on a
    GPU, bounds the update's memory for long answers."""
    gradient_checkpointing: bool | str = "auto"
    """Recompute each layer's activations in the backward pass instead of keeping them: memory for
    long answers at about a third more update time. auto = on with CUDA, off on CPU."""
    logprob_chunk_mb: float = 64
    """Log-probs are computed from at most this many MB of float32 logits at a time, each chunk
    recomputed in the backward, so update memory grows with tokens x hidden size rather than tokens x
    vocabulary (32 x 3,072 tokens x Qwen's 151,936 would be 60 GB at once). 0 = all at once."""
    critic_lr: float = 9e-6
    """PPO (advantage=ppo): AdamW learning rate of the critic, constant (official TTRL scripts: 9e-6)."""
    value_clip: float = 0.5
    """PPO: a value may move at most this far from its value at sampling time within one step's
    update before its loss term is clipped (verl's cliprange_value: 0.5)."""
    gamma: float = 1.0
    """PPO: GAE discount per token (verl: 1.0; the reward comes at the answer's last token)."""
    lam: float = 1.0
    """PPO: GAE lambda, from 1 (advantage = return - value, no bias from the critic) to 0 (one-step TD)."""
    max_bad_steps: int = field(default=3, metadata=MAY_CHANGE_ON_RESUME)
    """Stop (with a checkpoint of the last good weights) after this many steps in a row whose
    update was skipped for a NaN/inf loss or gradient."""


@dataclass
class EvalConfig(SamplingConfig):
    temperature: float = 0.6
    """Softmax temperature of the evaluation sampler (paper: 0.6)."""
    top_p: float = 0.95
    """Nucleus sampling of the evaluation sampler (paper: 0.95; 1 = off)."""
    n_samples: int = 16
    """k in avg@k / maj@k / pass@k (paper: 16)."""
    greedy: bool = True
    """Also report greedy (temperature 0) accuracy."""
    before: bool = True
    """Evaluate the base model before training (the baselines every report compares against)."""
    every: int = 0
    """Evaluate every this many steps during training (0 = only before and after)."""


@dataclass
class TrainConfig:
    steps: int = field(default=0, metadata=MAY_CHANGE_ON_RESUME)
    """Training steps, each a rollout batch of `prompts_per_step` prompts (and one optimizer step,
    or several: algorithm.mini_batch_prompts); 0 = run `epochs` passes over the prompts."""
    epochs: int = 1
    """Passes over the prompts when steps = 0."""
    prompts_per_step: int = 8
    """Prompts sampled, voted on and trained on per step (official TTRL scripts: 8)."""
    seed: int = 0
    """Seeds the model's random initialisation (with model.architecture), the prompt order, the
    sampling streams and the holdout split."""
    parallel: str = "ddp"
    """How several processes (torchrun / accelerate launch) share the model: ddp (each holds all the
    weights and optimizer state; gradients all-reduced) or fsdp (ttrl applies PyTorch's FSDP2,
    fully_shard per decoder layer, so each holds 1/processes of them, and checkpoints are sharded;
    docs/distributed.md). Checkpoints are written in this setting's format: resume with the same."""
    save_every: int = field(default=0, metadata=MAY_CHANGE_ON_RESUME)
    """Checkpoint every this many steps (0 = only at the end, or when stopped by a signal)."""
    keep_checkpoints: int = field(default=2, metadata=MAY_CHANGE_ON_RESUME)
    """How many of the latest checkpoints to keep in RUN_DIR/checkpoints."""
    stop_on: str = ""
    """Optional early stop on an unlabeled signal: majority_ratio or reward (plateau over
    stop_window steps), entropy (below entropy_floor), or collapse (the collapse watch, which
    otherwise only warns: majority ratio saturated while entropy and length drift; see
    collapse_ratio). Never on gold-based metrics."""
    guard: str = "rollback"
    """What the collapse watch (collapse_ratio, collapse_drift) does when it fires, since a run without
    gold answers cannot see a collapse otherwise: rollback (training ends and the run evaluates and
    exports the newest checkpoint from before the watch's last window of stop_window steps, the
    saturated stretch it saw; a checkpoint is kept every stop_window steps for it), stop (training
    ends at that step, its model exported), or warn (say so once and train on, as the paper). The run
    says which step's model it exported and why (console, summary.json, report)."""
    stop_window: int = 5
    """Steps per window of the plateau rule: the mean of the last window is compared with the one before."""
    stop_min_delta: float = 0.01
    """The plateau rule stops when the windowed mean rose by less than this."""
    entropy_floor: float = 0.05
    """The entropy rule stops when the rollouts' mean token entropy (nats) falls below this."""
    collapse_ratio: float = 0.9
    """The collapse watch (ttrl.stopping.collapse_reason) warns, once, when the mean majority ratio of
    the last stop_window steps reaches this while entropy and response length have drifted (below);
    train.stop_on=collapse also stops there."""
    collapse_drift: float = 0.5
    """The collapse watch's drift: entropy fell by at least this share of its mean over the first
    stop_window steps, and the mean response length moved by at least this share, either way."""
    wandb_project: str = field(default="", metadata=MAY_CHANGE_ON_RESUME)
    """Also log every metrics row to this Weights & Biases project ("" = off; needs
    `pip install 'ttrl[wandb]'`; WANDB_MODE=offline logs without a network, under RUN_DIR/wandb)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.reward.n_train_samples == 0:  # M: half of N unless set
            self.reward.n_train_samples = max(1, self.rollout.n_votes // 2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "rollout.backend": ("torch", "vllm"),
    "algorithm.lr_schedule": ("constant", "cosine"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.too_long": ("skip", "fail"),
    "train.parallel": ("ddp", "fsdp"),
}
"""Keys with a fixed set of values; the registries of rewards, advantages and stopping rules
add theirs in `choices()`."""


def choices() -> dict[str, tuple[str, ...]]:
    """Every key with a fixed set of values, read from the registries that implement them."""
    from ttrl.advantages import CRITIC_ESTIMATORS, ESTIMATORS
    from ttrl.rewards import KINDS
    from ttrl.stopping import SIGNALS

    return {**CHOICES, "reward.kind": tuple(KINDS), "algorithm.advantage": (*ESTIMATORS, *CRITIC_ESTIMATORS),
            "train.stop_on": ("", *SIGNALS), "train.guard": ("rollback", "stop", "warn")}


def _check_plugins(cfg: Config) -> None:
    """The user's functions (ttrl.plugins) load and take the arguments ttrl will pass."""
    for key, arity in (("reward.kind", 3), ("data.answer_extractor", 1), ("data.answer_equivalence", 2)):
        spec = _get(cfg, key)
        if not spec or (key == "reward.kind" and not is_plugin(spec)):
            continue
        try:
            load_plugin(spec, arity)
        except PluginError as e:
            raise ConfigError(f"config key '{key}' = {spec!r}: {e} (see ttrl/plugins.py for the signature)", key) from None


def _sampler_checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """The same rows for every section holding sampler settings (rollout:, eval:)."""
    rows = []
    for name in ("rollout", "eval"):
        s: SamplingConfig = getattr(cfg, name)
        rows += [(f"{name}.temperature", s.temperature > 0,
                  "must be > 0 for sampling (greedy accuracy is reported by eval.greedy)"),
                 (f"{name}.top_p", 0 < s.top_p <= 1, "must be in (0, 1]"),
                 (f"{name}.top_k", s.top_k >= 0, "must be >= 0 (0 = off)"),
                 (f"{name}.max_new_tokens", s.max_new_tokens >= 1, "must be >= 1"),
                 (f"{name}.max_batch_rows", s.max_batch_rows >= 1, "must be >= 1"),
                 (f"{name}.memory_fraction", 0 < s.memory_fraction <= 1, "must be in (0, 1]")]
    return rows


UNFILLED = re.compile(r"(?<![\\A-Za-z0-9}^_])\{([A-Za-z_][A-Za-z0-9_]*)\}")
"""A `{name}` in data.template: a placeholder, unless it follows a LaTeX command or script
(`\\boxed{answer}`, `x^{n}`, `\\frac{a}{b}`), where braces are the answer format's own."""


def validate(cfg: Config) -> Config:
    """Impossible values fail here, naming the key, before anything expensive happens."""

    checks = [
        ("rollout.n_votes", cfg.rollout.n_votes >= 2, "must be >= 2: a vote needs several samples"),
        *_sampler_checks(cfg),
        ("rollout.vote_round", 0 <= cfg.rollout.vote_round <= cfg.rollout.n_votes,
         f"must be between 0 (all N votes at once) and rollout.n_votes ({cfg.rollout.n_votes}): a prompt draws "
         "at most N votes"),
        ("rollout.vote_confidence", cfg.rollout.vote_confidence == 0 or 0.5 < cfg.rollout.vote_confidence < 1,
         "must be 0 (stop only when the vote cannot be overtaken) or in (0.5, 1), e.g. 0.95"),
        ("rollout.vote_confidence", cfg.rollout.vote_confidence == 0 or cfg.rollout.vote_round > 0,
         "applies only to sequential voting, which is off: set rollout.vote_round too (e.g. 8), or leave "
         "vote_confidence at 0"),
        ("reward.n_train_samples", 1 <= cfg.reward.n_train_samples <= cfg.rollout.n_votes,
         f"must be between 1 and rollout.n_votes ({cfg.rollout.n_votes}): M samples are drawn from the N votes"),
        ("reward.min_majority_ratio", 0 <= cfg.reward.min_majority_ratio <= 1, "must be in [0, 1]"),
        ("algorithm.lr", cfg.algorithm.lr > 0, "must be > 0"),
        ("algorithm.clip_eps", cfg.algorithm.clip_eps > 0, "must be > 0"),
        ("algorithm.kl_coef", cfg.algorithm.kl_coef >= 0, "must be >= 0"),
        ("algorithm.ppo_epochs", cfg.algorithm.ppo_epochs >= 1, "must be >= 1"),
        ("algorithm.micro_batch_size", cfg.algorithm.micro_batch_size >= 1, "must be >= 1"),
        ("algorithm.micro_batch_tokens", cfg.algorithm.micro_batch_tokens >= 0, "must be >= 0 (0 = no token bound)"),
        ("algorithm.mini_batch_prompts", cfg.algorithm.mini_batch_prompts >= 0,
         "must be >= 0 (0 = one optimizer step per rollout batch)"),
        ("algorithm.weight_decay", cfg.algorithm.weight_decay >= 0, "must be >= 0"),
        ("algorithm.max_grad_norm", cfg.algorithm.max_grad_norm > 0, "must be > 0"),
        ("algorithm.warmup_ratio", 0 <= cfg.algorithm.warmup_ratio < 1, "must be in [0, 1)"),
        ("reward.random_p", 0 <= cfg.reward.random_p <= 1, "must be in [0, 1]"),
        ("reward.label_temperature", cfg.reward.label_temperature > 0, "must be > 0 (1 = the vote shares)"),
        ("reward.penalty", cfg.reward.penalty >= 0, "must be >= 0: disagreeing samples earn -penalty"),
        ("reward.penalty_min_ratio", 0 <= cfg.reward.penalty_min_ratio <= 1, "must be in [0, 1]"),
        ("algorithm.max_bad_steps", cfg.algorithm.max_bad_steps >= 1, "must be >= 1"),
        ("algorithm.critic_lr", cfg.algorithm.critic_lr > 0, "must be > 0"),
        ("algorithm.value_clip", cfg.algorithm.value_clip > 0, "must be > 0"),
        ("algorithm.gamma", 0 <= cfg.algorithm.gamma <= 1, "must be in [0, 1]"),
        ("algorithm.lam", 0 <= cfg.algorithm.lam <= 1, "must be in [0, 1]"),
        ("algorithm.gradient_checkpointing", isinstance(cfg.algorithm.gradient_checkpointing, bool)
         or cfg.algorithm.gradient_checkpointing == "auto", "must be true, false or auto (on with CUDA)"),
        ("algorithm.logprob_chunk_mb", cfg.algorithm.logprob_chunk_mb >= 0, "must be >= 0 (0 = all logits at once)"),
        ("eval.n_samples", cfg.eval.n_samples >= 1, "must be >= 1"),
        ("eval.every", cfg.eval.every >= 0, "must be >= 0"),
        ("train.steps", cfg.train.steps >= 0, "must be >= 0"),
        ("train.epochs", cfg.train.epochs >= 1, "must be >= 1"),
        ("train.prompts_per_step", cfg.train.prompts_per_step >= 1, "must be >= 1"),
        ("train.seed", 0 <= cfg.train.seed < SEED_LIMIT,
         f"must be in [0, {SEED_LIMIT}): the per-prompt random streams derived from it must fit in 64 bits"),
        ("train.save_every", cfg.train.save_every >= 0, "must be >= 0 (0 = only at the end)"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1, "must be >= 1"),
        ("train.stop_window", cfg.train.stop_window >= 1, "must be >= 1 (steps per window of the plateau rule)"),
        ("train.stop_min_delta", cfg.train.stop_min_delta >= 0,
         "must be >= 0: the plateau rule stops when the signal rose by less than this"),
        ("train.entropy_floor", cfg.train.entropy_floor > 0, "must be > 0: entropy is never below 0"),
        ("train.collapse_ratio", 0 < cfg.train.collapse_ratio <= 1, "must be in (0, 1]"),
        ("train.collapse_drift", 0 < cfg.train.collapse_drift < 1, "must be in (0, 1): a share of the start"),
        ("data.holdout", 0 <= cfg.data.holdout < 1, "must be in [0, 1)"),
        ("data.limit", cfg.data.limit >= 0, "must be >= 0 (0 = all)"),
        ("data.template", "{problem}" in cfg.data.template, "must contain {problem}"),
        ("data.prompt_field", cfg.data.prompt_field != "", "must name the field holding the question"),
        ("data.arithmetic.n", cfg.data.arithmetic.n >= 1, "must be >= 1"),
        ("data.arithmetic.high", cfg.data.arithmetic.high >= cfg.data.arithmetic.low, "must be >= data.arithmetic.low"),
        ("data.arithmetic.choices", cfg.data.arithmetic.choices == 0 or 2 <= cfg.data.arithmetic.choices <= 26,
         "must be 0 (open answers) or 2..26 options"),
        ("model.lora_rank", cfg.model.lora_rank >= 0, "must be >= 0 (0 = full fine-tune)"),
        ("model.lora_alpha", cfg.model.lora_alpha > 0,
         "must be > 0: the adapter's update is scaled by lora_alpha / lora_rank, so 0 trains nothing"),
        ("model.lora_dropout", 0 <= cfg.model.lora_dropout < 1, "must be in [0, 1)"),
        ("train.wandb_project", not cfg.train.wandb_project or importlib.util.find_spec("wandb") is not None,
         "needs Weights & Biases: pip install 'ttrl[wandb]' (or wandb), or leave it empty"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' = {_get(cfg, key)!r}: {why}", key)
    _check_plugins(cfg)
    unknown = [m.group(0) for m in UNFILLED.finditer(cfg.data.template) if m.group(1) not in ("problem", "choices")]
    if unknown:
        raise ConfigError(f"config key 'data.template' = {cfg.data.template!r}: {', '.join(unknown)} is not a "
                          "placeholder ttrl fills in (only {problem} and {choices}), so the model would read it as "
                          "it stands; remove it or spell it out", "data.template")
    for key, allowed in choices().items():
        if key == "reward.kind" and is_plugin(cfg.reward.kind):
            continue
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"config key '{key}' = {_get(cfg, key)!r}: must be one of {', '.join(allowed)}", key)
    for op in cfg.data.arithmetic.ops:
        if op not in ("+", "-", "*"):
            raise ConfigError(f"config key 'data.arithmetic.ops' has {op!r}: use +, - or *", "data.arithmetic.ops")
    for key in cfg.model.architecture:
        if not isinstance(key, str):
            raise ConfigError(f"config key 'model.architecture' has {key!r}: keys must be setting names "
                              "(e.g. num_hidden_layers)", "model.architecture")
    for key in ("data.eval", "rollout.stop", "eval.stop", "model.lora_target_modules"):
        for item in _get(cfg, key):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"config key '{key}' has {item!r}: every entry must be a non-empty string", key)
    return cfg


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) one value against its dataclass field type."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of settings, got {value!r}", key)
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
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}", key)
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
    raise ConfigError(f"config key '{key}' must be of type {tp.__name__}, got {value!r} ({type(value).__name__})",
                      key)


MOVED = {"data.stop": "rollout.stop and eval.stop (stop strings are sampler settings)",
         "algorithm.warmup_steps": "algorithm.warmup_ratio (a share of the run's steps, as verl)"}
"""Keys of earlier versions, and where their setting lives now."""


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - names)
    if unknown:
        key = prefix + unknown[0]
        if key in MOVED:
            raise ConfigError(f"config key '{key}' has moved: set {MOVED[key]} instead", key)
        raise ConfigError(f"unknown config key '{key}'; known keys here: {', '.join(sorted(names))}", key)
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def field_type(key: str) -> Any:
    """The declared type of a dotted key (a dataclass for a section), or None if no such key."""
    tp: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def parse_override(key: str, text: str) -> Any:
    """The value of `key=text`: a YAML scalar (1e-5, true, [a, b], {n: 2}), except that a text
    setting keeps the text as typed (`data.template=Question: {problem}` is a string, not a mapping;
    `... #### N` keeps its `#`s, which YAML would read as a comment), unquoted when it is quoted.
    Other settings must parse as YAML, without a ` #` comment that would silently cut them."""
    if field_type(key) is str and not (len(text) > 1 and text[0] == text[-1] and text[0] in "'\""):
        return text
    quote = 'e.g. rollout.stop=\'["END", "###"]\''
    if text.lstrip().startswith("#") or " #" in text:
        raise ConfigError(f"override {key}={text}: YAML would read what follows '#' as a comment and drop it; "
                          f"quote the items that hold '#' ({quote})", key)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={text} is not valid YAML ({str(e).splitlines()[0]}); quote items "
                          f"with special characters ({quote})", key) from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. rollout.n_votes=16)")
        key, text = item.split("=", 1)
        key = key.strip()
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = parse_override(key, text)
    return raw


def bundled_configs() -> list[str]:
    """Names of the configs shipped in the package (`demo`, `paper/aime2024`, ...); the
    accelerate launcher configs are not ttrl configs."""
    return sorted(p.relative_to(CONFIGS_DIR).with_suffix("").as_posix() for p in CONFIGS_DIR.rglob("*.yaml")
                  if p.parent.name != "accelerate")


def find_config(name: str | Path) -> Path:
    """A config file by path, or a bundled one by name (`demo`, `demo.yaml`, `configs/demo.yaml`,
    `paper/aime2024`, `configs/paper/aime2024.yaml` when no such local file exists), so the
    documented commands work from any directory and from an installed wheel."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute():
        parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
        bundled = CONFIGS_DIR.joinpath(*parts) if parts else CONFIGS_DIR
        for candidate in (bundled, bundled.with_name(bundled.name + ".yaml")):
            if candidate.is_file():
                return candidate
    what = "is a directory" if path.is_dir() else "not found"
    raise ConfigError(f"config file {name} {what}; give a YAML file or a bundled config: {', '.join(bundled_configs())}")


class _KeyLines(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (YAML would keep the last
    silently) and records the line of every dotted key, for error messages."""

    def __init__(self, stream, path: Path):
        super().__init__(stream)
        self.path, self.lines = path, {}

    def walk(self, node, prefix: str = "") -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name, line = key_node.value, key_node.start_mark.line + 1
            if name in seen:
                raise ConfigError(f"{self.path}:{line}: key '{prefix}{name}' is given twice (first at line "
                                  f"{seen[name]}); YAML would keep only the last, so delete one")
            seen[name] = line
            self.lines.setdefault(prefix + name, line)
            self.walk(value_node, f"{prefix}{name}.")


def read_file(path: Path) -> tuple[dict, dict[str, int]]:
    """(raw settings, line of each dotted key) from a YAML (or JSON) config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: bytes that are not UTF-8 (at byte {e.start}); re-save the file as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    if path.suffix.lower() == ".json":  # a run's config.json
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be an object of sections (model, data, ...)")
        return raw, {}
    loader = _KeyLines(text, path)
    try:
        node = loader.get_single_node()
        loader.walk(node)
        raw = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    finally:
        loader.dispose()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    return raw, loader.lines


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional; a bundled name works too) + overrides -> validated Config. An error
    names where the bad value was set: the override as typed, or file:line."""
    overrides = overrides or []
    raw: dict = {}
    lines: dict[str, int] = {}
    if path is not None:
        path = find_config(path)
        raw, lines = read_file(path)
    raw = apply_overrides(raw, overrides)
    try:
        return validate(_build(Config, raw))
    except ConfigError as e:
        raise ConfigError(f"{_where(e.key, path, lines, overrides)}{e}", e.key) from None


def _where(key: str | None, path: Path | None, lines: dict[str, int], overrides: list[str]) -> str:
    """`command-line override k=v: `, `file:line: ` or `file: ` for the message about `key`."""
    if key is None:
        return f"{path}: " if path else ""
    related = lambda k: k == key or key.startswith(k + ".") or k.startswith(key + ".")  # noqa: E731
    for item in reversed(overrides):  # the last override of a key is the one in force
        if related(item.split("=", 1)[0].strip()):
            return f"command-line override {item}: "
    for k in sorted(lines, key=len, reverse=True):  # the innermost key of the file that holds it
        if related(k):
            return f"{path}:{lines[k]}: "
    return ""


def may_change_on_resume(cls: type = None, prefix: str = "") -> set[str]:
    """Dotted keys of the settings marked MAY_CHANGE_ON_RESUME."""
    out = set()
    for f in dataclasses.fields(cls or Config):
        kind = typing.get_type_hints(cls or Config).get(f.name)
        if dataclasses.is_dataclass(kind):
            out |= may_change_on_resume(kind, f"{prefix}{f.name}.")
        elif f.metadata.get("may_change_on_resume"):
            out.add(prefix + f.name)
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict (`Config.to_dict()`, a run's config.json) as {"section.key": value}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def config_from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections (model:, data:, ...), got {type(raw).__name__}")
    return validate(_build(Config, raw))


@dataclass
class KeyDoc:
    key: str
    type: str
    default: Any
    doc: str


def config_keys() -> list[KeyDoc]:
    """Every setting with its type, default and the docstring written under its field in this
    file (Python keeps no docstring for a dataclass field at run time, so the source is read)."""
    import ast

    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    docs: dict[tuple[str, str], str] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for stmt, after in zip(cls.body, cls.body[1:] + [None]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[cls.name, stmt.target.id] = " ".join(after.value.value.split())

    def walk(cls: type, prefix: str) -> list[KeyDoc]:
        out = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                out += walk(tp, f"{prefix}{f.name}.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                doc = next((docs[c.__name__, f.name] for c in cls.__mro__ if (c.__name__, f.name) in docs), "")
                name = getattr(tp, "__name__", None) or str(tp).replace(" ", "")  # bool | str has no __name__
                out.append(KeyDoc(prefix + f.name, name, default, doc))  # inherited fields: the base's doc
        return out

    return walk(Config, "")

"""Will it fit? The peak memory per GPU of a run, phase by phase (rollout, evaluation, update,
optimizer step), predicted from the config and the model's config.json alone: no weights are
loaded, so it answers in seconds for a 7B model on a laptop (`ttrl plan`), and the trainer can
refuse a run that would not fit before it loads anything (`check_fits`).

Analytic, not traced: a count of what each phase holds, in bytes, from the shapes. The sizes
ttrl itself picks (samples decoding at once, the update's micro-batches) come from the functions
the sampler and the update call (ttrl.rollout.batch_rows, ttrl.batches.plan), so the plan moves
with the code. Checked against the peak of allocated tensor bytes on CPU
(benchmarks/plan_memory.py); the GPU figures are predictions until a GPU has checked them
(benchmarks/gpu_step.py prints both).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

import torch

from ttrl import batches
from ttrl.config import Config, ConfigError
from ttrl.rollout import batch_rows, kv_bytes_per_token
from ttrl.scoring import chunk_positions

GB = 2**30
PROMPT_TOKENS = 256
"""Prompt length assumed when none is given: a MATH-500 problem in Qwen's chat template is
~100-300 tokens (`ttrl plan --prompt-tokens` for longer prompts)."""
CUDA_RESERVE = 1 * GB
"""Device memory torch's allocator never hands to tensors: the CUDA context (~0.5 GB) and
allocator fragmentation. A plan fits when its peak plus this is within the card."""


@dataclass
class Shape:
    """What the memory depends on, read from the model's config (and a weightless meta-device
    copy of the model, for exact parameter counts)."""
    name: str
    config: object
    """The transformers config (model.architecture applied)."""
    params: int
    layer_params: int
    """Parameters of one decoder layer (what FSDP gathers at a time)."""
    head_params: int
    """The LM head's own parameters (0 when tied to the embedding): what the PPO critic drops."""
    adapted: list[tuple[int, int]]
    """(in, out) features of every linear layer model.lora_target_modules adapts, in the whole model."""
    per_layer_adapted: list[int]
    """In-features of the adapted linears of one layer."""

    @property
    def hidden(self) -> int:
        return self.config.hidden_size

    @property
    def layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def vocab(self) -> int:
        return self.config.vocab_size

    @property
    def intermediate(self) -> int:
        return self.config.intermediate_size

    def lora_params(self, rank: int) -> int:
        return rank * sum(i + o for i, o in self.adapted)


def shape_of(cfg: Config) -> Shape:
    """The model's Shape from its config.json (model.name) with model.architecture applied."""
    from transformers import AutoModelForCausalLM

    from ttrl.models import model_config

    config = model_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    params = sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0] if hasattr(model, "model") and hasattr(model.model, "layers") else None
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    targets = cfg.model.lora_target_modules
    adapted, per_layer = [], []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            adapted.append((m.in_features, m.out_features))
            if layer is not None and any(m is x for x in layer.modules()):
                per_layer.append(m.in_features)
    return Shape(name=cfg.model.name, config=config, params=params,
                 layer_params=sum(p.numel() for p in layer.parameters()) if layer is not None else 0,
                 head_params=0 if tied or head is None else head.weight.numel(), adapted=adapted,
                 per_layer_adapted=per_layer)


@dataclass
class Plan:
    """Predicted bytes per phase and item, on one GPU (or the CPU process)."""
    phases: dict[str, dict[str, int]]
    host: dict[str, int]
    """CPU memory per process (on a GPU run; on CPU it is counted in the phases too)."""
    sizes: dict
    """What ttrl will choose: samples decoding at once, micro-batch rows and tokens, ..."""
    gpus: int
    fsdp: bool
    gpu_memory: int | None
    """Bytes of the card (None: CPU, no fixed budget)."""
    notes: list[str] = field(default_factory=list)
    suggestions: list[dict] = field(default_factory=list)

    def peak(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.peak)

    @property
    def peak_bytes(self) -> int:
        return self.peak(self.peak_phase)

    @property
    def over_bytes(self) -> int:
        """How far the peak (plus CUDA_RESERVE) is above the card; <= 0 fits."""
        return 0 if self.gpu_memory is None else self.peak_bytes + CUDA_RESERVE - self.gpu_memory

    @property
    def fits(self) -> bool:
        return self.over_bytes <= 0

    def to_dict(self) -> dict:
        gb = lambda b: round(b / GB, 3)  # noqa: E731
        return {"gpus": self.gpus, "fsdp": self.fsdp,
                "gpu_memory_gb": None if self.gpu_memory is None else gb(self.gpu_memory),
                "sizes": self.sizes,
                "phases": {p: {"peak_gb": gb(self.peak(p)), "items_gb": {k: gb(v) for k, v in items.items()}}
                           for p, items in self.phases.items()},
                "host_gb": {k: gb(v) for k, v in self.host.items()},
                "peak_phase": self.peak_phase, "peak_gb": gb(self.peak_bytes), "fits": self.fits,
                "over_gb": gb(max(0, self.over_bytes)), "notes": self.notes, "suggestions": self.suggestions}


def _dtype(cfg: Config) -> torch.dtype:
    return getattr(torch, cfg.model.dtype)


def _layer_tokens_bytes(shape: Shape, d: int, lora_rank: int) -> int:
    """Bytes one decoder layer keeps for its backward, per token: the two RMSNorms' float32 inputs
    (8H), the norms' outputs, q, the repeated k and v, attention output, o_proj input, the
    residual (7H in the model dtype) and the MLP's gate, silu, up and product (4I); with LoRA the
    adapter's rank-r activations and, below float32, the float32 copy of each adapted input."""
    h, i = shape.hidden, shape.intermediate
    lora = sum(4 * lora_rank + (4 * n if d < 4 else 0) for n in shape.per_layer_adapted) if lora_rank else 0
    return 8 * h + d * (7 * h + 4 * i) + lora


def step_bytes(s, d: int) -> int:
    """Bytes per vocabulary entry and row that one decode step holds at its peak
    (ttrl.rollout.sample_next): the logits, float32 log-probs, probabilities and CDF, and with
    top-k / top-p their masks and the nucleus sort. (The sampler sizes itself with the rounder
    STEP_COPIES = 8 float32 copies.)"""
    out = d + 3 * 4
    if s.top_k:
        out += 1 + 4
    if s.top_p < 1.0:
        out += (4 if s.top_k else 0) + 4 + 8 + 4 + 4 + 2
    return out


def _sampler_phase(cfg: Config, shape: Shape, s, n: int, prompts: int, prompt_tokens: int, d: int,
                   free: int | None, device: str) -> tuple[dict[str, int], dict, dict[str, int]]:
    """(device items, sizes, host items) of sampling `prompts` prompts x n (ttrl.rollout.generate)."""
    rows = batch_rows(s, n, shape.config, _dtype(cfg), prompt_tokens, free)
    chunk_prompts = max(1, min(rows // n, prompts))
    active = chunk_prompts * n
    capacity = prompt_tokens + s.max_new_tokens
    kv = kv_bytes_per_token(shape.config, _dtype(cfg))
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    prefill = chunk_prompts * prompt_tokens * d * (4 * h + 3 * i) + chunk_prompts * capacity * kv  # + the pre-expansion cache
    step = active * (v * step_bytes(s, d) + capacity * 8 + d * (4 * h + 3 * i))  # vocabulary rows, mask, layer
    items = {"KV cache": active * capacity * kv, "prefill / decode step": max(prefill, step)}
    host = {"sampled tokens, log-probs": active * s.max_new_tokens * (8 + 3 * 4) * 2}  # buffers, then per-sample copies
    return items, {"rows": active, "prompts_at_once": chunk_prompts, "tokens_per_row": capacity}, host


def _forward_bytes(shape: Shape, d: int, lora_rank: int, rows: int, groups: int, p: int, t: int,
                   checkpointing: bool, chunk: int) -> tuple[int, int]:
    """(kept for the backward, peak workspace on top) of one micro-batch's teacher-forced forward
    and backward (ttrl.rollout.score): `rows` answers of `t` tokens from `groups` prompts of `p`."""
    h, i, v, layers = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    a = _layer_tokens_bytes(shape, d, lora_rank)
    kv_width = 2 * shape.config.num_key_value_heads * (getattr(shape.config, "head_dim", None)
                                                      or h // shape.config.num_attention_heads)
    answers = rows * t
    if checkpointing:  # each row runs prompt + answer as one sequence; layers keep their inputs only
        seq = rows * (p + t)
        kept = layers * seq * h * d + rows * (p + t) ** 2  # + the [rows, 1, S, S] boolean mask
        layer_work = seq * (a + d * (2 * h + 2 * i))  # one layer recomputed, and its gradients
    else:  # the prompt once per group, its cache expanded to the group's answers
        seq = groups * p + answers
        cache = rows * (p + t) * kv_width * d * 2 + rows * p * 2 * h * d  # cat'ed K, V and their repeat over the prompt
        kept = layers * (seq * a + cache) + rows * t * (p + t)
        layer_work = seq * d * (2 * h + 2 * i)
    kept += seq * (4 + d) * h + answers * h * d + answers * 4 * 8  # final norm, scored hidden states, log-probs
    chunk = answers if not chunk or chunk >= answers else chunk
    return kept, max(layer_work, chunk * v * (8 + d + (4 if d < 4 else 0)))  # a chunk's logits and gradients


def _ref_forward(shape: Shape, d: int, rows: int, groups: int, p: int, t: int, chunk: int, kv: int) -> int:
    """Workspace of the KL reference model's no-grad scoring (cache path) of one micro-batch."""
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    answers = rows * t
    chunk = answers if not chunk or chunk >= answers else chunk
    return rows * (p + t) * kv + (groups * p + answers) * d * (4 * h + 3 * i) + answers * h * d + chunk * v * (8 + d)


def plan(cfg: Config, gpus: int = 1, gpu_memory_gb: float | None = 80.0, fsdp: bool | None = None,
         prompt_tokens: int = PROMPT_TOKENS, device: str = "cuda", shape: Shape | None = None,
         suggest: bool = True) -> Plan:
    """Predicted peak bytes per GPU of each phase of a training step of `cfg` on `gpus` GPUs of
    `gpu_memory_gb` (FSDP2 sharding parameters, gradients and AdamW state over them when `fsdp`,
    the default with more than one GPU; else DDP). device="cpu": the CPU process, as ttrl runs
    there (no memory budget, no activation checkpointing under `auto`)."""
    shape = shape or shape_of(cfg)
    fsdp = gpus > 1 if fsdp is None else fsdp
    k = gpus if fsdp else 1
    cpu = device == "cpu"
    gpu_bytes = None if cpu or gpu_memory_gb is None else int(gpu_memory_gb * GB)
    m, algo, r = cfg.model, cfg.algorithm, cfg.rollout
    d = torch.finfo(_dtype(cfg)).bits // 8
    lora = m.lora_rank
    # Trained weights are float32 (peft's adapters; a full fine-tune's, ttrl.models.trained_weights),
    # frozen ones (LoRA's base, the KL reference) in model.dtype, which is also what forwards compute in.
    trainable = shape.lora_params(lora) * 4 if lora else shape.params * 4
    weights = shape.params * d if lora else trainable
    frozen = shape.params * d
    # Under autocast (mixed precision, not FSDP's) a model.dtype copy of each float32 trained weight
    # it casts is kept while it runs: the rollout, and the update until its backward.
    casts = {} if fsdp or lora or d == 4 else {"weights in model.dtype (mixed precision)": frozen}
    notes = []

    # What stays allocated between phases (the update frees its gradients when it ends).
    state = {"weights": weights // k if fsdp else weights}
    if lora:
        state["LoRA adapters"] = trainable
    state["AdamW state"] = 2 * trainable // k
    if algo.kl_coef > 0:
        state["KL reference model"] = frozen
        if fsdp:
            notes.append("the KL reference model is a full copy on every GPU (it is not sharded)")
    if algo.advantage == "ppo":
        backbone = (shape.params - shape.head_params) * (d if lora else 4)
        critic_train = shape.lora_params(lora) * 4 if lora else backbone
        # sharded like the policy under FSDP (train.parallel=fsdp)
        state["PPO critic (weights, gradients, AdamW)"] = (backbone + 3 * critic_train) // k + 16 * shape.hidden
    host = {"last good weights (CPU copy)": trainable // k}
    if cpu:
        state["last good weights (CPU copy)"] = trainable

    # Rollout and evaluation: FSDP gathers the whole model for them; LoRA samples from merged weights.
    sampling_state = dict(state)
    if fsdp:
        sampling_state["weights (gathered for sampling)"] = frozen
    sampling_state.update(casts)
    if lora:
        sampling_state["LoRA merged weights"] = sum(i * o for i, o in shape.adapted) * d
    resident = sum(sampling_state.values())
    free = None if gpu_bytes is None else max(0, gpu_bytes - CUDA_RESERVE - resident)
    phases, sizes = {}, {}
    per_rank = math.ceil(cfg.train.prompts_per_step / gpus)
    if r.backend == "vllm":
        from ttrl.vllm_rollout import GPU_MEMORY

        share = int(GPU_MEMORY * (gpu_bytes or 0))
        phases["rollout"] = {**sampling_state, "vLLM engine (weights + KV cache)": share}
        sizes["rollout"] = {"rows": None, "note": f"vLLM sizes its own batch in {GPU_MEMORY:.0%} of the GPU"}
        host_rollout = {}
    else:
        items, sizes["rollout"], host_rollout = _sampler_phase(cfg, shape, r, r.n_votes, per_rank, prompt_tokens, d,
                                                               free, device)
        phases["rollout"] = {**sampling_state, **items}
    if cfg.eval.before or cfg.eval.every:
        eval_prompts = max(1, cfg.eval.max_batch_rows // cfg.eval.n_samples)
        items, sizes["eval"], host_eval = _sampler_phase(cfg, shape, cfg.eval, cfg.eval.n_samples, eval_prompts,
                                                         prompt_tokens, d, free, device)
        phases["eval"] = {**sampling_state, **items}
    else:
        host_eval = {}
    for name, extra in (("rollout", host_rollout), ("eval", host_eval)):
        for item, value in extra.items():
            host[item] = max(host.get(item, 0), value)
            if cpu:  # the CPU's memory is the device's
                phases[name][item] = value

    # Update: the largest micro-batch ttrl.batches packs from answers of max_new_tokens.
    ckpt = algo.gradient_checkpointing is True or (algo.gradient_checkpointing == "auto" and not cpu)
    m_train = cfg.reward.n_train_samples or r.n_votes // 2
    lengths = [[r.max_new_tokens] * m_train for _ in range(cfg.train.prompts_per_step)]
    world = gpus
    n_mini = batches.n_mini_batches(cfg.train.prompts_per_step, algo.mini_batch_prompts)
    layout = batches.plan(world, lengths, [prompt_tokens] * cfg.train.prompts_per_step, n_mini,
                          algo.micro_batch_size, algo.micro_batch_tokens)
    mbs = [mb for mb in layout[0] for mb in mb] or [[batches.Piece(0, (0,))]]
    worst = max(mbs, key=lambda mb: sum(prompt_tokens + lengths[pc.prompt][j] for pc in mb for j in pc.samples))
    rows, groups = sum(len(pc.samples) for pc in worst), len(worst)
    chunk = chunk_positions(algo.logprob_chunk_mb, shape.vocab)
    kept, work = _forward_bytes(shape, d, lora, rows, groups, prompt_tokens, r.max_new_tokens, ckpt, chunk)
    update = {**state, "gradients": trainable // k, **casts}
    if fsdp:
        update["weights (layers gathered in turn)"] = 2 * shape.layer_params * d
    update["activations kept for the backward"] = kept
    if algo.advantage == "ppo":
        c_kept, c_work = _forward_bytes(shape, d, lora, rows, groups, prompt_tokens, r.max_new_tokens, ckpt, 0)
        update["PPO critic activations"] = c_kept - rows * r.max_new_tokens * (shape.hidden * d + 32)
        work = max(work, c_work)
    if algo.kl_coef > 0:
        work = max(work, _ref_forward(shape, d, rows, groups, prompt_tokens, r.max_new_tokens, chunk,
                                      kv_bytes_per_token(shape.config, _dtype(cfg))))
    update["backward / log-prob chunk workspace"] = work
    phases["update"] = update
    phases["optimizer step"] = {**state, "gradients": trainable // k, "AdamW step temporaries": trainable // k}
    sizes["update"] = {"micro_batch_rows": rows, "micro_batch_tokens": rows * (prompt_tokens + r.max_new_tokens),
                       "micro_batches_per_rank": len(mbs), "optimizer_steps": n_mini,
                       "gradient_checkpointing": ckpt, "logprob_chunk_positions": chunk or None}
    sizes["model"] = {"params": shape.params, "trainable": shape.lora_params(lora) if lora else shape.params,
                      "dtype": m.dtype, "prompt_tokens": prompt_tokens, "answer_tokens": r.max_new_tokens}
    out = Plan(phases=phases, host=host, sizes=sizes, gpus=gpus, fsdp=fsdp, gpu_memory=gpu_bytes, notes=notes)
    if suggest and not out.fits:
        out.suggestions = suggestions(cfg, out, shape, prompt_tokens, gpu_memory_gb)
    return out


def _with(cfg: Config, override: str) -> Config:
    """A copy of cfg with one `section.key=value` override applied."""
    from ttrl.config import parse_override

    cfg = copy.deepcopy(cfg)
    key, text = override.split("=", 1)
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, parse_override(key, text))
    return cfg


def suggestions(cfg: Config, base: Plan, shape: Shape, prompt_tokens: int, gpu_memory_gb: float) -> list[dict]:
    """The smallest change of each kind that makes `base` fit, one setting at a time (micro-batch
    tokens, gradient checkpointing, LoRA rank, FSDP over more GPUs, answer length, decode rows):
    [{"change": text, "overrides": [key=value], "gpus": K, "peak_gb", "phase"}]."""
    out = []

    def first(candidates):
        for overrides, gpus in candidates:
            c = cfg
            for o in overrides:
                c = _with(c, o)
            p = plan(c, gpus, gpu_memory_gb, base.fsdp or gpus > 1, prompt_tokens, shape=shape, suggest=False)
            if p.fits:
                change = " ".join(overrides) or (f"FSDP over {gpus} GPUs (train.parallel=fsdp under "
                                                 f"torchrun --nproc_per_node {gpus})")
                out.append({"change": change, "overrides": overrides, "gpus": gpus,
                            "peak_gb": round(p.peak_bytes / GB, 2), "phase": p.peak_phase})
                return

    algo, r, k = cfg.algorithm, cfg.rollout, base.gpus
    tokens = base.sizes["update"]["micro_batch_tokens"]
    one = prompt_tokens + r.max_new_tokens
    first([([f"algorithm.micro_batch_tokens={t}"], k)
           for t in sorted({max(one, tokens >> s) for s in range(1, 12)}, reverse=True) if t < tokens])
    if algo.gradient_checkpointing is False:
        first([(["algorithm.gradient_checkpointing=true"], k)])
    if not cfg.model.lora_rank:
        first([([f"model.lora_rank={rank}"], k) for rank in (64, 32, 16, 8)])
    first([([], g) for g in (2, 4, 8, 16) if g > k])
    first([([f"rollout.max_new_tokens={t}"], k)
           for t in (r.max_new_tokens * 3 // 4, r.max_new_tokens // 2, r.max_new_tokens // 4, r.max_new_tokens // 8)
           if t >= 16])
    rows = base.sizes["rollout"].get("rows") or 0
    first([([f"rollout.max_batch_rows={b}"], k) for b in (rows // 2, rows // 4, r.n_votes) if r.n_votes <= b < rows])
    return out


def check_fits(cfg: Config, device, prompt_tokens: int = PROMPT_TOKENS) -> None:
    """Stop a run that will not fit its GPU before any weight is loaded: a ConfigError (one
    `error:` line) saying by how much and what to change. Only on CUDA: a CPU has no fixed budget.
    The GPUs are read from the launcher's environment (WORLD_SIZE), the engine from train.parallel."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = cfg.train.parallel == "fsdp"
    message = fit_error(cfg, gpus, torch.cuda.get_device_properties(device).total_memory / GB, fsdp, prompt_tokens)
    if message:
        raise ConfigError(message)


def fit_error(cfg: Config, gpus: int, gpu_memory_gb: float, fsdp: bool, prompt_tokens: int = PROMPT_TOKENS) -> str | None:
    """Why `cfg` will not fit `gpus` GPUs of `gpu_memory_gb`, and what would (None when it fits)."""
    p = plan(cfg, gpus, gpu_memory_gb, fsdp, prompt_tokens)
    if p.fits:
        return None
    fixes = "; ".join(s["change"] for s in p.suggestions) or "a GPU with more memory"
    return (f"this run needs about {p.peak_bytes / GB:.1f} GB per GPU in its {p.peak_phase} phase, "
            f"{p.over_bytes / GB:.1f} GB more than a {gpu_memory_gb:.0f} GB GPU holds (`ttrl plan` shows every "
            f"phase; the figures are predictions); any one of these fits: {fixes}")

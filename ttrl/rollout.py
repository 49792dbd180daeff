"""Sampling engine: prompts -> N samples each, with the per-token log-probs and entropies of the
sampling distribution.

Why our own loop rather than `model.generate`: each prompt is prefilled once and its KV cache
expanded to its N samples (TTRL draws 64 votes per prompt), finished rows are dropped from the
batch so they stop costing compute, and the log-probs come out of the same softmax that was
sampled from, so no second scoring pass is needed. Measured against `model.generate`, and what
was tried and dropped: benchmarks/README.md (rollout.py).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from ttrl.config import SamplingConfig
from ttrl.metrics import tell_decoding
from ttrl.models import merged_lora
from ttrl.scoring import cache_kwarg, pad, tempered_logprobs


@dataclass
class Sampling(SamplingConfig):
    """One call of the engine: the sampler settings (`rollout:` or `eval:` of the config, one
    definition in ttrl.config) and how many samples each prompt gets."""
    n: int = 1
    """Samples per prompt."""
    ignore_eos: bool = False
    """Never end at end-of-sequence: every sample runs to max_new_tokens (benchmarks of random models)."""

    @classmethod
    def of(cls, settings: SamplingConfig, n: int, **kwargs) -> Sampling:
        """The engine's settings for `n` samples per prompt with a config section's sampler."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(SamplingConfig)}, n=n, **kwargs)


@dataclass
class Rollout:
    """Samples of a batch of prompts, each prompt's samples consecutive: sample i belongs to prompt
    i // n, unless `sizes` gives the prompts different numbers of samples (sequential voting).
    Index a prompt's samples through `group(p)`, never by arithmetic on `n`."""
    n: int
    """Samples per prompt as configured (N); with `sizes`, the most any prompt may have."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    """Per sample, the generated tokens (the end-of-sequence token included when emitted)."""
    logprobs: list[torch.Tensor]
    """Per sample [len]: log-prob of each generated token under softmax(logits / T)."""
    entropy: list[torch.Tensor]
    """Per sample [len]: entropy (nats) of softmax(logits / T) at each step."""
    certainty: list[torch.Tensor]
    """Per sample [len]: self-certainty KL(uniform || softmax(logits / T)) at each step (Intuitor)."""
    texts: list[str]
    truncated: list[bool]
    """True where max_new_tokens was hit before end-of-sequence."""
    sizes: list[int] | None = None
    """Samples of each prompt when they differ (sequential voting stops decided prompts early);
    None = `n` each."""

    @property
    def group_sizes(self) -> list[int]:
        """Samples of each prompt, in order."""
        return [self.n] * len(self.prompt_ids) if self.sizes is None else list(self.sizes)

    def group(self, p: int) -> range:
        """Indices of prompt p's samples."""
        if self.sizes is None:
            return range(p * self.n, (p + 1) * self.n)
        start = sum(self.sizes[:p])
        return range(start, start + self.sizes[p])

    @property
    def n_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        """One Rollout of the prompts of `parts`, in order (one part: itself, not a copy)."""
        if len(parts) == 1:
            return parts[0]
        join = lambda name: [x for r in parts for x in getattr(r, name)]  # noqa: E731
        n = max(r.n for r in parts)
        sizes = [s for r in parts for s in r.group_sizes]
        return Rollout(n=n, prompt_ids=join("prompt_ids"), completion_ids=join("completion_ids"),
                       logprobs=join("logprobs"), entropy=join("entropy"), certainty=join("certainty"),
                       texts=join("texts"), truncated=join("truncated"),
                       sizes=None if all(s == n for s in sizes) else sizes)


class NonFiniteError(FloatingPointError):
    """The model's logits hold NaN or +inf: its weights have blown up, nothing can be sampled."""


class Sampler(Protocol):
    """A rollout backend: the built-in engine (`TorchSampler`) or vLLM (ttrl.vllm_rollout)."""

    def generate(self, model, prompt_ids: list[list[int]], s: Sampling, seeds: list[int]) -> Rollout:
        """`s.n` samples of each prompt, prompt p on its own random stream `seeds[p]`."""

    def sync(self, model) -> None:
        """Take the trained weights after an update (a no-op where the sampler uses them directly)."""


class TorchSampler:
    """The built-in engine (`generate` below) as a rollout backend. `context(model)` yields the plain
    model to sample from (ttrl.distributed gathers sharded parameters there)."""

    def __init__(self, tokenizer, context=nullcontext):
        self.tokenizer, self.context = tokenizer, context

    def generate(self, model, prompt_ids: list[list[int]], s: Sampling, seeds: list[int]) -> Rollout:
        with self.context(model) as plain:
            return generate(plain, self.tokenizer, prompt_ids, s, seeds=seeds)

    def sync(self, model) -> None:
        pass


def stop_window(stop: tuple[str, ...] | list[str]) -> int:
    """Trailing tokens enough to hold any stop string: counted in bytes, since a token holds at least
    one (a character can take several tokens: '答案：' is 3 characters and 6 of SmolLM2's tokens)."""
    return max((len(x.encode("utf-8")) for x in stop), default=0) + 2


def _truncation_mask(logp: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor | None:
    """True for tokens outside top-k / the top-p nucleus (None when nothing is cut); logp [rows, vocab].
    As Hugging Face and vLLM: top-k first, then the nucleus of the top-k tokens' renormalised distribution."""
    drop = None
    if top_k and top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]
        drop = logp < kth
    if top_p < 1.0:
        kept = logp if drop is None else torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
        sorted_lp, order = torch.sort(kept, dim=-1, descending=True)
        p = sorted_lp.exp()
        drop_sorted = (p.cumsum(-1) - p) >= top_p  # keep the smallest prefix reaching top_p
        nucleus = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        drop = nucleus if drop is None else drop | nucleus
    return drop


def sample_next(logits: torch.Tensor, s: Sampling, uniforms: torch.Tensor | None):
    """(tokens, logprob, entropy, self-certainty), each [rows], for one decoding step.

    Sampling is by inverse CDF: row r takes the first token whose cumulative probability exceeds
    `uniforms[r]` (in [0, 1)), an exact draw up to float32 rounding of the CDF. One uniform per row,
    where a Gumbel/exponential race needs a random number per vocabulary entry (49k per row, the
    single most expensive op of a CPU decode step when we measured it). All in float32, also
    under mixed precision (CPU autocast would run the entropy's dot product in bf16).
    """
    with torch.autocast(logits.device.type, enabled=False):
        return _sample_next(logits, s, uniforms)  # tempered_logprobs works in float32


def _sample_next(logits: torch.Tensor, s: Sampling, uniforms: torch.Tensor | None):
    logp = tempered_logprobs(logits, s.temperature)
    p = logp.exp()
    entropy = -torch.linalg.vecdot(p, logp)
    certainty = -math.log(logp.shape[-1]) - logp.mean(-1)
    if not (entropy.isfinite().all() and certainty.isfinite().all()):  # -inf logits (masked vocabulary)
        entropy = -(p * logp).nan_to_num().sum(-1)
        certainty = -math.log(logp.shape[-1]) - logp.clamp(min=-1e4).mean(-1)
    if s.temperature == 0 or uniforms is None:
        tokens = logp.argmax(-1)
    else:
        drop = _truncation_mask(logp, s.top_k, s.top_p)
        cdf = (p if drop is None else p.masked_fill(drop, 0.0)).cumsum(-1)
        total = cdf[:, -1]
        u = torch.minimum(uniforms.to(cdf) * total, torch.nextafter(total, torch.zeros_like(total)))
        # NaN probabilities (blown-up weights) search past the end: clamp, the NaN log-prob tells.
        tokens = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp_(max=logp.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(1), entropy, certainty


def _uniforms(gens: list[torch.Generator], n: int, row_id: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """One U[0, 1) per batch row. Prompt g's rows draw from its own generator, all n of them every
    step while any is alive, so a sample does not depend on which prompts share its batch
    (chunking, data-parallel ranks) or on when finished rows are dropped."""
    table = torch.zeros((len(gens), n))
    for g in torch.unique(row_id[alive] // n).tolist():
        table[g] = torch.rand(n, generator=gens[g])
    return table.view(-1)[row_id]


def _decode_cache(model, capacity: int):
    """A transformers cache whose full-attention layers write into preallocated buffers.

    A dynamic cache re-concatenates (copies) every layer's keys and values at each step; a static
    cache attends over its whole preallocated length. These layers write one column in place and
    hand attention a view of the filled part only. Sliding-window layers keep transformers' own class.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            b, h, _, d = key_states.shape
            self.device = key_states.device
            self.kbuf = key_states.new_empty((b, h, capacity, d))
            self.vbuf = value_states.new_empty((b, h, capacity, value_states.shape[-1]))
            self.length = 0
            self.is_initialized = True

        def _views(self):
            self.keys, self.values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]
            return self.keys, self.values

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            self.kbuf[:, :, self.length:end] = key_states
            self.vbuf[:, :, self.length:end] = value_states
            self.length = end
            return self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            """Prefix sharing: each prompt's keys and values copied to its `repeats` samples."""
            for name in ("kbuf", "vbuf"):
                old = getattr(self, name)
                new = old.new_empty((old.shape[0] * repeats, *old.shape[1:]))
                new.view(old.shape[0], repeats, *old.shape[1:])[:, :, :, : self.length] = old[:, None, :, : self.length]
                setattr(self, name, new)
            self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep `indices` (ascending), moved to the front of the same buffers: no new cache."""
            for buf in (self.kbuf, self.vbuf):
                buf[: len(indices), :, : self.length] = buf[indices, :, : self.length]
            self.kbuf, self.vbuf = self.kbuf[: len(indices)], self.vbuf[: len(indices)]
            self._views()

    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


COMPACT_FRACTION = 0.125
"""Finished rows are dropped from the batch once they make up this share of it: at most
1/8 of a step's compute is spent on finished rows, and the cache copy is amortised."""


def _stop_hits(tokenizer, tails: list[list[int]], stop: tuple[str, ...]) -> list[bool]:
    """Whether each row's last tokens contain a stop string (checked every step, so the first
    time it appears is the step that completed it)."""
    return [any(x in text for x in stop) for text in tokenizer.batch_decode(tails)]


@torch.no_grad()
def _generate_chunk(model, tokenizer, prompts: list[list[int]], s: Sampling, eos: set[int], pad_id: int,
                    seeds: list[int]):
    device = next(model.parameters()).device
    ids, mask = pad(prompts, pad_id, device, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    T = s.max_new_tokens
    width = ids.shape[1]
    cache = _decode_cache(model, width + T)
    cache_kw = {cache_kwarg(model): cache}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **cache_kw)
    # Prefix sharing: one prefill per prompt, then its cache is copied to its n samples.
    rows = len(prompts) * s.n
    logits = out.logits[:, -1].repeat_interleave(s.n, 0)
    del out
    cache.batch_repeat_interleave(s.n)
    # Columns past the prompt are 1: each step passes the mask up to its own column.
    full_mask = torch.cat([mask, mask.new_ones((mask.shape[0], T))], 1).repeat_interleave(s.n, 0)
    next_pos = positions[:, -1:].repeat_interleave(s.n, 0) + 1

    tokens = torch.full((rows, T), pad_id, dtype=torch.long)
    logprobs = torch.zeros((rows, T))
    entropy = torch.zeros((rows, T))
    certainty = torch.zeros((rows, T))
    lengths = torch.zeros(rows, dtype=torch.long)
    row_id = torch.arange(rows)  # sample index of each batch row
    alive = torch.ones(rows, dtype=torch.bool)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long)
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    tail = stop_window(s.stop)
    for t in range(T):
        u = None if s.temperature == 0 else _uniforms(gens, s.n, row_id, alive).to(device)
        tok, lp, ent, cert = (x.cpu() for x in sample_next(logits, s, u))
        if lp.isnan().any():  # NaN/+inf logits: a sampled index would be out of range, and the text garbage
            raise NonFiniteError(f"non-finite logits at decoding step {t}")
        live = row_id[alive]
        tokens[live, t] = tok[alive]
        logprobs[live, t] = lp[alive]
        entropy[live, t] = ent[alive]
        certainty[live, t] = cert[alive]
        lengths[live] += 1
        alive &= ~torch.isin(tok, eos_t)
        if s.stop and alive.any():
            hits = _stop_hits(tokenizer, tokens[row_id[alive], max(0, t + 1 - tail): t + 1].tolist(), s.stop)
            alive[alive.clone()] = ~torch.tensor(hits, dtype=torch.bool)
        n_alive = int(alive.sum())
        tell_decoding(t + 1, T)  # a progress display moves inside a long batch
        if t == T - 1 or n_alive == 0:
            break
        if len(alive) - n_alive >= max(1, COMPACT_FRACTION * len(alive)):
            keep = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep.to(device))
            tok, full_mask, next_pos, row_id = tok[keep], full_mask[keep], next_pos[keep], row_id[keep]
            alive = alive[keep]
        logits = model(input_ids=tok[:, None].to(device), attention_mask=full_mask[:, : width + t + 1],
                       position_ids=next_pos, use_cache=True, **cache_kw).logits[:, -1]
        next_pos = next_pos + 1
    # Compaction only drops finished rows: every row not alive now ended (end-of-sequence or a stop string).
    ended = torch.ones(rows, dtype=torch.bool)
    ended[row_id[alive]] = False
    return tokens, logprobs, entropy, certainty, lengths, ended


STEP_COPIES = 8
"""float32 [rows, vocab] tensors a decode step holds at once (logits, log-probs, probabilities,
CDF, masks): the per-row memory besides the KV cache."""


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV-cache bytes per token and row: layers x kv heads x head_dim x (K and V) x dtype bytes."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers * kv * head_dim * 2 * torch.finfo(dtype).bits // 8


def decode_rows(budget_bytes: int, kv_per_token: int, tokens: int, vocab: int, n: int, cap: int) -> int:
    """Rows that may decode at once: a multiple of n (whole prompts), at most `cap`, each row holding
    a KV cache of `tokens` (prompt + max_new_tokens) and STEP_COPIES float32 vocabulary rows, all
    within `budget_bytes`; never fewer than one prompt's n (a prompt is not split)."""
    per_row = kv_per_token * tokens + STEP_COPIES * vocab * 4
    return max(n, min(cap, budget_bytes // per_row) // n * n)


def batch_rows(s: SamplingConfig, n: int, config, dtype: torch.dtype, longest_prompt: int,
               free_bytes: int | None) -> int:
    """Samples that decode at once: s.max_batch_rows in whole prompts of n, lowered to what
    `free_bytes` of device memory holds (`decode_rows`); None = no fixed budget (CPU). The one
    sizing rule of the sampler, which ttrl.plan calls too."""
    if free_bytes is None:
        return max(n, s.max_batch_rows // n * n)
    return decode_rows(int(free_bytes * s.memory_fraction), kv_bytes_per_token(config, dtype),
                       longest_prompt + s.max_new_tokens, config.vocab_size, n, s.max_batch_rows)


def _batch_rows(model, prompt_ids: list[list[int]], s: Sampling) -> int:
    """`batch_rows` with this device's free memory (on CUDA; none on CPU)."""
    param = next(model.parameters())
    free = None
    if param.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(param.device)
        free += torch.cuda.memory_reserved(param.device) - torch.cuda.memory_allocated(param.device)  # torch's cache
    kind = param.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else param.dtype  # the KV cache's
    return batch_rows(s, s.n, model.config, dtype, max(len(p) for p in prompt_ids), free)


def eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return {i for i in ids if i is not None}


def generate(model, tokenizer, prompt_ids: list[list[int]], s: Sampling,
             generator: torch.Generator | None = None, seeds: list[int] | None = None) -> Rollout:
    """Sample `s.n` completions for each prompt (token ids, chat template already applied).

    Each prompt samples from its own random stream, seeded by `seeds[p]` or else drawn from
    `generator`: the same seed gives the same samples however prompts are batched.
    """
    if seeds is None:
        seeds = torch.randint(0, 2**62, (len(prompt_ids),), generator=generator).tolist()
    was_training = model.training
    model.eval()
    all_eos = eos_ids(model, tokenizer)
    eos = set() if s.ignore_eos else all_eos
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(all_eos))
    completion_ids, lps, ents, certs, truncated = [], [], [], [], []
    with merged_lora(model):
        per_chunk = _batch_rows(model, prompt_ids, s) // s.n if prompt_ids else 1
        for start in range(0, len(prompt_ids), per_chunk):
            chunk = slice(start, start + per_chunk)
            tokens, logprobs, entropy, certainty, lengths, ended = _generate_chunk(
                model, tokenizer, prompt_ids[chunk], s, eos, pad_id, seeds[chunk])
            for r in range(tokens.shape[0]):
                n = int(lengths[r])
                completion_ids.append(tokens[r, :n].tolist())
                lps.append(logprobs[r, :n].clone())
                ents.append(entropy[r, :n].clone())
                certs.append(certainty[r, :n].clone())
                truncated.append(not bool(ended[r]))
    model.train(was_training)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(n=s.n, prompt_ids=[list(p) for p in prompt_ids], completion_ids=completion_ids,
                   logprobs=lps, entropy=ents, certainty=certs, texts=texts, truncated=truncated)

"""Teacher-forced scoring: the log-probs (policy) or values (PPO's critic) of given answers to given
prompts, in one forward pass each. The sampler (ttrl.rollout) draws answers; the update
(ttrl.update) and the critic (ttrl.critic) score them here, through one layout of the batch
(`TeacherForced`), so the two readings of an answer can never be lined up differently."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ttrl.models import ModelError


def tempered_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) in float32: the one definition of the policy's distribution,
    shared by the sampler and by teacher-forced scoring so the two agree exactly."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version takes."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def pad(seqs: list[list[int]], pad_id: int, device, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [len(seqs), longest]; prompts are left-padded so they end together."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


LOGPROB_CHUNK_MB = 64
"""Default `algorithm.logprob_chunk_mb`: float32 logits scored at once (64 MB = 441 positions of
Qwen2.5's 151,936-token vocabulary, 1,365 of SmolLM2's 49,152)."""


@dataclass
class TeacherForced:
    """A batch of groups laid out for one teacher-forced pass: each of `prompts` has a group of
    consecutive answers (`group_size` each, one size for all or one per prompt; a subset of a
    prompt's samples is a group too). Answer token t is read at position t-1: the prompt's last
    position, then the answer's own. Two ways to run it, the same numbers: each prompt once, its
    KV cache expanded to its group (`prompt_pass` then `answer_pass`), or, under activation
    checkpointing (training: layers keep no cache), each row as one sequence (`whole`)."""
    sizes: list[int]
    rows: torch.Tensor
    """[answers]: each answer's prompt index."""
    p_ids: torch.Tensor
    p_mask: torch.Tensor
    """[prompts, longest prompt], left-padded so prompts end together."""
    c_ids: torch.Tensor
    c_mask: torch.Tensor
    """[answers, longest answer], right-padded."""

    @classmethod
    def of(cls, prompts: list[list[int]], completions: list[list[int]], pad_id: int, group_size: int | list[int],
           device) -> TeacherForced:
        sizes = [group_size] * len(prompts) if isinstance(group_size, int) else list(group_size)
        if len(sizes) != len(prompts) or sum(sizes) != len(completions):
            raise ValueError(f"{len(prompts)} prompts with group sizes {group_size} != {len(completions)} completions")
        rows = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
        return cls(sizes, rows, *pad(prompts, pad_id, device, left=True), *pad(completions, pad_id, device, left=False))

    @property
    def width(self) -> int:
        return self.c_ids.shape[1]

    def whole(self) -> dict:
        """Forward inputs of every row's prompt and answer (but its last token) as one sequence."""
        mask = torch.cat([self.p_mask[self.rows], self.c_mask[:, :-1]], 1)
        return {"input_ids": torch.cat([self.p_ids[self.rows], self.c_ids[:, :-1]], 1), "attention_mask": mask,
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    def prompt_pass(self) -> dict:
        """Forward inputs of each prompt once (into a cache)."""
        return {"input_ids": self.p_ids, "attention_mask": self.p_mask,
                "position_ids": (self.p_mask.cumsum(-1) - 1).clamp(min=0)}

    def expand(self, cache, prompt_out: torch.Tensor) -> torch.Tensor:
        """The prompt pass's `cache` (in place) and output (returned) repeated for each prompt's group."""
        if len(set(self.sizes)) == 1 and self.sizes[0] > 1:
            cache.batch_repeat_interleave(self.sizes[0])
        elif len(set(self.sizes)) > 1:  # groups of different sizes (a group split over micro-batches)
            cache.batch_select_indices(self.rows)
        return prompt_out[self.rows]

    def answer_pass(self, last: int | None = None) -> dict:
        """Forward inputs of the answers' first `last` tokens (default: all) after the expanded cache."""
        last = self.width if last is None else last
        p_mask = self.p_mask[self.rows]
        mask = torch.cat([p_mask, self.c_mask], 1)
        c_pos = p_mask.sum(-1, keepdim=True) + torch.arange(self.width, device=self.c_ids.device)
        return {"input_ids": self.c_ids[:, :last], "attention_mask": mask[:, :p_mask.shape[1] + last],
                "position_ids": c_pos[:, :last]}


def score(model, prompts: list[list[int]], completions: list[list[int]], temperature: float,
          pad_id: int, group_size: int | list[int] = 1,
          chunk_mb: float = LOGPROB_CHUNK_MB) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of `completions` (with grad when enabled), laid out by `TeacherForced`.

    Running each prompt once and expanding its KV cache (with its autograd graph) to the group
    gives the same gradient as repeating the prompt, at a fraction of the cost. Inside the model's
    forward (so DDP, FSDP and mixed precision see it as usual) the LM head computes the completion
    tokens' log-probs directly, at most `chunk_mb` MB of float32 logits at a time (`token_logprobs`).
    Returns (logprobs [B, Tc], 0 past each completion's end; mask [B, Tc]).
    """
    from transformers import DynamicCache

    b = TeacherForced.of(prompts, completions, pad_id, group_size, next(model.parameters()).device)
    plain = plain_model(model)
    head = plain.get_output_embeddings()
    per_chunk = chunk_positions(chunk_mb, plain.config.vocab_size)
    if model.training and torch.is_grad_enabled() and checkpointing_on(model):
        with _head_scores(head, b.c_ids, b.c_mask, temperature, per_chunk) as scored:
            out = model(**b.whole(), use_cache=False, logits_to_keep=b.width)
        return scored(out.logits), b.c_mask.float()
    cache = DynamicCache()
    cache_kw = {cache_kwarg(model): cache}
    last = model(**b.prompt_pass(), use_cache=True, logits_to_keep=1, **cache_kw).logits[:, -1]  # [prompts, vocab]
    last = b.expand(cache, last)
    first = tempered_logprobs(last, temperature).gather(-1, b.c_ids[:, :1]).squeeze(-1) * b.c_mask[:, 0]
    if b.width == 1:
        if is_sharded(model):  # under FSDP every rank runs as many forwards (each gathers the parameters)
            with torch.no_grad():
                model(**b.answer_pass(1), use_cache=True, **cache_kw)
        return first[:, None], b.c_mask.float()
    with _head_scores(head, b.c_ids[:, 1:], b.c_mask[:, 1:], temperature, per_chunk) as scored:
        out = model(**b.answer_pass(b.width - 1), use_cache=True, **cache_kw)
    return torch.cat([first[:, None], scored(out.logits)], 1), b.c_mask.float()


def chunk_positions(chunk_mb: float, vocab: int) -> int:
    """Positions whose float32 logits fit in `chunk_mb` MB (at least 1); 0 = no chunking."""
    return 0 if chunk_mb <= 0 else max(1, int(chunk_mb * 2**20) // (4 * vocab))


@contextmanager
def _head_scores(head, targets: torch.Tensor, mask: torch.Tensor, temperature: float, per_chunk: int):
    """While inside: the LM head, when the model's forward calls it, returns the log-probs [B, T] of
    `targets` instead of logits [B, T, vocab]. Yields a function that checks the forward returned
    them untouched (a model that post-processes its logits, e.g. soft-capping, would be scored
    wrongly) and gives them back."""
    forward, own = head.forward, head.__dict__.get("forward")
    returned = []

    def scores(hidden):
        returned.append(token_logprobs(forward, hidden, targets, mask, temperature, per_chunk))
        return returned[-1]

    def checked(logits):
        if not returned or not (logits is returned[-1] or torch.equal(logits, returned[-1])):
            raise ModelError("this model changes its logits after the LM head (e.g. Gemma-2's soft-capping), "
                             "which ttrl's scoring (log-probs computed inside the head) does not support yet")
        return logits

    head.forward = scores
    try:
        yield checked
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def token_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float,
                   per_chunk: int = 0) -> torch.Tensor:
    """[B, T] log-probs of `targets` under tempered_logprobs(head(hidden)) where mask is 1, else 0;
    `head` maps [n, H] hidden states to [n, vocab] logits.

    Only the masked positions are scored, `per_chunk` at a time (0 = all at once). With several
    chunks each runs under activation checkpointing, so no [positions, vocab] tensor outlives its
    chunk: the backward recomputes each chunk's logits. Memory then grows with tokens x hidden
    size, not tokens x vocabulary.
    """
    keep = mask.bool()
    h, t = hidden[keep], targets[keep]
    if not per_chunk or per_chunk >= len(t):  # one chunk: recomputing it would cost time and save nothing
        lp = _chunk_logprobs(head, h, t, temperature)
    else:
        lp = torch.cat([checkpoint(_chunk_logprobs, head, h[i:i + per_chunk], t[i:i + per_chunk], temperature,
                                   use_reentrant=False) for i in range(0, len(t), per_chunk)])
    out = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device)
    out[keep] = lp
    return out


def _chunk_logprobs(head, h: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    return tempered_logprobs(head(h), temperature).gather(-1, t[:, None]).squeeze(-1)


def plain_model(model):
    """The transformers model inside the DDP / peft wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(model) -> bool:
    """`model` is sharded by FSDP2: each forward is a collective every rank must join."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in plain_model(model).modules())

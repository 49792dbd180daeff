"""How a step's trained samples are cut up for the update (pure index maths).

Optimizer mini-batches are made of whole prompts, taken in the step's order: with
`algorithm.mini_batch_prompts` = 1 each prompt gets its own optimizer step, as the official TTRL
scripts do, however many processes run. Each mini-batch's trained samples are then dealt out to
the ranks in equal contiguous blocks (a prompt's samples may span two ranks, as verl splits its
mini-batches over GPUs), so every rank works on every mini-batch and the optimizer steps are
those of one process. Within a mini-batch, a rank packs its samples into micro-batches (one
forward/backward each) bounded in sequences and tokens; a group may be split over micro-batches,
its prompt then being scored once per piece. Every rank computes every rank's plan, so all run the
same number of backward passes (each may be a collective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Some of one prompt's trained samples, scored together in one forward."""
    prompt: int
    """Index of the prompt within the step."""
    samples: tuple[int, ...]
    """Positions within the prompt's trained samples (its `train_idx` / advantages), ascending."""


MicroBatch = list[Piece]


def n_mini_batches(prompts_per_step: int, mini_batch_prompts: int) -> int:
    """Optimizer steps per rollout batch: one per `mini_batch_prompts` prompts (0 = one in all)."""
    return 1 if mini_batch_prompts <= 0 else max(1, math.ceil(prompts_per_step / mini_batch_prompts))


def chunks(items: list, n: int) -> list[list]:
    """`items` in n consecutive chunks whose sizes differ by at most one (the first ones larger)."""
    base, extra = divmod(len(items), n)
    out, start = [], 0
    for j in range(n):
        size = base + (j < extra)
        out.append(items[start:start + size])
        start += size
    return out


def samples_of(prompts: list[int], lengths: list[list[int]]) -> list[tuple[int, int]]:
    """(prompt, position among its trained samples) of every trained sample of `prompts`, in order;
    `lengths[p]` is empty for a prompt left out of the update."""
    return [(p, j) for p in prompts for j in range(len(lengths[p]))]


def pack(samples: list[tuple[int, int]], lengths: list[list[int]], prompt_lengths: list[int], max_sequences: int,
         max_tokens: int) -> list[MicroBatch]:
    """Micro-batches of `samples` ((prompt, position) pairs, `samples_of`), in order: at most
    `max_sequences` sequences and (when `max_tokens` > 0) `max_tokens` prompt + answer tokens each;
    a sequence longer than the budget goes alone. `lengths[p]`: answer length of each trained sample of p."""
    out: list[MicroBatch] = []
    current: MicroBatch = []
    n_seq = n_tok = 0
    for p, j in samples:
        cost = prompt_lengths[p] + lengths[p][j]
        if n_seq >= max_sequences or (max_tokens > 0 and n_seq and n_tok + cost > max_tokens):
            out.append(current)
            current, n_seq, n_tok = [], 0, 0
        if current and current[-1].prompt == p:
            current[-1] = Piece(p, current[-1].samples + (j,))
        else:
            current.append(Piece(p, (j,)))
        n_seq, n_tok = n_seq + 1, n_tok + cost
    if current:
        out.append(current)
    return out


def plan(world: int, lengths: list[list[int]], prompt_lengths: list[int], n_mini: int,
         max_sequences: int, max_tokens: int) -> list[list[list[MicroBatch]]]:
    """plan[rank][mini-batch] -> that rank's micro-batches: the step's prompts in `n_mini`
    consecutive chunks, each chunk's trained samples in `world` consecutive blocks, one per rank.
    `lengths[p]` is empty for a prompt left out of the update."""
    blocks = [chunks(samples_of(chunk, lengths), world) for chunk in chunks(list(range(len(lengths))), n_mini)]
    return [[pack(per_rank[r], lengths, prompt_lengths, max_sequences, max_tokens) for per_rank in blocks]
            for r in range(world)]


def tokens_of(per_rank: list[list[MicroBatch]], lengths: list[list[int]]) -> int:
    """Answer tokens of one mini-batch (its micro-batches on every rank): the denominator of its
    token-mean loss."""
    return sum(lengths[piece.prompt][j] for micro_batches in per_rank for mb in micro_batches
               for piece in mb for j in piece.samples)

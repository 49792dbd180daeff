"""Sequential voting (OptPO, arXiv 2512.02882, in spirit): draw a prompt's votes in rounds and
stop drawing once its vote is decided, instead of N votes for every prompt.

Plain TTRL spends most of its sampling on votes decided long before the N-th. Here a prompt's
samples come in rounds (`rollout.vote_round` at a time, the first round at least M, from which
the M trained samples are drawn, so the update sees the policy's samples whenever the prompt
stopped: `groups.reward`); after each round a prompt stops
when its leading answer can no longer be overtaken by the votes still to come, or, with
`rollout.vote_confidence`, when a Beta-Binomial test says the leader beats the runner-up with at
least that probability (`vote_decided`). Prompts still undecided at N end with N votes, as
without sequential voting.

The engine's properties hold: round r of prompt p samples from its own seed (`round_seed`, from
p's seed and r), so a prompt's first k samples are the same whether it, or any other prompt,
stopped early, and however prompts are batched or sharded; each round samples only the prompts
still undecided, so decided ones free their rows. With `vote_round` >= N there is one round, and
it is exactly today's sampling.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from math import comb
from typing import Sequence

from ttrl.grading import sample_answers
from ttrl.rollout import Rollout, Sampler, Sampling
from ttrl.voting import majority_vote


def leader_probability(lead: int, runner_up: int) -> float:
    """Posterior probability, under a uniform prior, that the leading answer is more likely than
    the runner-up given their vote counts: P(theta > 1/2) for theta ~ Beta(lead + 1, runner_up + 1),
    which for whole counts is the binomial tail P(Binomial(lead + runner_up + 1, 1/2) <= lead)."""
    n = lead + runner_up + 1
    return sum(comb(n, k) for k in range(lead + 1)) / 2**n


def vote_decided(counts: Sequence[int], drawn: int, n_max: int, confidence: float = 0.0) -> bool:
    """Whether a prompt may stop drawing votes. `counts`: votes of each answer class after `drawn`
    samples (samples without an answer count in `drawn` only); at most `n_max` may be drawn.

    Decided when the leader is ahead of the runner-up by more than the votes still to come, so no
    further votes can change the winner (a tie could, through the tie-break); or, with
    `confidence` > 0, when `leader_probability` reaches it. The test is repeated after every
    round without correction, so the chance of a different winner than N votes would elect is
    measured (benchmarks/adaptive_votes.py), not bounded by `confidence`."""
    ranked = sorted(counts, reverse=True) + [0, 0]
    lead, second = ranked[0], ranked[1]
    if drawn >= n_max or lead > second + (n_max - drawn):
        return True
    return confidence > 0 and lead > 0 and leader_probability(lead, second) >= confidence


def round_seed(seed: int, r: int) -> int:
    """The random stream of round r of a prompt whose stream is `seed`: round 0 is the prompt's own
    stream (one round of N samples is today's sampling), later rounds a 63-bit hash of both."""
    if r == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{r}".encode(), digest_size=8).digest(), "big") >> 1


@dataclass(frozen=True)
class VoteRounds:
    """How sequential voting draws a prompt's votes."""
    n_max: int
    """N: the most samples a prompt gets."""
    min_votes: int
    """M: samples every prompt gets before it may stop (the trained samples are drawn from them)."""
    size: int
    """Samples per round after the first."""
    confidence: float = 0.0
    """Stop on `leader_probability` >= this too (0: only when the vote cannot be overtaken)."""

    @classmethod
    def of(cls, cfg) -> VoteRounds | None:
        """The rounds of a Config (None when rollout.vote_round is 0: all N votes at once)."""
        r = cfg.rollout
        if not r.vote_round:
            return None
        return cls(n_max=r.n_votes, min_votes=cfg.reward.n_train_samples, size=r.vote_round,
                   confidence=r.vote_confidence)

    def boundaries(self) -> list[int]:
        """Samples a prompt has after each round: the first round max(M, size), then `size` more
        each, the last capped at N."""
        out = [min(self.n_max, max(self.min_votes, self.size))]
        while out[-1] < self.n_max:
            out.append(min(self.n_max, out[-1] + self.size))
        return out


def sample_in_rounds(sampler: Sampler, model, prompt_ids: list[list[int]], sampling: Sampling, seeds: list[int],
                     rounds: VoteRounds, choices: Sequence[Sequence[str] | None] | None = None,
                     lockstep: bool = False) -> Rollout:
    """Each prompt's samples, drawn in `rounds` until its vote is decided: a Rollout whose `sizes`
    say how many each prompt got. `choices`: per prompt, a multiple-choice problem's options (its
    answers are letters). `lockstep`: call the sampler every round even with no prompt left (a
    sharded model gathers its parameters in every call, a collective every rank must join)."""
    choices = list(choices) if choices is not None else [None] * len(prompt_ids)
    rows: list[list[tuple[Rollout, int]]] = [[] for _ in prompt_ids]  # per prompt: (its round's rollout, index)
    answers: list[list[str | None]] = [[] for _ in prompt_ids]
    undecided, drawn = list(range(len(prompt_ids))), 0
    for r, upto in enumerate(rounds.boundaries()):
        if undecided or lockstep:
            part = sampler.generate(model, [prompt_ids[p] for p in undecided], replace(sampling, n=upto - drawn),
                                    [round_seed(seeds[p], r) for p in undecided])
            for j, p in enumerate(undecided):
                rows[p] += [(part, i) for i in part.group(j)]
                answers[p] += sample_answers([part.texts[i] for i in part.group(j)],
                                             [part.truncated[i] for i in part.group(j)], [choices[p]] * (upto - drawn))
        drawn = upto
        undecided = [p for p in undecided
                     if not vote_decided(majority_vote(answers[p]).counts, drawn, rounds.n_max, rounds.confidence)]
    flat = [row for per_prompt in rows for row in per_prompt]
    pick = lambda name: [getattr(part, name)[i] for part, i in flat]  # noqa: E731
    sizes = [len(per_prompt) for per_prompt in rows]
    return Rollout(n=rounds.n_max, prompt_ids=[list(p) for p in prompt_ids], completion_ids=pick("completion_ids"),
                   logprobs=pick("logprobs"), entropy=pick("entropy"), certainty=pick("certainty"),
                   texts=pick("texts"), truncated=pick("truncated"),
                   sizes=None if all(k == rounds.n_max for k in sizes) else sizes)

"""Label-free rewards computed from the samples themselves (pure).

`majority_rewards` is TTRL's reward: 1 for agreeing with the majority vote. For open-ended
outputs with no vote to take, `similarity_rewards` scores each text by its ROUGE-L F1 to the
consensus text (the medoid of the group).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # the type only: importing the grader (sympy) here would slow config validation
    from ttrl.voting import Vote

MAX_TOKENS = 2048  # ROUGE-L looks at the first tokens only; keeps N^2 comparisons cheap


def majority_rewards(vote: Vote, indices: Sequence[int]) -> list[float]:
    """1.0 for the samples at `indices` that belong to the winning class, else 0.0."""
    return [1.0 if vote.winner >= 0 and vote.cluster_of[i] == vote.winner else 0.0 for i in indices]


def similarity_rewards(texts: Sequence[str], indices: Sequence[int]) -> list[float]:
    """Open-ended outputs: consensus = the text with the highest mean ROUGE-L F1 to all
    others (medoid); reward = ROUGE-L F1 of each selected text to it."""
    if not indices:
        return []
    tokens = [_tokens(t) for t in texts]
    n = len(texts)
    f1 = [[0.0] * n for _ in range(n)]
    for i in range(n):
        f1[i][i] = 1.0 if tokens[i] else 0.0
        for j in range(i + 1, n):
            f1[i][j] = f1[j][i] = _f1(tokens[i], tokens[j])
    consensus = consensus_index(texts, f1)
    return [f1[i][consensus] for i in indices]


def consensus_index(texts: Sequence[str], f1: list[list[float]] | None = None) -> int:
    """Index of the medoid text; ties go to the smallest text so order does not matter."""
    n = len(texts)
    if f1 is None:
        tokens = [_tokens(t) for t in texts]
        f1 = [[_f1(tokens[i], tokens[j]) for j in range(n)] for i in range(n)]
    mean = [sum(f1[i][j] for j in range(n) if j != i) / max(n - 1, 1) for i in range(n)]
    # Rounded: the same sums taken in another order differ in the last bits, which must not break ties.
    return min(range(n), key=lambda i: (-round(mean[i], 9), texts[i]))


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts over lowercased word tokens (as rouge-score, without stemming)."""
    return _f1(_tokens(a), _tokens(b))


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())[:MAX_TOKENS]


def _f1(a: list[str], b: list[str]) -> float:
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, bit-parallel (Hyyro 2004): O(len(b)) big-int steps.

    Why not the textbook O(n*m) table: 64 texts of 1000 tokens need 2016 comparisons per prompt.
    """
    if len(a) < len(b):
        a, b = b, a  # bits over the longer sequence, loop over the shorter
    match: dict[str, int] = {}
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        m = match.get(token)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def format_rewards(vote: Vote, indices: Sequence[int]) -> list[float]:
    """Control: 1.0 for a sample with an extracted answer (one that voted), else 0.0."""
    return [1.0 if vote.cluster_of[i] >= 0 else 0.0 for i in indices]


def random_rewards(n: int, indices: Sequence[int], p: float, seed: int) -> list[float]:
    """Control: a coin of probability `p` per sample, from `seed`; sample i's coin does not depend
    on which samples are rewarded (all n are drawn)."""
    rng = random.Random(seed)
    coins = [rng.random() < p for _ in range(n)]
    return [1.0 if coins[i] else 0.0 for i in indices]


def soft_majority_rewards(vote: Vote, indices: Sequence[int], temperature: float) -> list[float]:
    """Labels that know how sure they are (RESTRAIN, arXiv 2510.02172: pseudo-label weighting):
    every answer class is a pseudo-label of weight w_j = share_j^(1/T) / sum_k share_k^(1/T), and
    a sample earns its class's weight (0 without an answer). The weights sum to 1, so a clear
    majority earns nearly 1 and a split vote little: across prompts the reward says how sure the
    vote is. T = 1 gives the vote shares (EMPO's semantic_entropy reward, up to a factor per
    prompt); T -> 0 gives TTRL's majority reward (tied leaders share the weight)."""
    if vote.winner < 0:
        return [0.0] * len(indices)
    top = max(vote.counts)
    powered = [math.exp((math.log(c) - math.log(top)) / temperature) for c in vote.counts]  # no overflow
    weights = [w / sum(powered) for w in powered]
    return [weights[vote.cluster_of[i]] if vote.cluster_of[i] >= 0 else 0.0 for i in indices]


def penalized_majority_rewards(vote: Vote, entropy: Sequence[float], indices: Sequence[int], penalty: float,
                               min_ratio: float, entropy_gate: bool) -> list[float]:
    """TTRL's reward plus a penalty for disagreeing with a confident majority (TTPO, arXiv
    2608.27448, penalises disagreeing rollouts; SCRL, arXiv 2603.19880, gates its negative labels
    by generation entropy): 1 for the majority's answer; -`penalty` for another answer when the
    vote is confident (majority ratio >= `min_ratio`) and, with `entropy_gate`, the sample was
    less sure than its group (mean token entropy above the mean over all the prompt's samples);
    else 0, as for samples without an answer. Under GRPO a group of two reward values gets the
    same advantages whatever the values, so the penalty matters where a group mixes agreeing,
    penalised and unpenalised samples, and under dr_grpo / rloo / reinforce_pp (scale matters)."""
    confident = vote.winner >= 0 and vote.majority_ratio >= min_ratio
    mean_entropy = sum(entropy) / len(entropy) if entropy else 0.0
    out = []
    for i in indices:
        c = vote.cluster_of[i]
        if vote.winner >= 0 and c == vote.winner:
            out.append(1.0)
        elif c >= 0 and confident and (not entropy_gate or entropy[i] > mean_entropy):
            out.append(-penalty)
        else:
            out.append(0.0)
    return out


@dataclass(frozen=True)
class RewardKind:
    """One `reward.kind`: how it scores a group's samples, and what the rest of ttrl must know of it."""
    compute: Callable[..., list[float]]
    """(vote, texts, entropy, certainty, indices, seed, settings) -> rewards of the samples at
    `indices`; `settings` holds the reward.* keys (label_temperature, penalty, random_p, ...)."""
    binary: bool = False
    """Rewards are 1 or 0, as a gold answer's would be: only then does train/reward_accuracy mean something."""
    uses_label: bool = False
    """Reads the vote's pseudo-label, so reward.contrast (which elects another label) changes it."""
    needs_entropy: bool = False
    """Reads per-token entropy or certainty, which only the torch sampler gives (not vLLM)."""


def _semantic_entropy(vote: Vote, indices: Sequence[int]) -> list[float]:
    n = len(vote.cluster_of)
    return [vote.counts[vote.cluster_of[i]] / n if vote.cluster_of[i] >= 0 else 0.0 for i in indices]


REWARDS: dict[str, RewardKind] = {
    "majority": RewardKind(lambda vote, texts, ent, cert, idx, seed, s: majority_rewards(vote, idx),
                           binary=True, uses_label=True),
    "similarity": RewardKind(lambda vote, texts, ent, cert, idx, seed, s: similarity_rewards(texts, idx)),
    "semantic_entropy": RewardKind(lambda vote, texts, ent, cert, idx, seed, s: _semantic_entropy(vote, idx)),
    "neg_entropy": RewardKind(lambda vote, texts, ent, cert, idx, seed, s: [-float(ent[i]) for i in idx],
                              needs_entropy=True),
    "self_certainty": RewardKind(lambda vote, texts, ent, cert, idx, seed, s: [float(cert[i]) for i in idx],
                                 needs_entropy=True),
    "soft_majority": RewardKind(lambda vote, texts, ent, cert, idx, seed, s:
                                soft_majority_rewards(vote, idx, s.label_temperature)),
    "penalized_majority": RewardKind(lambda vote, texts, ent, cert, idx, seed, s: penalized_majority_rewards(
        vote, ent, idx, s.penalty, s.penalty_min_ratio, s.penalty_entropy_gate), uses_label=True),
    "format": RewardKind(lambda vote, texts, ent, cert, idx, seed, s: format_rewards(vote, idx), binary=True),
    "random": RewardKind(lambda vote, texts, ent, cert, idx, seed, s: random_rewards(len(texts), idx, s.random_p, seed),
                         binary=True),
}
"""Label-free rewards selectable by `reward.kind`, all computed from one prompt's samples:
- majority: TTRL, 1 if in the majority vote's equivalence class;
- similarity: ROUGE-L F1 to the consensus text, for open-ended outputs;
- semantic_entropy: EMPO, the frequency of the sample's answer class (its share of the N
  votes), so minimising semantic entropy over answers;
- neg_entropy: RENT, minus the sample's mean token entropy;
- self_certainty: Intuitor, the sample's mean KL(uniform || next-token distribution);
- soft_majority: RESTRAIN's pseudo-label weighting, every answer a label weighted by its
  sharpened vote share (`soft_majority_rewards`);
- penalized_majority: SCRL / TTPO, majority's 1 for agreeing, and a penalty for disagreeing
  with a confident vote (`penalized_majority_rewards`);
- format (a CONTROL, never a method): 1 if the sample has an answer at all, whatever it is;
- random (a CONTROL): 1 with probability `random_p`, a seeded coin per sample.
The controls tell a gain from the vote apart from one any reward would give (a format effect,
or GRPO's response to noise: Spurious Rewards, arXiv 2506.10947); see docs/method.md."""

KINDS = tuple(REWARDS)


def needs_entropy(kind: str, penalty_entropy_gate: bool) -> bool:
    """Whether `reward.kind` reads per-token entropy (penalized_majority only through its gate)."""
    return reward_kind(kind).needs_entropy or (kind == "penalized_majority" and penalty_entropy_gate)


@dataclass
class RewardSettings:
    """The reward.* settings the kinds read (ttrl.config.RewardConfig has them all)."""
    random_p: float = 0.5
    label_temperature: float = 0.5
    penalty: float = 1.0
    penalty_min_ratio: float = 0.5
    penalty_entropy_gate: bool = True


@lru_cache(maxsize=None)
def reward_kind(kind: str) -> RewardKind:
    """The registry's kind, or the user's reward `module:function` (ttrl.plugins) as one."""
    if kind in REWARDS:
        return REWARDS[kind]
    from ttrl.plugins import is_plugin, load

    if not is_plugin(kind):
        raise ValueError(f"unknown reward kind {kind!r}; use one of {', '.join(KINDS)} or 'package.module:function'")
    fn = load(kind, 3)
    return RewardKind(lambda vote, texts, ent, cert, idx, seed, s: [float(r) for r in fn(vote, list(texts), list(idx))],
                      uses_label=True)


def label_free_rewards(kind: str, vote: Vote, texts: Sequence[str], entropy: Sequence[float],
                       certainty: Sequence[float], indices: Sequence[int], seed: int = 0,
                       random_p: float = 0.5, *, label_temperature: float = 0.5, penalty: float = 1.0,
                       penalty_min_ratio: float = 0.5, penalty_entropy_gate: bool = True) -> list[float]:
    """Rewards of the samples at `indices` of one group; entropy and certainty are per-sample
    means over tokens; `seed` and `random_p` serve the random control only, `label_temperature`
    soft_majority, the `penalty*` settings penalized_majority (the reward.* keys of those names)."""
    settings = RewardSettings(random_p, label_temperature, penalty, penalty_min_ratio, penalty_entropy_gate)
    rewards = reward_kind(kind).compute(vote, texts, entropy, certainty, indices, seed, settings)
    if len(rewards) != len(indices):
        raise ValueError(f"reward.kind={kind} gave {len(rewards)} rewards for {len(indices)} samples")
    return rewards

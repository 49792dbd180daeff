from dataclasses import replace
from math import comb

import pytest
import torch

from ttrl.config import ModelConfig, load_config
from ttrl.grading import sample_answers
from ttrl.data import encode_prompts
from ttrl.models import load_model
from ttrl.rollout import Sampling, TorchSampler, generate
from ttrl.sequential import VoteRounds, leader_probability, round_seed, sample_in_rounds, vote_decided
from ttrl.voting import majority_vote

PROMPTS = ["What is 2 + 3?", "Hi", "Please add seven and eight and say the result in words, then digits."]


def test_leader_probability_hand_computed():
    # P(theta > 1/2), theta ~ Beta(lead + 1, runner_up + 1), integrated by hand for small counts.
    assert leader_probability(0, 0) == 0.5  # uniform prior: a coin
    assert leader_probability(1, 0) == 0.75  # 1 - int_0^1/2 2t dt
    assert leader_probability(4, 0) == 31 / 32  # 1 - (1/2)^5
    assert leader_probability(4, 1) == 1 - (1 + 6) / 64  # P(Binomial(6, 1/2) <= 4)
    assert leader_probability(2, 2) == 0.5  # a tie is a coin, whatever the counts
    assert leader_probability(6, 1) == pytest.approx(1 - sum(comb(8, k) for k in (7, 8)) / 256)


def test_vote_decided_by_hand():
    # N = 16, 8 drawn: 8 votes to come.
    assert not vote_decided([5, 2], 8, 16)  # 5 < 2 + 8
    assert vote_decided([11, 1], 12, 16)  # 11 > 1 + 4: nothing can overtake it
    assert not vote_decided([6, 2], 12, 16)  # 6 = 2 + 4: the runner-up could tie, and the tie-break decide
    assert vote_decided([], 16, 16) and vote_decided([3, 3], 16, 16)  # all N drawn: as today
    assert not vote_decided([], 8, 16, confidence=0.9)  # no answer yet: nothing leads
    assert vote_decided([6], 8, 16, confidence=0.95)  # 127/128 >= 0.95
    assert not vote_decided([3, 2], 8, 16, confidence=0.95)
    assert vote_decided([5, 1], 8, 16, confidence=0.9) and not vote_decided([5, 1], 8, 16, confidence=0.95)  # 0.9375


def test_round_boundaries_and_seeds():
    assert VoteRounds(16, 8, 8).boundaries() == [8, 16]
    assert VoteRounds(16, 8, 4).boundaries() == [8, 12, 16]  # the first round holds the M trained samples
    assert VoteRounds(16, 4, 5).boundaries() == [5, 10, 15, 16]
    assert VoteRounds(16, 8, 64).boundaries() == [16]  # one round: today's sampling
    assert round_seed(123, 0) == 123
    seeds = {round_seed(s, r) for s in (123, 124) for r in range(1, 50)}
    assert len(seeds) == 98 and all(0 <= s < 2**63 for s in seeds)


def test_rounds_from_the_config():
    assert VoteRounds.of(load_config(None, ["rollout.n_votes=16"])) is None  # off by default
    rounds = VoteRounds.of(load_config(None, ["rollout.n_votes=16", "rollout.vote_round=4",
                                              "rollout.vote_confidence=0.95"]))
    assert rounds == VoteRounds(n_max=16, min_votes=8, size=4, confidence=0.95)


class CountingSampler(TorchSampler):
    """The built-in engine, recording how many prompts each call sampled."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.calls = []

    def generate(self, model, prompt_ids, s, seeds):
        self.calls.append((len(prompt_ids), s.n))
        return super().generate(model, prompt_ids, s, seeds)


def test_a_prompts_samples_are_its_rounds_whatever_the_batch(tiny):
    """Round r of prompt p comes from round_seed(p's seed, r) alone: the same alone or in a batch,
    and one round of N is exactly today's sampling."""
    model, tok = tiny
    ids = encode_prompts(tok, PROMPTS)
    s = Sampling(n=8, temperature=1.0, top_k=20, max_new_tokens=6)
    rounds = VoteRounds(n_max=8, min_votes=4, size=2)
    batch = sample_in_rounds(TorchSampler(tok), model, ids, s, [11, 12, 13], rounds)
    assert batch.group_sizes == [8, 8, 8]  # a random model has no answers: nothing is decided before N
    alone = sample_in_rounds(TorchSampler(tok), model, ids[1:2], s, [12], rounds)
    assert alone.completion_ids == [batch.completion_ids[i] for i in batch.group(1)]
    drawn = 0
    for r, upto in enumerate(rounds.boundaries()):
        direct = generate(model, tok, ids[2:3], replace(s, n=upto - drawn), seeds=[round_seed(13, r)])
        assert direct.completion_ids == [batch.completion_ids[i] for i in batch.group(2)][drawn:upto]
        assert all(torch.allclose(a, batch.logprobs[i], atol=1e-5)  # batch padding moves the last float bits
                   for a, i in zip(direct.logprobs, batch.group(2)[drawn:upto]))
        drawn = upto
    one_round = sample_in_rounds(TorchSampler(tok), model, ids, s, [11, 12, 13], replace(rounds, size=8))
    assert one_round.completion_ids == generate(model, tok, ids, s, seeds=[11, 12, 13]).completion_ids


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2-135M-Instruct: its answers agree often enough for votes to be decided."""
    return load_model(ModelConfig(), seed=0)


SUMS = [f"What is {a} + {b}? Answer with just the number." for a, b in [(3, 4), (8, 1), (5, 5), (9, 7)]]


def test_decided_prompts_stop_early_and_free_their_rows(smollm2):
    model, tok = smollm2
    ids = encode_prompts(tok, SUMS)
    s = Sampling(n=12, temperature=0.4, top_k=50, max_new_tokens=8)
    seeds = [1, 2, 3, 4]
    sampler = CountingSampler(tok)
    rounds = VoteRounds(n_max=12, min_votes=4, size=4, confidence=0.9)
    early = sample_in_rounds(sampler, model, ids, s, seeds, rounds)
    sizes = early.group_sizes
    assert min(sizes) < 12 and max(sizes) == 12, sizes  # these seeds: some prompts decided, some not
    assert sampler.calls == [(sum(k > b for k in sizes), 4) for b in [0, 4, 8]]  # each round: the undecided only
    for p in range(len(ids)):
        answers = sample_answers([early.texts[i] for i in early.group(p)], [early.truncated[i] for i in early.group(p)])
        for b in rounds.boundaries():
            if b <= sizes[p]:
                decided = vote_decided(majority_vote(answers[:b]).counts, b, 12, 0.9)
                assert decided == (b == sizes[p]), (p, b)
    # Without the confidence test fewer prompts stop, and longer: each prompt's first samples are the same.
    late = sample_in_rounds(TorchSampler(tok), model, ids, s, seeds, replace(rounds, confidence=0.0))
    assert sum(late.group_sizes) > sum(sizes)
    for p in range(len(ids)):
        assert [late.texts[i] for i in late.group(p)][: sizes[p]] == [early.texts[i] for i in early.group(p)]


def test_the_trained_samples_come_from_the_first_round():
    """A prompt that drew more rounds (here 4 + 8 votes) trains on M of its first round only, the
    samples every prompt drew whenever it stopped; without rounds, on any of its votes."""
    import torch

    from ttrl.config import Config
    from ttrl.groups import reward, vote
    from ttrl.rollout import Rollout

    texts = ["7"] * 4 + ["3"] * 8  # first round "7", later rounds "3"
    z = [torch.zeros(1) for _ in texts]
    rollout = Rollout(n=12, prompt_ids=[[1]], completion_ids=[[1]] * 12, logprobs=z, entropy=z, certainty=z,
                      texts=texts, truncated=[False] * 12)
    cfg = Config().reward
    cfg.n_train_samples = 4
    for seed in range(5):
        (g,) = reward(vote(rollout), rollout, cfg, seeds=[seed], first_round=4)
        assert sorted(g.train_idx) == [0, 1, 2, 3] and g.rewards == [0.0] * 4  # "3" won the vote
    drawn = {i for seed in range(5) for i in reward(vote(rollout), rollout, cfg, seeds=[seed])[0].train_idx}
    assert drawn - {0, 1, 2, 3}  # from all twelve

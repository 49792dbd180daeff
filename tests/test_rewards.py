"""Label-free rewards, each against hand-computed values."""

import random
import time

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from ttrl.rewards import lcs_length, majority_rewards, rouge_l, similarity_rewards
from ttrl.voting import majority_vote


def test_majority_rewards_hand_computed():
    vote = majority_vote(["\\frac12", "0.5", "3", "\\dfrac{1}{2}", None])
    assert majority_rewards(vote, [0, 1, 2, 3, 4]) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert majority_rewards(vote, [4, 2, 0]) == [0.0, 0.0, 1.0]  # order of `indices` kept
    assert majority_rewards(vote, []) == []


def test_majority_rewards_without_a_winner_are_zero():
    assert majority_rewards(majority_vote([None, None]), [0, 1]) == [0.0, 0.0]


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; F1 = 2 * 5 / (6 + 5)
    assert abs(rouge_l("The cat sat on the mat.", "the cat on the mat") - 10 / 11) < 1e-12
    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("a b c", "d e f") == 0.0
    assert rouge_l("", "a") == 0.0 and rouge_l("", "") == 0.0


def _lcs_table(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=30), st.lists(st.sampled_from("abcd"), max_size=30))
def test_bit_parallel_lcs_matches_the_textbook_table(a, b):
    assert lcs_length(a, b) == _lcs_table(a, b) == lcs_length(b, a)


def test_similarity_rewards_hand_computed():
    texts = ["a b c d", "a b c e", "a b c d", "x y z"]
    # the medoid is "a b c d" (mean F1 (0.75 + 1 + 0) / 3); rewards are F1 to it
    assert similarity_rewards(texts, [0, 1, 2, 3]) == [1.0, 0.75, 1.0, 0.0]
    assert similarity_rewards(texts, [3, 1]) == [0.0, 0.75]
    assert similarity_rewards(["only one"], [0]) == [1.0]
    assert similarity_rewards(texts, []) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abc"), max_size=6).map(" ".join), min_size=1, max_size=8), st.randoms())
def test_similarity_rewards_are_invariant_to_order_and_bounded(texts, rnd):
    order = list(range(len(texts)))
    rnd.shuffle(order)
    rewards = similarity_rewards(texts, range(len(texts)))
    shuffled = similarity_rewards([texts[i] for i in order], range(len(texts)))
    assert all(0.0 <= r <= 1.0 for r in rewards)
    assert shuffled == [rewards[i] for i in order]


def test_similarity_rewards_for_64_long_texts_are_fast():
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(300)}" for _ in range(1000)) for _ in range(64)]
    start = time.perf_counter()
    rewards = similarity_rewards(texts, range(64))
    assert len(rewards) == 64 and max(rewards) == 1.0  # the medoid itself
    assert time.perf_counter() - start < 10


def test_label_free_reward_zoo_hand_computed():
    from ttrl.rewards import KINDS, label_free_rewards
    from ttrl.voting import majority_vote

    answers = ["4", "4", "5", None]
    vote = majority_vote(answers)
    texts = ["it is 4", "4", "5", "no idea"]
    entropy, certainty = [0.5, 1.0, 2.0, 3.0], [1.5, 1.0, 0.2, 0.1]
    idx = [0, 2, 3]
    assert label_free_rewards("majority", vote, texts, entropy, certainty, idx) == [1.0, 0.0, 0.0]
    assert label_free_rewards("semantic_entropy", vote, texts, entropy, certainty, idx) == [0.5, 0.25, 0.0]
    assert label_free_rewards("neg_entropy", vote, texts, entropy, certainty, idx) == [-0.5, -2.0, -3.0]
    assert label_free_rewards("self_certainty", vote, texts, entropy, certainty, idx) == [1.5, 0.2, 0.1]
    assert len(label_free_rewards("similarity", vote, texts, entropy, certainty, idx)) == 3
    assert set(KINDS) >= {"majority", "similarity", "semantic_entropy", "neg_entropy", "self_certainty"}


def test_similarity_consensus_tie_is_order_invariant_regression():
    # Found by hypothesis: equal mean ROUGE-L summed in another order differed in the last bits.
    from ttrl.rewards import similarity_rewards

    texts = ["", "", "", "a b a a a b", "b", "a a", "a a a b a a"]
    order = [3, 6, 0, 5, 1, 4, 2]
    base = similarity_rewards(texts, range(len(texts)))
    permuted = similarity_rewards([texts[i] for i in order], range(len(texts)))
    assert [permuted[order.index(i)] for i in range(len(texts))] == base


def test_format_control_rewards_any_answer_ignoring_the_vote():
    from ttrl.rewards import label_free_rewards
    from ttrl.voting import majority_vote

    vote = majority_vote(["4", "4", "5", None, "7"])
    assert label_free_rewards("format", vote, ["a"] * 5, [0.0] * 5, [0.0] * 5, [0, 2, 3, 4]) == [1.0, 1.0, 0.0, 1.0]


def test_random_control_is_a_seeded_coin_per_sample():
    from ttrl.rewards import label_free_rewards, random_rewards
    from ttrl.voting import majority_vote

    vote = majority_vote(["1"] * 64)
    r = label_free_rewards("random", vote, ["x"] * 64, [0.0] * 64, [0.0] * 64, list(range(64)), seed=3, random_p=0.25)
    assert set(r) <= {0.0, 1.0} and 8 <= sum(r) <= 26  # ~16 of 64; P(outside) < 1e-3
    assert r == label_free_rewards("random", vote, ["y"] * 64, [1.0] * 64, [0.0] * 64, list(range(64)), seed=3,
                                   random_p=0.25)  # depends on the seed only
    assert random_rewards(64, [5, 9], 0.25, 3) == [r[5], r[9]]  # a sample's coin whichever are rewarded
    assert r != random_rewards(64, list(range(64)), 0.25, 4)
    assert random_rewards(8, range(8), 0.0, 1) == [0.0] * 8 and random_rewards(8, range(8), 1.0, 1) == [1.0] * 8


def test_soft_majority_weights_every_answer_by_its_sharpened_share():
    from ttrl.rewards import label_free_rewards, soft_majority_rewards
    from ttrl.voting import majority_vote

    vote = majority_vote(["4", "4", "4", "4", "5", "5", "6", None])  # classes of 4, 2 and 1 votes
    idx = [0, 4, 6, 7]
    assert soft_majority_rewards(vote, idx, 0.5) == pytest.approx([16 / 21, 4 / 21, 1 / 21, 0.0])  # 4², 2², 1² / 21
    assert soft_majority_rewards(vote, idx, 1.0) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])  # the shares of 7
    z = [0.0] * 8
    semantic = label_free_rewards("semantic_entropy", vote, ["x"] * 8, z, z, idx)
    assert [r * 8 / 7 for r in semantic] == pytest.approx(soft_majority_rewards(vote, idx, 1.0))  # EMPO's, rescaled
    assert soft_majority_rewards(vote, idx, 0.01) == pytest.approx([1.0, 0.0, 0.0, 0.0])  # T -> 0: majority
    assert label_free_rewards("soft_majority", vote, ["x"] * 8, z, z, idx, label_temperature=0.5) == \
        soft_majority_rewards(vote, idx, 0.5)
    assert soft_majority_rewards(majority_vote(["4", "5"]), [0, 1], 0.01) == [0.5, 0.5]  # tied leaders share
    assert soft_majority_rewards(majority_vote([None, None]), [0, 1], 0.5) == [0.0, 0.0]
    assert soft_majority_rewards(majority_vote(["7"] * 64), [0], 1e-3) == [1.0]  # no overflow at tiny T


def test_penalized_majority_penalises_disagreeing_with_a_confident_vote():
    from ttrl.rewards import label_free_rewards
    from ttrl.voting import majority_vote

    vote = majority_vote(["4", "4", "4", "5", "6", None])  # majority ratio 3 / 6 = 0.5
    entropy = [0.1, 0.2, 0.3, 0.9, 0.1, 2.0]  # mean 0.6: "5" was sampled unsurely, "6" surely
    z, idx = [0.0] * 6, list(range(6))

    def rewards(**settings):
        return label_free_rewards("penalized_majority", vote, ["x"] * 6, entropy, z, idx, **settings)

    assert rewards() == [1.0, 1.0, 1.0, -1.0, 0.0, 0.0]  # the unsure dissenter only; no answer: 0
    assert rewards(penalty_entropy_gate=False) == [1.0, 1.0, 1.0, -1.0, -1.0, 0.0]
    assert rewards(penalty=0.5) == [1.0, 1.0, 1.0, -0.5, 0.0, 0.0]
    assert rewards(penalty_min_ratio=0.6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # not confident: majority's reward
    assert label_free_rewards("penalized_majority", majority_vote([None] * 3), ["x"] * 3, [1.0] * 3, [0.0] * 3,
                              [0, 1, 2], penalty_min_ratio=0.0) == [0.0, 0.0, 0.0]

"""Majority vote: hand-computed votes and order-invariance properties."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ttrl.grading import is_equivalent
from ttrl.rewards import majority_rewards
from ttrl.voting import Vote, majority_vote

# Written forms of five values; the real grader judges them (cached after the first example).
FORMS = ["\\frac12", "0.5", "1/2", "\\dfrac{1}{2}", "3", "3.0", "03", "x=3", "(1,2)", "(2,1)", "B", "(B)", "7"]
answers = st.lists(st.one_of(st.none(), st.sampled_from(FORMS)), max_size=40)


def test_hand_computed_vote():
    vote = majority_vote(["\\frac12", "0.5", "3", "\\dfrac{1}{2}", None])
    half = vote.cluster_of[0]
    assert vote.cluster_of == (half, half, vote.cluster_of[2], half, -1) and vote.cluster_of[2] != half
    assert vote.winner == half and vote.counts[half] == 3 and sorted(vote.counts) == [1, 3]
    assert vote.majority_ratio == 3 / 5
    assert vote.pseudo_label == "0.5"  # the three forms appear once each: the shortest represents
    assert is_equivalent(vote.pseudo_label, "\\frac{1}{2}")


def test_representative_is_the_most_frequent_form():
    vote = majority_vote(["0.5", "\\frac12", "\\frac12", "3", "3"])
    assert vote.representatives[vote.winner] == "\\frac12"
    assert vote.counts[vote.winner] == 3 and vote.majority_ratio == 3 / 5


def test_ties_are_broken_by_representative_not_by_order():
    assert majority_vote(["3", "2"]).pseudo_label == "2"
    assert majority_vote(["2", "3"]).pseudo_label == "2"
    assert majority_vote(["10", "9", "9", "10"]).pseudo_label == "9"  # shorter first


def test_no_answer_samples_count_in_the_ratio_but_never_win():
    vote = majority_vote([None, None, None, "5"])
    assert vote.pseudo_label == "5" and vote.majority_ratio == 0.25
    assert vote.cluster_of == (-1, -1, -1, 0)


def test_blank_strings_are_no_answer():
    vote = majority_vote(["", "  ", "4"])
    assert vote.cluster_of == (-1, -1, 0) and vote.pseudo_label == "4"


def test_no_answers_at_all():
    for samples in ([], [None, None]):
        vote = majority_vote(samples)
        assert vote == Vote(None, 0.0, (-1,) * len(samples), (), (), -1)


def test_custom_equivalence_gives_a_plain_counter_vote():
    vote = majority_vote(["0.5", "\\frac12", "\\frac12", "3"], equivalent=str.__eq__)
    assert vote.pseudo_label == "\\frac12" and vote.counts == (2, 1, 1)


@settings(max_examples=150, deadline=None)
@given(answers, st.randoms(use_true_random=False))
def test_vote_is_invariant_to_sample_order(samples, rnd):
    shuffled = samples[:]
    rnd.shuffle(shuffled)
    a, b = majority_vote(samples), majority_vote(shuffled)
    assert a.pseudo_label == b.pseudo_label and a.majority_ratio == b.majority_ratio
    assert sorted(a.counts) == sorted(b.counts)


@settings(max_examples=150, deadline=None)
@given(answers)
def test_vote_invariants(samples):
    vote = majority_vote(samples)
    assert all((c == -1) == (s is None) for c, s in zip(vote.cluster_of, samples))
    assert sum(vote.counts) == sum(s is not None for s in samples)
    assert all(vote.counts[k] == vote.cluster_of.count(k) for k in range(len(vote.counts)))
    if vote.winner >= 0:
        assert vote.counts[vote.winner] == max(vote.counts)
        assert vote.majority_ratio == vote.counts[vote.winner] / len(samples)
        assert vote.pseudo_label == vote.representatives[vote.winner] is not None
    else:
        assert vote.pseudo_label is None and all(s is None for s in samples)
    # each class's members are equivalent to its representative
    for s, k in zip(samples, vote.cluster_of):
        if k >= 0:
            assert s == vote.representatives[k] or is_equivalent(s, vote.representatives[k])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(0, 12).map(str)), max_size=60))
def test_rewards_are_one_exactly_for_the_winning_class(samples):
    same_mod_3 = lambda a, b: int(a) % 3 == int(b) % 3  # noqa: E731 - a cheap non-trivial equivalence
    vote = majority_vote(samples, equivalent=same_mod_3)
    indices = list(range(len(samples)))
    random.Random(0).shuffle(indices)
    rewards = majority_rewards(vote, indices)
    assert set(rewards) <= {0.0, 1.0}
    for i, r in zip(indices, rewards):
        label = vote.pseudo_label
        in_winner = samples[i] is not None and label is not None and same_mod_3(samples[i], label)
        assert r == float(in_winner)
        assert samples[i] is not None or r == 0.0

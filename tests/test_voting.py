"""Majority vote: hand-computed votes and order-invariance properties."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ttrl.grading import is_equivalent
from ttrl.rewards import majority_rewards
from ttrl.voting import Vote, contrastive_vote, majority_vote

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


def test_contrastive_vote_hand_computed():
    """Lift = share here - mean share among the other prompts (voting.contrastive_vote)."""
    votes = [majority_vote(a) for a in (["1"] * 8 + ["7"] * 4 + [None] * 4,   # "1": .5 - (.625+.375)/2 = 0; "7": .25
                                        ["1"] * 10 + [None] * 6,              # "1": .625 - (.5+.375)/2 = .1875
                                        ["1"] * 6 + ["9"] * 6 + [None] * 4)]  # "1": .375 - .5625 < 0; "9": .375
    assert [v.pseudo_label for v in votes] == ["1", "1", "1"]  # plain majority (ties: the shorter)
    elected = contrastive_vote(votes)
    assert [(v.pseudo_label, v.majority_ratio) for v in elected] == [("7", 0.25), ("1", 0.625), ("9", 0.375)]
    assert [v.counts for v in elected] == [v.counts for v in votes]  # only the election changes


def test_contrastive_vote_is_the_majority_where_answers_differ_and_none_where_all_agree():
    differ = [majority_vote(a) for a in (["\\frac12", "0.5", "3"], ["4", "4", "5"], ["x=3", "2"])]
    assert [(v.pseudo_label, v.majority_ratio) for v in contrastive_vote(differ)] == \
        [(v.pseudo_label, v.majority_ratio) for v in differ]
    assert [v.pseudo_label for v in contrastive_vote(differ[1:2])] == ["4"]  # alone: nothing to contrast with
    same = [majority_vote(["1", "1", "2"]), majority_vote(["1", "1", "2"])]  # "2" lifts 0, "1" lifts 0
    assert [(v.pseudo_label, v.winner, v.majority_ratio) for v in contrastive_vote(same)] == [(None, -1, 0.0)] * 2
    assert majority_rewards(contrastive_vote(same)[0], [0, 1, 2]) == [0.0, 0.0, 0.0]


def test_contrast_of_a_share_of_the_prompts_is_that_share_of_the_whole():
    """Each rank re-elects its own prompts against the whole step's votes (trainer: dist.gather)."""
    from ttrl.groups import Group, contrast

    answers = [["1", "1", "7"], ["1", "1", "1"], ["2", "1", None], ["5", "5", "1"]]
    votes = [majority_vote(a) for a in answers]
    whole = contrast([Group(v, a) for v, a in zip(votes, answers)], votes, range(4))
    assert [g.vote.pseudo_label for g in whole] == ["7", "1", "2", "5"]
    share = contrast([Group(v, a) for v, a in zip(votes[2:], answers[2:])], votes, range(2, 4))
    assert [g.vote for g in share] == [g.vote for g in whole[2:]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.sampled_from(["1", "2", "3", "1.0"])), min_size=1, max_size=12),
                min_size=2, max_size=6))
def test_no_answer_is_the_contrastive_label_of_every_prompt(step):
    """An answer's lifts over a step's prompts sum to 0, so none is positive everywhere: the state
    the demo's seed 1 collapsed into (one label for every sum) is never a contrastive label set."""
    elected = [v.pseudo_label for v in contrastive_vote([majority_vote(a) for a in step])]
    assert not (None not in elected and all(is_equivalent(label, elected[0]) for label in elected))

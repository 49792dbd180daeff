from ttrl.batches import Piece, chunks, n_mini_batches, pack, plan, tokens_of


def test_mini_batches_per_rollout_batch():
    assert n_mini_batches(8, 0) == 1  # the default: one optimizer step per rollout batch
    assert n_mini_batches(8, 1) == 8  # the official scripts: one prompt per optimizer step
    assert n_mini_batches(8, 3) == 3
    assert n_mini_batches(2, 8) == 1


def test_chunks_are_consecutive_and_balanced():
    assert chunks([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert chunks([0, 1], 4) == [[0], [1], [], []]


def test_whole_groups_pack_as_before_when_M_divides_the_micro_batch():
    # 3 prompts of 4 trained samples, 8 sequences per micro-batch: two whole groups, then one.
    lengths = [[1, 2, 3, 4]] * 3
    out = pack([0, 1, 2], lengths, [5, 5, 5], max_sequences=8, max_tokens=0)
    assert out == [[Piece(0, (0, 1, 2, 3)), Piece(1, (0, 1, 2, 3))], [Piece(2, (0, 1, 2, 3))]]


def test_a_group_larger_than_the_micro_batch_is_split_into_pieces():
    out = pack([0, 1], [[9, 9, 9], [9, 9, 9]], [2, 2], max_sequences=2, max_tokens=0)
    assert out == [[Piece(0, (0, 1))], [Piece(0, (2,)), Piece(1, (0,))], [Piece(1, (1, 2))]]


def test_token_budget_counts_prompt_and_answer_tokens():
    # prompt 10 tokens; answers 30, 30, 50: budgets of 100 tokens hold 40 + 40, then 60 alone.
    assert pack([0], [[30, 30, 50]], [10], max_sequences=99, max_tokens=100) == [[Piece(0, (0, 1))], [Piece(0, (2,))]]
    # A sequence over the budget on its own still runs (alone).
    assert pack([0], [[500, 1]], [10], max_sequences=99, max_tokens=100) == [[Piece(0, (0,))], [Piece(0, (1,))]]


def test_skipped_prompts_contribute_nothing():
    assert pack([0, 1, 2], [[3], [], [4]], [1, 1, 1], 8, 0) == [[Piece(0, (0,)), Piece(2, (0,))]]


def test_plan_splits_each_rank_share_into_the_same_number_of_mini_batches():
    lengths = [[5, 5], [6], [], [7, 7]]
    shares = [range(0, 2), range(2, 4)]
    p = plan(shares, lengths, [1] * 4, n_mini=2, max_sequences=8, max_tokens=0)
    assert p[0] == [[[Piece(0, (0, 1))]], [[Piece(1, (0,))]]]
    assert p[1] == [[], [[Piece(3, (0, 1))]]]  # prompt 2 is skipped: rank 1 has nothing in mini-batch 0
    assert tokens_of([p[0][0], p[1][0]], lengths) == 10
    assert tokens_of([p[0][1], p[1][1]], lengths) == 6 + 14

from ttrl.batches import Piece, chunks, n_mini_batches, pack, plan, samples_of, tokens_of


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
    out = pack(samples_of([0, 1, 2], lengths), lengths, [5, 5, 5], max_sequences=8, max_tokens=0)
    assert out == [[Piece(0, (0, 1, 2, 3)), Piece(1, (0, 1, 2, 3))], [Piece(2, (0, 1, 2, 3))]]


def test_a_group_larger_than_the_micro_batch_is_split_into_pieces():
    lengths = [[9, 9, 9], [9, 9, 9]]
    out = pack(samples_of([0, 1], lengths), lengths, [2, 2], max_sequences=2, max_tokens=0)
    assert out == [[Piece(0, (0, 1))], [Piece(0, (2,)), Piece(1, (0,))], [Piece(1, (1, 2))]]


def test_token_budget_counts_prompt_and_answer_tokens():
    # prompt 10 tokens; answers 30, 30, 50: budgets of 100 tokens hold 40 + 40, then 60 alone.
    assert pack(samples_of([0], [[30, 30, 50]]), [[30, 30, 50]], [10], max_sequences=99, max_tokens=100) == [[Piece(0, (0, 1))], [Piece(0, (2,))]]
    # A sequence over the budget on its own still runs (alone).
    assert pack(samples_of([0], [[500, 1]]), [[500, 1]], [10], max_sequences=99, max_tokens=100) == [[Piece(0, (0,))], [Piece(0, (1,))]]


def test_skipped_prompts_contribute_nothing():
    assert samples_of([0, 1, 2], [[3], [], [4]]) == [(0, 0), (2, 0)]
    assert pack(samples_of([0, 1, 2], [[3], [], [4]]), [[3], [], [4]], [1, 1, 1], 8, 0) == [[Piece(0, (0,)), Piece(2, (0,))]]


def test_plan_deals_each_mini_batch_out_to_the_ranks():
    lengths = [[5, 5], [6], [], [7, 7]]
    p = plan(2, lengths, [1] * 4, n_mini=2, max_sequences=8, max_tokens=0)
    # mini-batch 0 = prompts 0, 1 (3 samples: 2 to rank 0, 1 to rank 1); 1 = prompts 2 (skipped), 3
    assert p[0] == [[[Piece(0, (0, 1))]], [[Piece(3, (0,))]]]
    assert p[1] == [[[Piece(1, (0,))]], [[Piece(3, (1,))]]]  # prompt 3's samples span the two ranks
    assert tokens_of([p[0][0], p[1][0]], lengths) == 10 + 6
    assert tokens_of([p[0][1], p[1][1]], lengths) == 14


def test_the_optimizer_steps_do_not_depend_on_the_number_of_processes():
    """mini_batch_prompts = 1 (the paper's): 8 prompts give 8 optimizer steps of one prompt each on
    1, 2 or 8 processes, every sample trained on exactly once."""
    lengths = [[3] * 4 for _ in range(8)]
    for world in (1, 2, 4, 8):
        p = plan(world, lengths, [2] * 8, n_mini=n_mini_batches(8, 1), max_sequences=2, max_tokens=0)
        for j in range(8):
            mini = [p[r][j] for r in range(world)]
            trained = sorted((piece.prompt, s) for per_rank in mini for mb in per_rank for piece in mb
                             for s in piece.samples)
            assert trained == [(j, s) for s in range(4)], (world, j)
            assert tokens_of(mini, lengths) == 12
    one = plan(1, lengths, [2] * 8, n_mini=1, max_sequences=8, max_tokens=0)
    assert one == [[pack(samples_of(list(range(8)), lengths), lengths, [2] * 8, 8, 0)]]

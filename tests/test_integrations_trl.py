"""TTRL's reward for TRL's GRPOTrainer: votes on hand-made groups, whole-group checks, gold kept
out of the reward, the multi-process gather, and short GRPOTrainer runs (skipped without trl)."""

import sys

import pytest
import torch

from ttrl.integrations import trl as integration
from ttrl.grading import extract_answer
from ttrl.integrations.trl import GroupingError, MajorityVoteReward, completion_text, group_rows, majority_vote_reward

TINY_ARCH = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2}
PROMPTS = ["What is 1/2?"] * 4 + ["What is 3 + 4?"] * 4
COMPLETIONS = ["\\boxed{\\frac12}", "It is 0.5", "The answer is 1/2.", "no idea",  # 1/2 wins 3 of 4
               "7", "7", "8", "I cannot tell"]                                       # 7 wins 2 of 4
REWARDS = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_rewards_on_hand_made_groups_with_equivalent_forms_and_no_answers():
    assert majority_vote_reward(PROMPTS, COMPLETIONS) == REWARDS
    assert majority_vote_reward.last_metrics == {"ttrl/majority_ratio": (3 / 4 + 2 / 4) / 2, "ttrl/no_answer": 2 / 8}


def test_a_group_without_any_answer_gets_zero_rewards():
    assert majority_vote_reward(["p"] * 3, ["hmm", "", "no"]) == [0.0, 0.0, 0.0]


def test_conversational_completions_vote_like_plain_ones():
    def as_messages(text, i):
        content = text if i % 2 else [{"type": "text", "text": text}]  # both content forms
        return [{"role": "assistant", "content": content}]

    chat_prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [as_messages(c, i) for i, c in enumerate(COMPLETIONS)]
    assert majority_vote_reward(chat_prompts, completions) == REWARDS
    # multi-turn: the last assistant message is the one that answers
    turns = [{"role": "assistant", "content": "5"}, {"role": "tool", "content": "9"},
             {"role": "assistant", "content": "so it is 7"}]
    assert completion_text(turns) == "so it is 7"
    assert completion_text([{"role": "assistant", "content": None}]) == ""
    with pytest.raises(TypeError, match="string or a list of message dicts"):
        completion_text(7)


def test_gold_never_changes_the_reward_and_only_feeds_the_diagnostics():
    golds = ["0.5"] * 4 + ["8"] * 4
    reward = MajorityVoteReward()
    assert reward(PROMPTS, COMPLETIONS, answer=golds) == REWARDS
    # label right for 1/2, wrong for 3 + 4; rewards agree with gold on 4 of 4 and 1 of 4 samples
    assert reward.last_metrics["ttrl/label_accuracy"] == 0.5
    assert reward.last_metrics["ttrl/reward_accuracy"] == 5 / 8
    assert reward.last_metrics["ttrl/rollout_accuracy"] == 4 / 8
    for other in (["7"] * 8, [None] * 8, list(reversed(golds))):
        assert reward(PROMPTS, COMPLETIONS, answer=other) == REWARDS
    assert MajorityVoteReward(gold_column=None)(PROMPTS, COMPLETIONS, answer=golds) == REWARDS


def test_diagnostics_cover_the_labelled_prompts_of_a_partly_labelled_step():
    """A prompt without a gold answer drops out of the gold metrics; the others still count."""
    reward = MajorityVoteReward()
    reward(PROMPTS[:4], COMPLETIONS[:4], answer=["0.5"] * 4)
    alone = {k: v for k, v in reward.last_metrics.items() if k.endswith("_accuracy")}
    reward(PROMPTS, COMPLETIONS, answer=["0.5"] * 4 + [None] * 4)
    assert {k: v for k, v in reward.last_metrics.items() if k.endswith("_accuracy")} == alone
    assert set(alone) == {"ttrl/label_accuracy", "ttrl/reward_accuracy", "ttrl/rollout_accuracy"}
    reward(PROMPTS, COMPLETIONS, answer=[None] * 8)
    assert not any(k.endswith("_accuracy") for k in reward.last_metrics)


def test_logs_through_trls_hooks():
    metrics, extra = {}, {}
    reward = MajorityVoteReward()
    reward(PROMPTS, COMPLETIONS, answer=["1/2"] * 4 + ["7"] * 4, trainer_state=object(),
           log_metric=metrics.__setitem__, log_extra=extra.__setitem__)
    assert metrics["ttrl/label_accuracy"] == 1.0 and metrics["ttrl/majority_ratio"] == 0.625
    assert extra["pseudo_label"] == ["0.5"] * 4 + ["7"] * 4  # a class is named by its most frequent, then shortest form
    assert extra["extracted_answer"][3] is None and extra["extracted_answer"][4] == "7"


def test_group_size_is_inferred_or_checked():
    keys = list("aaaabbbb")
    assert group_rows(keys) == [range(0, 4), range(4, 8)]
    assert group_rows(keys, num_generations=4) == [range(0, 4), range(4, 8)]
    assert group_rows(keys, num_generations=2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # a prompt that is twice in the data fills two adjacent groups
    assert group_rows(list("aaaaaaaabbbb")) == [range(0, 4), range(4, 8), range(8, 12)]
    assert group_rows([]) == []


@pytest.mark.parametrize("keys, size, message", [
    (list("aaaabbb"), 4, "not a whole number of groups of 4"),   # a group cut short
    (list("aaabbbbb"), 4, "rows 0..2 hold 3 completions"),       # misaligned groups
    (list("aabbbbaa"), 4, "rows 0..1 hold 2 completions"),       # a group split in two
    (list("abab"), None, "at least 2 consecutive completions"),   # interleaved prompts
    (list("aabbb"), None, "not a whole number of groups of 2"),  # unequal groups
    (list("aabbbcccdd"), None, "rows 2..4 hold 3"),              # 3 is no multiple of 2
    (list("aaaa"), 1, "at least 2 consecutive completions"),
])
def test_partial_or_misaligned_groups_raise_a_clear_error(keys, size, message):
    with pytest.raises(GroupingError, match=message):
        group_rows(keys, size)


def test_partial_batches_are_refused_not_voted_on():
    with pytest.raises(GroupingError, match="group is partial"):
        MajorityVoteReward(num_generations=4)(PROMPTS[:7], COMPLETIONS[:7])
    with pytest.raises(GroupingError, match="8 prompts but 7 completions"):
        majority_vote_reward(PROMPTS, COMPLETIONS[:7])


def test_a_group_split_across_processes_is_gathered_before_the_vote(monkeypatch):
    """TRL spreads a group over processes (RepeatSampler); each process must return the rewards
    of its own rows from votes over whole groups."""
    import torch.distributed as dist

    prompts = ["p"] * 6 + ["q"] * 6
    texts = ["1", "2", "2", "3", "2", "9", "5", "5", "4", "5", "5", "4"]
    whole = MajorityVoteReward()(prompts, texts)
    assert whole == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    world = 3
    shards = [slice(r * 4, (r + 1) * 4) for r in range(world)]  # "p" spans ranks 0-1, "q" ranks 1-2
    for rank in range(world):
        rows = {r: [(integration.prompt_key(p), extract_answer(t), None)
                    for p, t in zip(prompts[s], texts[s])] for r, s in enumerate(shards)}
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: world)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "all_gather_object", lambda out, local: out.__setitem__(slice(None), rows.values()))
        assert MajorityVoteReward()(prompts[shards[rank]], texts[shards[rank]]) == whole[shards[rank]]


def test_several_processes_without_torch_distributed_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(GroupingError, match="WORLD_SIZE=2 processes but torch.distributed is not initialised"):
        majority_vote_reward(PROMPTS, COMPLETIONS)


def _vote_on_rank(rank, world, init_file, prompts, texts, out_dir):
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shard = slice(rank * 4, (rank + 1) * 4)
    rewards = MajorityVoteReward(num_generations=6)(prompts[shard], texts[shard])
    (out_dir / f"{rank}.json").write_text(json.dumps(rewards))
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_gather_with_real_processes(tmp_path):
    """The same split as above, with three gloo processes instead of a stand-in."""
    import json

    prompts = ["p"] * 6 + ["q"] * 6
    texts = ["1", "2", "2", "3", "2", "9", "5", "5", "4", "5", "5", "4"]
    torch.multiprocessing.spawn(_vote_on_rank, args=(3, tmp_path / "init", prompts, texts, tmp_path), nprocs=3)
    got = [r for rank in range(3) for r in json.loads((tmp_path / f"{rank}.json").read_text())]
    assert got == MajorityVoteReward()(prompts, texts)


def test_without_trl_the_reward_works_and_training_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl now raises ImportError
    assert majority_vote_reward(PROMPTS, COMPLETIONS) == REWARDS
    with pytest.raises(ImportError, match=r"pip install 'ttrl\[trl\]'"):
        integration.require_trl()


# ---------------------------------------------------------------- with TRL's GRPOTrainer


def _grpo_run(tmp_path, reward, steps=2, num_generations=4, prompts_per_step=2):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from ttrl.config import ArithmeticConfig, ModelConfig
    from ttrl.data import arithmetic_problems
    from ttrl.models import load_model

    torch.set_num_threads(2)
    model, tok = load_model(ModelConfig(architecture=TINY_ARCH), seed=0)  # its own: training changes it
    problems = arithmetic_problems(ArithmeticConfig(n=8))
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer}
                                       for p in problems])
    args = trl.GRPOConfig(output_dir=str(tmp_path), num_generations=num_generations, max_steps=steps,
                          per_device_train_batch_size=num_generations * prompts_per_step,
                          max_completion_length=4, learning_rate=1e-3, beta=0.0, logging_steps=1,
                          report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                          activation_checkpointing=False, disable_tqdm=True, seed=0)
    trainer = trl.GRPOTrainer(model=model, processing_class=tok, reward_funcs=[reward], args=args,
                              train_dataset=data)
    trainer.train()
    return trainer


class Spy(MajorityVoteReward):
    """Records each batch TRL hands the reward, to check it always holds whole groups."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = super().__call__(prompts, completions, **kwargs)
        self.calls.append((prompts, completions, kwargs, rewards))
        return rewards


@pytest.mark.slow
def test_grpo_trainer_trains_with_the_reward(tmp_path):
    spy = Spy(num_generations=4)
    trainer = _grpo_run(tmp_path, spy)
    assert trainer.state.global_step == 2 and len(spy.calls) == 2
    for prompts, completions, kwargs, rewards in spy.calls:
        assert len(prompts) == len(completions) == len(rewards) == 8
        assert group_rows([integration.prompt_key(p) for p in prompts], 4)  # whole groups, or it raises
        assert isinstance(completions[0], list) and completions[0][0]["role"] == "assistant"
        assert len(kwargs["answer"]) == 8 and "trainer_state" in kwargs
    logged = trainer.state.log_history[0]
    assert "ttrl/majority_ratio" in logged and "rewards/ttrl_majority_vote/mean" in logged
    assert "ttrl/label_accuracy" in logged  # the dataset's `answer` column reached the diagnostics


def test_grpo_trainer_one_step(tmp_path):
    """A seconds-long check that GRPOTrainer accepts the reward and logs its metrics."""
    trainer = _grpo_run(tmp_path, MajorityVoteReward(), steps=1, num_generations=2, prompts_per_step=2)
    assert trainer.state.global_step == 1
    assert "ttrl/majority_ratio" in trainer.state.log_history[0]


def test_completions_cut_off_at_the_length_limit_have_no_answer():
    # Token ids as TRL passes them: up to and including the first end-of-sequence (id 2). The first
    # completion fills the limit but ended; the last three were cut off mid-number ("... is 1" of
    # "is 17") and would outvote it.
    prompts, texts = ["p"] * 5, ["9", "9", "The sum is 1", "The sum is 1", "The sum is 1"]
    ids = [[5, 5, 5, 2], [5, 2], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert MajorityVoteReward()(prompts, texts, completion_ids=ids) == [0.0, 0.0, 1.0, 1.0, 1.0]
    reward = MajorityVoteReward(max_completion_length=4, eos_token_id=2)
    assert reward(prompts, texts, completion_ids=ids) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_multiple_choice_rows_vote_on_letters():
    reward = MajorityVoteReward()
    options = ["11", "12", "13", "14"]
    completions = ["The answer is (B).", "12", "\\boxed{B}", "A) 11"]
    out = reward(["q"] * 4, completions, choices=[options] * 4, answer=["B"] * 4)
    assert out == [1.0, 1.0, 1.0, 0.0]  # "12" is option B's text
    assert reward.last_metrics["ttrl/label_accuracy"] == 1.0

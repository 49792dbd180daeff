"""TTRL's majority-vote reward for TRL's `GRPOTrainer`, in one line:

    from ttrl.integrations.trl import majority_vote_reward
    GRPOTrainer(model=..., reward_funcs=[majority_vote_reward], args=GRPOConfig(...), train_dataset=...)

How TRL calls a reward function (trl 1.16, `GRPOTrainer._calculate_rewards`): once per
generation batch, on every process, with that process's rows only — `prompts`, `completions`
(strings, or lists of message dicts for conversational data), `completion_ids`, every other
dataset column as a list under its own name, and `trainer_state`, `log_metric`, `log_extra`.
Its `RepeatSampler` lays each prompt's `num_generations` completions out consecutively, but
with several processes a group can straddle two of them; TRL gathers the rewards afterwards
and normalises them per group. A vote must see the whole group, so with several processes the
answers are gathered first, every process votes on the whole batch and returns its own rows.
Groups that are still partial or interleaved raise `GroupingError` instead of a wrong vote.

Only ttrl's grader and vote are used: importing this module does not need trl.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

from ttrl.grading import is_equivalent, sample_answers
from ttrl.rewards import majority_rewards
from ttrl.groups import Group, diagnostics
from ttrl.voting import Vote, majority_vote

EXTRA = "pip install 'ttrl[trl]'"


class GroupingError(ValueError):
    """The batch does not hold each prompt's completions as one whole, consecutive group."""


def completion_text(completion) -> str:
    """The text a completion answers with: a string, or the last assistant message of a
    conversational completion (content as a string or as a list of text blocks)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                return _content_text(message.get("content"))
        return ""
    raise TypeError(f"a completion must be a string or a list of message dicts, got {type(completion).__name__}")


def _content_text(content) -> str:
    if content is None:  # an assistant turn that only calls a tool
        return ""
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if isinstance(block, dict))


def prompt_key(prompt) -> str:
    """A hashable identity for a prompt (a string or a list of message dicts). Objects such as
    images count by type only: a dataset row read twice gives two image objects, one prompt."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True,
                                                                default=lambda o: type(o).__name__)


def group_rows(keys: Sequence[str], num_generations: int | None = None) -> list[range]:
    """Row ranges of each prompt's group of completions, in order.

    With `num_generations`, every block of that many rows must be one prompt. Without it the
    group size is inferred: runs of one prompt must all be multiples of the shortest run (a
    prompt that is twice in the data may fill two adjacent groups). Raises GroupingError.
    """
    n = len(keys)
    if n == 0:
        return []
    runs, start = [], 0
    for i in range(1, n + 1):
        if i == n or keys[i] != keys[start]:
            runs.append((start, i))
            start = i
    size = num_generations or min(b - a for a, b in runs)
    if size < 2:
        raise GroupingError(
            f"a majority vote needs at least 2 consecutive completions of each prompt, but the batch of {n} has "
            f"groups of {size} (runs of one prompt: {_describe(runs)}). Set num_generations (and "
            "num_generations_eval) to 2 or more, and keep TRL's sampler, which repeats each prompt consecutively")
    if n % size:
        raise GroupingError(
            f"{n} completions are not a whole number of groups of {size}: some prompt's group is partial. "
            f"The vote needs all {size} completions of a prompt in one call (runs of one prompt: {_describe(runs)})")
    for a, b in runs:
        if (b - a) % size or a % size:
            raise GroupingError(
                f"rows {a}..{b - 1} hold {b - a} completions of one prompt, but groups are {size} long: a group "
                f"is partial or mixes prompts (runs of one prompt: {_describe(runs)}). Make sure generation_batch_size "
                f"is a multiple of num_generations and completions of a prompt are consecutive")
    return [range(a, a + size) for a in range(0, n, size)]


def _describe(runs: list[tuple[int, int]]) -> str:
    lengths = [b - a for a, b in runs]
    return ", ".join(map(str, lengths[:12])) + (", ..." if len(lengths) > 12 else "")


def vote_groups(answers: Sequence[str | None], groups: Sequence[range],
                equivalent: Callable[[str, str], bool] = is_equivalent) -> tuple[list[float], list[Vote]]:
    """(0/1 reward per row, one vote per group): TTRL's reward on every sample of each group."""
    rewards, votes = [0.0] * len(answers), []
    for rows in groups:
        vote = majority_vote([answers[i] for i in rows], equivalent)
        for i, r in zip(rows, majority_rewards(vote, range(len(rows)))):
            rewards[i] = r
        votes.append(vote)
    return rewards, votes


def _gather(local: list) -> tuple[list, int]:
    """(every process's rows in process order, index of this process's first row).

    The order is TRL's: it gathers the rewards by process and slices
    [rank * len(local), (rank + 1) * len(local)) back out."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        world = os.environ.get("WORLD_SIZE", "1")
        if world != "1":
            raise GroupingError(f"WORLD_SIZE={world} processes but torch.distributed is not initialised, so groups "
                                "that straddle processes cannot be gathered for the vote; launch with accelerate "
                                "or torchrun, which initialise it")
        return local, 0
    if dist.get_world_size() == 1:
        return local, 0
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    sizes = [len(p) for p in parts]
    if len(set(sizes)) != 1:
        raise GroupingError(f"processes hold different numbers of completions ({sizes}); TRL's process slices "
                            "would not line up with the gathered groups")
    return [row for part in parts for row in part], dist.get_rank() * len(local)


class MajorityVoteReward:
    """A TRL reward function: 1.0 for completions whose answer agrees (up to math equivalence)
    with the majority vote of their prompt's group, else 0.0.

    `num_generations`: the expected group size, checked; None infers it from the prompts (works
    for training and for evaluation with `num_generations_eval`). `gold_column`: a dataset column
    with gold answers, used only for the logged `ttrl/label_accuracy`, `ttrl/reward_accuracy` and
    `ttrl/rollout_accuracy` — never for the reward. `max_completion_length` and `eos_token_id`
    (GRPOConfig's and the tokenizer's): a completion that reached the limit without end-of-sequence
    was cut off and has no answer, as in `ttrl train` (see `grading.sample_answers`); without them
    every completion is graded on its text. `choices_column`: a dataset column of multiple-choice
    options (a list of texts per row): those rows vote on option letters (ttrl/choices.py); its gold
    must then be a letter.
    """

    def __init__(self, num_generations: int | None = None, gold_column: str | None = "answer",
                 name: str = "ttrl_majority_vote", max_completion_length: int | None = None,
                 eos_token_id: int | list[int] | None = None, choices_column: str | None = "choices"):
        self.num_generations = num_generations
        self.choices_column = choices_column
        self.gold_column = gold_column
        self.max_completion_length = max_completion_length
        self.eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
        self.__name__ = name  # TRL logs rewards/<name>/mean
        self.last_metrics: dict[str, float] = {}

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None,
                 **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise GroupingError(f"{len(prompts)} prompts but {len(completions)} completions; "
                                "pass one prompt per completion, as TRL does")
        golds = kwargs.get(self.gold_column) if self.gold_column else None
        if golds is None or len(golds) != len(prompts):
            golds = [None] * len(prompts)
        cut = [False] * len(completions)
        if self.max_completion_length and completion_ids is not None:
            cut = [len(ids) >= self.max_completion_length and not (ids and ids[-1] in self.eos) for ids in completion_ids]
        choices = kwargs.get(self.choices_column) if self.choices_column else None
        if choices is not None and len(choices) != len(completions):
            choices = None
        answers = sample_answers([completion_text(c) for c in completions], cut,
                                 [tuple(c) if c else None for c in choices] if choices is not None else None)
        local = [(prompt_key(p), a, None if g is None else str(g)) for p, a, g in zip(prompts, answers, golds)]
        rows, offset = _gather(local)
        keys, answers, golds = (list(column) for column in zip(*rows)) if rows else ([], [], [])
        groups = group_rows(keys, self.num_generations)
        rewards, votes = vote_groups(answers, groups)  # gold is not read before this line
        mine = slice(offset, offset + len(local))
        self.last_metrics = self._metrics(votes, groups, answers, rewards, golds)
        if callable(kwargs.get("log_metric")):
            for name, value in self.last_metrics.items():
                kwargs["log_metric"](name, value)
        if callable(kwargs.get("log_extra")):
            label = [None] * len(rows)
            for vote, group in zip(votes, groups):
                for i in group:
                    label[i] = vote.pseudo_label
            kwargs["log_extra"]("extracted_answer", answers[mine])
            kwargs["log_extra"]("pseudo_label", label[mine])
        return rewards[mine]

    @staticmethod
    def _metrics(votes: list[Vote], groups: list[range], answers: list, rewards: list[float],
                 golds: list[str | None]) -> dict[str, float]:
        if not votes:
            return {}
        out = {"ttrl/majority_ratio": sum(v.majority_ratio for v in votes) / len(votes),
               "ttrl/no_answer": sum(a is None for a in answers) / len(answers)}
        per_group = [Group(vote=v, answers=[answers[i] for i in rows], train_idx=list(range(len(rows))),
                           rewards=[rewards[i] for i in rows], excluded=False) for v, rows in zip(votes, groups)]
        gold_of_group = [golds[rows[0]] for rows in groups]
        for key, value in diagnostics(per_group, gold_of_group).items():
            if value is not None:
                out["ttrl/" + key.split("/", 1)[1]] = value
        return out


majority_vote_reward = MajorityVoteReward()
"""The default instance: group size inferred, gold read from an `answer` column if present."""


def require_trl():
    """Import trl, or fail naming the extra that installs it."""
    try:
        import trl
    except ImportError:
        raise ImportError(f"training with TRL needs the trl package: {EXTRA}") from None
    return trl

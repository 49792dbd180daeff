"""PPO's critic: values read off the right positions, the LoRA split, and a bandit it learns."""

import pytest
import torch

from conftest import TINY_ARCH
from ttrl.advantages import gae, last_token_rewards
from ttrl.config import ModelConfig
from ttrl.critic import ValueModel, load_critic, token_values
from ttrl.losses import value_loss


def _critic(**model) -> ValueModel:
    critic = load_critic(ModelConfig(architecture=TINY_ARCH, **model), seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        torch.nn.init.normal_(critic.head.weight, std=0.5)  # a head that reads the hidden state
    return critic


def test_values_are_those_of_each_answer_prefix_with_the_prompt_run_once():
    """V(s_t) for answer token t is the head on the hidden state of the position before it, as if
    each answer ran alone after its prompt; groups of different sizes share their prompt's cache."""
    critic = _critic().eval()
    prompts = [[1, 2, 3, 4], [5, 6]]
    completions = [[7, 8, 9], [10], [11, 12], [13, 14, 15, 16]]
    with torch.no_grad():
        values, mask = token_values(critic, prompts, completions, pad_id=0, group_size=[3, 1])
        for row, (p, c) in enumerate(zip([0, 0, 0, 1], completions)):
            ids = torch.tensor([prompts[p] + c[:-1]])
            alone = critic(input_ids=ids, attention_mask=torch.ones_like(ids),
                           position_ids=torch.arange(ids.shape[1])[None], n_values=len(c))
            torch.testing.assert_close(values[row, : len(c)], alone[0], atol=1e-5, rtol=0)
    assert torch.equal(mask, torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]))
    assert float(values[mask == 0].abs().sum()) == 0.0
    assert float(values.std()) > 0  # a value per state, not one per answer


def test_the_value_head_stays_float32_under_mixed_precision():
    """model.dtype=bfloat16 runs forwards under autocast; the value head must not follow it."""
    critic = _critic().eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(5)[None]}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        values = critic(**kwargs, n_values=3)
        hidden = critic.backbone(**kwargs).last_hidden_state[:, -3:]
    expected = (hidden.float() @ critic.head.weight.T + critic.head.bias).squeeze(-1)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected, atol=1e-6, rtol=1e-6)


def test_critic_starts_at_zero_and_keeps_no_lm_head():
    critic = load_critic(ModelConfig(architecture=TINY_ARCH), seed=0)
    values, _ = token_values(critic, [[1, 2]], [[3, 4, 5]], pad_id=0)
    assert torch.equal(values, torch.zeros(1, 3))
    assert not any("lm_head" in name for name, _ in critic.named_parameters())


def test_lora_critic_trains_its_own_adapter_and_the_head_only():
    critic = load_critic(ModelConfig(architecture=TINY_ARCH, lora_rank=4), seed=0)
    trained = [name for name, p in critic.named_parameters() if p.requires_grad]
    assert "head.weight" in trained and "head.bias" in trained
    assert all(name.startswith("head.") or "lora_" in name for name in trained), trained
    assert any("lora_" in name for name in trained)


def test_critic_learns_the_expected_reward_of_a_bandit():
    """One prompt, one answer, reward 1 with probability 0.7 (a coin per sample): trained with the
    clipped value loss towards the GAE returns (gamma = lambda = 1: the reward at every token), at a
    decaying learning rate, the critic's value of every state of the answer settles at the expected
    reward, 0.7 (within the noise of the 6,400 coins it saw: their mean is 0.708)."""
    critic = load_critic(ModelConfig(architecture=TINY_ARCH), seed=0)
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t / 5))
    prompt, batch = [[1, 2, 3]], 64
    answers = [[7, 8, 9]] * batch
    coins = torch.Generator().manual_seed(0)
    with torch.no_grad():  # it starts knowing nothing
        assert float(token_values(critic, prompt, answers[:1], 0)[0].abs().sum()) == 0.0
    for _ in range(100):
        with torch.no_grad():
            old, mask = token_values(critic, prompt, answers, 0, group_size=batch)
        rewards = (torch.rand(batch, generator=coins) < 0.7).float()
        _, returns = gae(last_token_rewards(rewards, mask), old, mask)
        values, mask = token_values(critic, prompt, answers, 0, group_size=batch)
        loss, _ = value_loss(values, old, returns, mask, clip=0.5, n_tokens=float(mask.sum()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final, _ = token_values(critic, prompt, answers[:1], 0)
    assert final[0].tolist() == pytest.approx([0.7, 0.7, 0.7], abs=0.03)


def test_explained_variance_by_hand_and_undefined_for_a_unanimous_step():
    from ttrl.critic import StepValues

    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # token mean 2/3, Var(R) = 2/9
    values = torch.tensor([[1.0, 0.5], [0.0, 9.0]])  # R - V over the mask: 0, 0.5, 0 -> Var = 1/18
    s = StepValues(values=values, advantages=returns - values, returns=returns, mask=mask, rows=[[0, 1]]).stats()
    assert s["critic/explained_variance"] == pytest.approx(1 - (1 / 18) / (2 / 9))
    assert s["critic/returns"] == pytest.approx(2 / 3) and s["critic/values"] == pytest.approx(0.5)
    # Every sample agreed: returns 1 everywhere, up to float rounding (0.1 * 10 sums), no variance to explain.
    noisy = torch.full((2, 2), sum([0.1] * 10)) + torch.tensor([[0.0, 1e-9], [0.0, 0.0]])
    s = StepValues(values=values, advantages=noisy - values, returns=noisy, mask=mask, rows=[[0, 1]]).stats()
    assert s["critic/explained_variance"] is None

import pytest
import torch

from ttrl.advantages import (CRITIC_ESTIMATORS, ESTIMATORS, compute_advantages, dr_grpo, gae, grpo,
                             last_token_rewards, reinforce_pp, rloo, whiten)
from ttrl.config import ConfigError, config_from_dict


def test_grpo_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # mean 0.5, unbiased std sqrt(1/3) = 0.57735
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / 0.5773503
    assert torch.allclose(grpo(r), expected, atol=1e-4)


def test_uniform_group_has_zero_advantage():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    for name in ESTIMATORS:
        assert torch.all(compute_advantages(name, r) == 0), name


def test_rloo_leave_one_out_baseline():
    r = torch.tensor([[1.0, 0.0, 0.0]])
    # sample 0: 1 - (0+0)/2 = 1; sample 1: 0 - (1+0)/2 = -0.5
    assert torch.allclose(rloo(r), torch.tensor([[1.0, -0.5, -0.5]]))


def test_dr_grpo_is_centred_not_scaled():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(dr_grpo(r), torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_reinforce_pp_normalises_over_batch():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    a = reinforce_pp(r)
    centred = torch.tensor([[0.5, -0.5], [0.0, 0.0]])
    assert torch.allclose(a, centred / centred.std(), atol=1e-5)


def test_advantages_sum_to_zero_per_group():
    torch.manual_seed(0)
    r = (torch.rand(5, 8) > 0.5).float()
    for name in ("grpo", "dr_grpo", "rloo"):
        assert torch.allclose(compute_advantages(name, r).sum(-1), torch.zeros(5), atol=1e-5), name


def test_config_accepts_every_estimator_and_names_them_when_wrong():
    for name in (*ESTIMATORS, *CRITIC_ESTIMATORS):  # the choices are read from the registries themselves
        assert config_from_dict({"algorithm": {"advantage": name}}).algorithm.advantage == name
    with pytest.raises(ConfigError, match="must be one of " + ", ".join((*ESTIMATORS, "ppo"))):
        config_from_dict({"algorithm": {"advantage": "ppo2"}})
    for key, value in (("gamma", 1.5), ("lam", -0.1), ("critic_lr", 0.0), ("value_clip", 0.0)):
        with pytest.raises(ConfigError, match=f"algorithm.{key}"):
            config_from_dict({"algorithm": {"advantage": "ppo", key: value}})


# --- GAE (PPO) ------------------------------------------------------------------------------------

def test_gae_hand_computed_with_discount_and_lambda():
    # Row 0: 3 tokens, reward 1 at the last. gamma 0.9, lambda 0.8 (gamma * lambda = 0.72):
    #   t=2: delta = 1 + 0.9*0 - 0.7 = 0.3                    A = 0.3
    #   t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03                 A = 0.03 + 0.72*0.3 = 0.246
    #   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04                 A = 0.04 + 0.72*0.246 = 0.21712
    # Row 1: 2 tokens (the third is padding, its value ignored), reward 1 at token 1:
    #   t=1: delta = 1 - 0.4 = 0.6                            A = 0.6
    #   t=0: delta = 0.9*0.4 - 0.2 = 0.16                     A = 0.16 + 0.72*0.6 = 0.592
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = last_token_rewards(torch.tensor([1.0, 1.0]), mask)
    assert torch.equal(rewards, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.21712, 0.246, 0.3], [0.592, 0.6, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.71712, 0.846, 1.0], [0.792, 1.0, 0.0]]), atol=1e-6)


def test_gae_with_gamma_and_lambda_one_is_reward_minus_value():
    """verl's defaults: each token's advantage is the answer's reward minus the value of its state,
    and every token's return is the reward."""
    values = torch.tensor([[0.1, 0.3, 0.2, 0.0], [0.5, 0.25, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae(last_token_rewards(torch.tensor([1.0, 0.0]), mask), values, mask)
    assert torch.allclose(adv, torch.tensor([[0.9, 0.7, 0.8, 1.0], [-0.5, -0.25, 0.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))


def test_gae_with_lambda_zero_is_one_step_td():
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, _ = gae(last_token_rewards(torch.tensor([1.0]), mask), values, mask, gamma=0.9, lam=0.0)
    assert torch.allclose(adv, torch.tensor([[0.9 * 0.6 - 0.5, 0.9 * 0.7 - 0.6, 1 - 0.7]]))


def test_whiten_uses_only_the_masked_tokens():
    # tokens 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    s = (5 / 3) ** 0.5
    expected = torch.tensor([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    assert torch.allclose(whiten(x, mask), expected, atol=1e-6)

import pytest
import torch

from ttrl.advantages import ESTIMATORS, compute_advantages, dr_grpo, grpo, reinforce_pp, rloo
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
    for name in ESTIMATORS:  # the choices are read from the registry itself
        assert config_from_dict({"algorithm": {"advantage": name}}).algorithm.advantage == name
    with pytest.raises(ConfigError, match="must be one of " + ", ".join(ESTIMATORS)):
        config_from_dict({"algorithm": {"advantage": "ppo2"}})

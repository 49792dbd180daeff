import torch

from ttrl.losses import kl_k3, policy_loss, value_loss


def test_on_policy_loss_is_minus_mean_advantage():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.2]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, clip_eps=0.2, n_tokens=3.0)
    # ratio 1 everywhere: per-token -A; token mean over 3 tokens: (-2 -2 +1) / 3
    assert abs(float(loss) - (-3.0 / 3)) < 1e-6
    assert stats["clipfrac"] == 0.0 and abs(stats["approx_kl"]) < 1e-7


def test_gradient_is_advantage_weighted_logprob_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([3.0]), mask, 0.2, n_tokens=2.0)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.5, -1.5]]))


def test_clipping_hand_computed():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    # A > 0: max(-A r, -A clip(r)) -> token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5
    loss, stats = policy_loss(new, old, torch.tensor([1.0]), mask, 0.2, 2.0)
    assert abs(float(loss) - (-1.2 - 0.5) / 2) < 1e-6
    assert stats["clipfrac"] == 0.5
    # A < 0: token 0: max(1.5, 1.2) = 1.5; token 1: max(0.5, 0.8) = 0.8 (clipped)
    loss, stats = policy_loss(new, old, torch.tensor([-1.0]), mask, 0.2, 2.0)
    assert abs(float(loss) - (1.5 + 0.8) / 2) < 1e-6
    assert stats["clipfrac"] == 0.5


def test_clipped_tokens_get_no_gradient():
    new = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = policy_loss(new, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), 0.2, 1.0)
    loss.backward()
    assert float(new.grad.abs().sum()) == 0.0


def test_masked_tokens_do_not_count():
    logp = torch.tensor([[-1.0, 100.0]], requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]), 0.2, 1.0)
    loss.backward()
    assert float(logp.grad[0, 1]) == 0.0


def test_kl_k3_hand_computed_and_nonnegative():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.2]))
    # d = log(0.5) = -0.6931: exp(d) - d - 1 = 0.5 + 0.6931 - 1 = 0.1931
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([0.193147, 0.0]), atol=1e-5)
    x = torch.randn(1000)
    y = torch.randn(1000)
    assert float(kl_k3(x, y).min()) >= 0


def test_token_level_advantages_weight_each_token():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.2]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    per_sample = torch.tensor([2.0, -1.0])
    assert torch.equal(policy_loss(logp, logp, per_sample, mask, 0.2, 3.0)[0],
                       policy_loss(logp, logp, per_sample[:, None].expand(2, 2), mask, 0.2, 3.0)[0])
    # ratio 1: per-token -A over the 3 unmasked tokens: (-1 - 3 + 0.5) / 3; the masked 7 does not count
    loss, _ = policy_loss(logp, logp, torch.tensor([[1.0, 3.0], [-0.5, 7.0]]), mask, 0.2, 3.0)
    assert abs(float(loss) - (-3.5 / 3)) < 1e-6


def test_value_clipping_hand_computed():
    # token 0: V 0.9 moved 0.8 from its old 0.1; clipped to 0.6: max((0.9-1)^2, (0.6-1)^2) = 0.16 (clipped wins)
    # token 1: V 0.2 within 0.5 of 0.1: both terms (0.2-0)^2 = 0.04
    values = torch.tensor([[0.9, 0.2]], requires_grad=True)
    old, returns, mask = torch.tensor([[0.1, 0.1]]), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2)
    loss, stats = value_loss(values, old, returns, mask, clip=0.5, n_tokens=2.0)
    assert abs(float(loss.detach()) - 0.5 * (0.16 + 0.04) / 2) < 1e-6
    assert stats["vf_clipfrac"] == 0.5
    loss.backward()  # the clipped term does not depend on V: no gradient; token 1: 0.5 * 2 * 0.2 / 2
    assert torch.allclose(values.grad, torch.tensor([[0.0, 0.1]]))
    # A value moving towards its target within the clip range is not clipped, and masked tokens do not count.
    loss, stats = value_loss(torch.tensor([[0.5, 50.0]]), old, returns, torch.tensor([[1.0, 0.0]]), 0.5, 1.0)
    assert abs(float(loss) - 0.5 * 0.25) < 1e-6 and stats["vf_clipfrac"] == 0.0

"""The PPO / GRPO arithmetic (trainer/model/rl_losses.py) against values worked out by hand on small tensors."""

import math

import pytest
import torch

from trainer.model import rl_losses as rl


def test_whiten_uses_the_unbiased_variance_over_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    sd = math.sqrt((1.5 ** 2 * 2 + 0.5 ** 2 * 2) / 3)  # mean 2.5, n - 1 = 3
    out = rl.whiten(x, mask)
    torch.testing.assert_close(out[0, :4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / sd)
    torch.testing.assert_close(rl.whiten(x, mask, shift_mean=False)[0, :4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / sd
                               + 2.5)


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_everywhere():
    scores = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = rl.token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.1], [0.0, 1.9, 0.0]]))
    same, zero = rl.token_rewards(scores, logprobs, logprobs, mask, kl_coef=0.1)  # policy = reference: no KL
    assert zero.abs().sum() == 0 and same[0, 2] == 1.0


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # delta = (0.1, 0.1, 0.3); A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * A1
    raw = [0.1 + 0.95 * (0.1 + 0.95 * 0.3), 0.1 + 0.95 * 0.3, 0.3]
    torch.testing.assert_close(returns, torch.tensor([[raw[0] + 0.5, raw[1] + 0.6, raw[2] + 0.7]]))
    mean = sum(raw) / 3
    sd = math.sqrt(sum((a - mean) ** 2 for a in raw) / 2)
    torch.testing.assert_close(advantages, torch.tensor([[(a - mean) / sd for a in raw]]), rtol=1e-5, atol=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    advantages = torch.tensor([[1.0, -1.0, 1.0]])
    loss, clipfrac = rl.policy_loss(logprobs, old, advantages, torch.ones(1, 3), clip=0.2)
    # max(-A r, -A clip(r)): (-1.5 vs -1.2) -> -1.2 clipped; (0.5 vs 0.8) -> 0.8 clipped; (-1.1 vs -1.1) -> -1.1
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.1) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]]), torch.tensor([[2.0, 0.0]])
    loss, clipfrac = rl.value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: V_clipped = 0.7, max((1 - 2)^2, (0.7 - 2)^2) = 1.69; token 1: within the clip, 0
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.0) / 2, abs=1e-6) and clipfrac.item() == 0.5


def test_adaptive_kl_controller_by_hand():
    kl = rl.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    assert kl.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # error 0.5, clipped to 0.2
    assert kl.update(3.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000) * (1 - 0.2 * 256 / 10000))
    assert kl.update(6.0, 256) == pytest.approx(kl.value)  # on target: unchanged


def test_group_advantages_by_hand():
    out = rl.group_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0]), group_size=3)
    torch.testing.assert_close(out, torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]))


def test_entropy_of_a_uniform_and_a_certain_distribution():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rl.entropy_from_logits(logits), torch.tensor([math.log(4), 0.0]), atol=1e-6, rtol=0)


def test_kl_k3_is_zero_where_the_policies_agree_and_matches_its_formula():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    out = rl.kl_k3(logp, ref)
    assert out[0] == 0
    assert out[1] == pytest.approx(math.exp(1.0) - 1.0 - 1)
    assert out[2] == pytest.approx(math.exp(-1.0) + 1.0 - 1)
    # Its mean over samples of pi estimates KL(pi || ref): two-outcome distributions, exact expectation.
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    expected = (p * (p / q).log()).sum()
    assert (p * rl.kl_k3(p.log(), q.log())).sum() == pytest.approx(float(expected), rel=1e-6)


def test_running_moments_merge_batches_exactly():
    values = torch.tensor([3.0, -1.0, 4.0, 1.5, 9.0, 2.0, 6.0])
    moments = rl.RunningMoments()
    for part in (values[:3], values[3:4], values[4:]):
        moments.update(len(part), float(part.sum()), float((part ** 2).sum()))
    assert moments.mean == pytest.approx(float(values.mean()))
    assert moments.std == pytest.approx(float(values.std()), rel=1e-6)  # unbiased, as torch's
    restored = rl.RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.std == moments.std


def test_whiten_from_given_moments_equals_whiten_over_the_tokens():
    values = torch.tensor([[1.0, 2.0, 5.0], [3.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    moments = [float(mask.sum()), float((values * mask).sum()), float((values ** 2 * mask).sum())]
    torch.testing.assert_close(rl.whiten(values, mask, moments=moments) * mask, rl.whiten(values, mask) * mask)

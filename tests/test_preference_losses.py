"""Each preference loss against its paper's formula, written independently here in float64 numpy, on random
log-probabilities; and the values every loss must take when the policy equals the reference (LLaMA-Factory 0.9.5
logs 0.6931 for hinge and ipo too: it computes the sigmoid loss for all three)."""

import math

import numpy as np
import pytest
import torch

from trainer.model.preference_losses import LOSSES, reward_model


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def _random_pairs(n=64, seed=0):
    rng = np.random.default_rng(seed)
    lengths_c, lengths_r = rng.integers(1, 50, n).astype(float), rng.integers(1, 50, n).astype(float)
    # Summed log-probs: negative, roughly per-token -0.3 .. -3.
    pc, pr = -lengths_c * rng.uniform(0.3, 3, n), -lengths_r * rng.uniform(0.3, 3, n)
    rc, rr = pc + rng.normal(0, 2, n), pr + rng.normal(0, 2, n)
    return pc, pr, rc, rr, lengths_c, lengths_r


def _paper(name, pc, pr, rc, rr, lc, lr, beta, eps=0.0, gamma=0.5):
    if name == "sigmoid":  # DPO eq. 7 + conservative label smoothing
        h = beta * ((pc - rc) - (pr - rr))
        return -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
    if name == "hinge":
        return np.maximum(0.0, 1.0 - beta * ((pc - rc) - (pr - rr)))
    if name == "ipo":  # IPO eq. 17, length-normalised log-ratios
        return (((pc - rc) / lc - (pr - rr) / lr) - 1.0 / (2.0 * beta)) ** 2
    if name == "simpo":  # SimPO eq. 6
        return -_log_sigmoid(beta / lc * pc - beta / lr * pr - gamma)
    if name == "orpo":  # ORPO eqs. 6-7: NLL of the chosen + beta * odds-ratio loss, on mean log-probs
        mc, mr = pc / lc, pr / lr
        odds = lambda m: np.exp(m) / (1 - np.exp(m))  # noqa: E731
        return -mc - beta * _log_sigmoid(np.log(odds(mc) / odds(mr)))
    raise KeyError(name)


def _ours(name, pc, pr, rc, rr, lc, lr, beta, eps=0.0, gamma=0.5):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    loss, chosen, rejected = LOSSES[name](t(pc), t(pr), ref_chosen=t(rc), ref_rejected=t(rr), beta=beta,
                                          label_smoothing=eps, gamma=gamma, chosen_tokens=t(lc),
                                          rejected_tokens=t(lr))
    return loss.numpy(), chosen.numpy(), rejected.numpy()


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_each_loss_is_its_papers_formula(name, beta):
    pairs = _random_pairs()
    got, _, _ = _ours(name, *pairs, beta=beta)
    np.testing.assert_allclose(got, _paper(name, *pairs, beta=beta), rtol=1e-10, atol=1e-12)


def test_label_smoothing_and_simpo_gamma_enter_as_in_their_papers():
    pairs = _random_pairs(seed=1)
    np.testing.assert_allclose(_ours("sigmoid", *pairs, beta=0.1, eps=0.2)[0],
                               _paper("sigmoid", *pairs, beta=0.1, eps=0.2), rtol=1e-10)
    np.testing.assert_allclose(_ours("simpo", *pairs, beta=2.0, gamma=1.3)[0],
                               _paper("simpo", *pairs, beta=2.0, gamma=1.3), rtol=1e-10)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_policy_equal_to_reference(beta):
    pc, pr, _, _, lc, lr = _random_pairs(seed=2)
    same = (pc, pr, pc, pr, lc, lr)
    sig, chosen, rejected = _ours("sigmoid", *same, beta=beta)
    np.testing.assert_allclose(sig, math.log(2), rtol=1e-12)
    np.testing.assert_allclose(_ours("sigmoid", *same, beta=beta, eps=0.3)[0], math.log(2), rtol=1e-12)
    np.testing.assert_allclose(_ours("hinge", *same, beta=beta)[0], 1.0, rtol=1e-12)
    np.testing.assert_allclose(_ours("ipo", *same, beta=beta)[0], 1 / (4 * beta ** 2), rtol=1e-12)
    assert not chosen.any() and not rejected.any()


def test_gradients_push_chosen_up_and_rejected_down():
    for name in LOSSES:
        pc = torch.tensor([-20.0], dtype=torch.float64, requires_grad=True)
        pr = torch.tensor([-15.0], dtype=torch.float64, requires_grad=True)
        ref = torch.tensor([-18.0], dtype=torch.float64)
        n = torch.tensor([10.0], dtype=torch.float64)
        loss, _, _ = LOSSES[name](pc, pr, ref_chosen=ref, ref_rejected=ref, beta=0.1, chosen_tokens=n,
                                  rejected_tokens=n)
        loss.sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), name  # descending the loss raises chosen, lowers rejected


def test_reward_model_loss():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = [math.log1p(math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())]
    torch.testing.assert_close(reward_model(chosen, rejected), torch.tensor(expected))

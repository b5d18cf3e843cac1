"""The arithmetic of PPO and GRPO, as pure functions of per-token tensors (the ppo stage's loop calls them).

Shapes: [responses, tokens] with a 0/1 `mask` over each response's real tokens. The formulas are those of
Ziegler et al. 2019 / Ouyang et al. 2022 as TRL's PPO implemented them (per-token KL penalty with the score on the
last token, GAE, clipped policy and value losses, the adaptive KL controller), and DeepSeekMath's GRPO (Shao et al.
2024: advantages normalised within each prompt's group of samples, no value head).
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, moments=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked tokens; shift_mean=False keeps the mean (rewards). `moments`:
    (count, sum, sum of squares) to take the mean and unbiased variance from instead (every process's tokens)."""
    if moments is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        n, total, total_sq = moments
        mean = total / max(n, 1)
        var = max(total_sq - n * mean * mean, 0.0) / max(n - 1, 1)
        mean, var = values.new_tensor(mean), values.new_tensor(var)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl) per token: -kl_coef * (log pi - log pi_ref) at every response token, plus the sequence's score
    at its last token."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(dim=1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95, whitened: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation over each response (Schulman et al. 2016):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V. Advantages are
    whitened over the masked tokens, as TRL does (whitened=False: left to the caller, who whitens over every
    process)."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    returns = advantages + values
    if not whitened:
        return advantages.detach() * mask, returns.detach()
    return whiten(advantages, mask).detach() * mask, returns.detach()


def policy_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, clipped): the clipped surrogate max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old,
    and whether the clipped side won."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(logprobs.dtype)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction): policy_terms averaged over the masked tokens."""
    terms, clipped = policy_terms(logprobs, old_logprobs, advantages, clip)
    return masked_mean(terms, mask), masked_mean(clipped, mask)


def value_terms(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, clipped): 0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -eps,
    eps), and whether the clipped side won."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, bounded = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(plain, bounded), (bounded > plain).to(values.dtype)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction): value_terms averaged over the masked tokens."""
    terms, clipped = value_terms(values, old_values, returns, clip)
    return masked_mean(terms, mask), masked_mean(clipped, mask)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(d) - d - 1, d = log pi_ref - log pi (Schulman's k3, GRPO's KL term):
    non-negative, 0 where the two agree, unbiased for tokens sampled from pi."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the next-token distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


class AdaptiveKLController:
    """Ziegler et al. 2019: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10000):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO: each sample's reward normalised within its prompt's group, (r - mean) / (std + 1e-4) (the sample
    standard deviation); samples of one prompt are consecutive."""
    groups = rewards.view(-1, group_size)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-4)).view(-1)


class RunningMoments:
    """Running mean and standard deviation of every score seen (ppo_score_norm, as TRL's use_score_norm): batches
    merged exactly (Chan et al.), over every process when the caller sums its statistics first."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, count: float, total: float, total_sq: float) -> None:
        """Add a batch given as (count, sum, sum of squares)."""
        if count <= 0:
            return
        mean = total / count
        m2 = max(total_sq - count * mean * mean, 0.0)
        delta, merged = mean - self.mean, self.count + count
        self.mean += delta * count / merged
        self.m2 += m2 + delta * delta * self.count * count / merged
        self.count = merged

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]

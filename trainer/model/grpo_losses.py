"""GRPO's arithmetic as TRL's GRPOTrainer defines it, as pure functions of per-token tensors (the grpo stage composes
them; tests/test_grpo.py checks each against the documented formula).

Shapes: [completions, tokens] with a 0/1 `mask` over each completion's real tokens; advantages one per completion.

- Advantages (DeepSeekMath, Shao et al. 2024; scale_rewards as TRL): r minus its group's mean, divided by the group's
  standard deviation + 1e-4 ("group"), by the whole generation batch's ("batch", PPO Lite), or not at all ("none",
  Dr. GRPO). Standard deviations are the unbiased ones, NaN rewards (a reward function answered None) left out.
- The policy term (PPO's clipped surrogate): w = pi / pi_old per token ("token") or one per completion, the exp of
  the mean log-ratio over its tokens ("sequence", GSPO, Zheng et al. 2025); loss = -min(w A, clip(w, 1 - epsilon,
  1 + epsilon_high) A); `delta` (INTELLECT-2) caps w itself from above first (two-sided clipping).
- The KL to the reference: k3 = exp(ref - logp) - (ref - logp) - 1 per token (Schulman), times w when
  use_bias_correction_kl (DeepSeek-V3.2: the unbiased reverse-KL gradient), added as beta x KL to every token's loss.
- The normalisations (loss_type), written as (loss_sum, items) so that the engine's division by the items of the
  whole accumulated batch (every micro-batch, every process) gives TRL's loss:
    grpo     each completion's mean over its tokens, averaged over completions   items: completions
    bnpo     the micro-batch's token mean, averaged over micro-batches            items: 1 a micro-batch
    dr_grpo  the sum over tokens / (completions x max_completion_length)         items: completions
    dapo     the sum over tokens / the tokens of the whole accumulated batch     items: tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-4  # TRL's: (r - mean) / (std + 1e-4)


def nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """The unbiased standard deviation of the non-NaN values (NaN with fewer than two)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True) if dim is not None else torch.nanmean(values)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(values)).sum()
    squares = torch.nansum((values - mean) ** 2, dim=dim, keepdim=True) if dim is not None else \
        torch.nansum((values - mean) ** 2)
    var = torch.where(count > 1, squares / (count - 1).clamp(min=1), torch.full_like(squares, float("nan")))
    std = var.sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


def combine_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[completions, functions] -> one reward each: the weighted sum of the functions that answered (NaN where
    none did, so that completion stays out of its group's baseline)."""
    rewards = torch.nansum(per_function * weights[None, :], dim=1)
    return torch.where(torch.isnan(per_function).all(dim=1), torch.full_like(rewards, float("nan")), rewards)


def advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
               batch_std: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage of each completion, its group's reward standard deviation). Completions of one prompt are
    consecutive. `batch_std`: the standard deviation over the whole generation batch (every process), for
    scale "batch"; by default these rewards'. A completion without a reward (NaN) gets advantage 0."""
    groups = rewards.view(-1, group_size)
    mean = torch.nanmean(groups, dim=1, keepdim=True)
    group_std = nanstd(groups, dim=1, keepdim=True)
    centred = groups - mean
    if scale == "group":
        centred = centred / (group_std + STD_EPS)
    elif scale == "batch":
        std = nanstd(rewards) if batch_std is None else torch.as_tensor(batch_std, dtype=rewards.dtype)
        centred = centred / (std + STD_EPS)
    elif scale != "none":
        raise ValueError(f"scale_rewards: {scale!r} is not one of group, batch, none")
    return torch.nan_to_num(centred.view(-1), nan=0.0), group_std.expand_as(groups).reshape(-1)


def log_importance_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """log(pi / pi_old): per token [N, T], or per completion [N, 1] as the mean over its tokens (GSPO)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level: {level!r} is not one of token, sequence")


@dataclass
class PolicyTerms:
    loss: torch.Tensor  # [N, T] or [N, 1] (sequence level): -min(w A, clip(w) A)
    weight: torch.Tensor  # w itself (what the KL's bias correction multiplies by)
    ratio: torch.Tensor  # w after delta's cap (what the loss and the clip figures read, as TRL)
    low_clipped: torch.Tensor  # w < 1 - epsilon where A < 0 (the clip bound won)
    high_clipped: torch.Tensor  # w > 1 + epsilon_high where A > 0


def policy_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 epsilon: float = 0.2, epsilon_high: float | None = None, delta: float | None = None,
                 level: str = "token") -> PolicyTerms:
    high = epsilon if epsilon_high is None else epsilon_high
    weight = torch.exp(log_importance_weights(logps, old_logps, mask, level))
    a = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    clipped = torch.clamp(weight, 1 - epsilon, 1 + high)
    ratio = weight if delta is None else torch.clamp(weight, max=delta)
    loss = -torch.minimum(ratio * a, clipped * a)
    return PolicyTerms(loss, weight, ratio, ((ratio < 1 - epsilon) & (a < 0)).to(logps.dtype),
                       ((ratio > 1 + high) & (a > 0)).to(logps.dtype))


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def _sequence_means(masked, mask, max_completion_length):
    return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), _count(mask.shape[0], mask)


def _batch_mean(masked, mask, max_completion_length):
    return masked.sum() / mask.sum().clamp(min=1.0), _count(1, mask)


def _constant_norm(masked, mask, max_completion_length):
    return masked.sum() / max_completion_length, _count(mask.shape[0], mask)


def _token_sum(masked, mask, max_completion_length):
    return masked.sum(), mask.sum()


def _count(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(n), device=like.device)


# loss_type -> (per_token * mask, mask, max_completion_length) -> (loss_sum, items)
NORMALISATIONS = {"grpo": _sequence_means, "bnpo": _batch_mean, "dr_grpo": _constant_norm, "dapo": _token_sum}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_completion_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, items) of one micro-batch for the engine to sum and divide (see the module's table)."""
    if loss_type not in NORMALISATIONS:
        raise ValueError(f"loss_type: {loss_type!r} is not one of {', '.join(NORMALISATIONS)}")
    return NORMALISATIONS[loss_type](per_token * mask, mask, max_completion_length)


def items_of(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """What aggregate counts as items, from the mask alone (counted before the forward pass)."""
    return aggregate(torch.zeros_like(mask), mask, loss_type, 1)[1]


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float,
                      pool: torch.Tensor | None = None) -> torch.Tensor:
    """The tokens whose entropy is at least the `quantile` of the entropies in `pool` (default: these masked tokens;
    the stage passes every process's); top_entropy_quantile rho keeps the top rho, quantile 1 - rho."""
    pool = entropy[mask.bool()].float() if pool is None else pool
    if pool.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(pool, quantile)
    return ((entropy >= threshold) & mask.bool()).to(mask.dtype)

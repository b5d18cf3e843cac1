"""Preference losses: pure functions of per-sequence log-probabilities, each the paper's formula on one screen.

Inputs are per pair (shape [pairs]): the summed log-probabilities of the chosen and rejected answers under the
policy, the same under the reference (when the loss has one), and the answers' token counts (for the losses that
average over length). Each returns (per-pair losses, chosen rewards, rejected rewards); the stage sums the
losses over pairs and names the metrics. LLaMA-Factory's keys and defaults: pref_beta 0.1, pref_loss sigmoid,
dpo_label_smoothing 0 (sigmoid only), simpo_gamma 0.5.

LLaMA-Factory 0.9.5 calls TRL's DPO loss without its loss_type, so its `hinge` and `ipo` silently compute the
sigmoid loss (a first logged loss of 0.6931 for all three); here each name computes its own formula.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
LOSSES: dict[str, LossFn] = {}
NEEDS_REFERENCE = {"sigmoid", "hinge", "ipo"}  # simpo and orpo are reference-free


def register(name: str):
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return wrap


@register("sigmoid")
def sigmoid(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0,
            **_) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7), with conservative DPO's label smoothing eps (Mitchell 2023):
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), h = (pi_c - ref_c) - (pi_r - ref_r)."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, beta * chosen.detach(), beta * rejected.detach()


@register("hinge")
def hinge(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, **_):
    """SLiC-style hinge on the DPO margin (Zhao et al. 2023; TRL's loss_type hinge): max(0, 1 - beta h)."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    loss = torch.relu(1 - beta * (chosen - rejected))
    return loss, beta * chosen.detach(), beta * rejected.detach()


@register("ipo")
def ipo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, chosen_tokens=None,
        rejected_tokens=None, **_):
    """IPO (Azar et al. 2023, eq. 17) on length-averaged log-probs (as TRL): (h - 1 / (2 beta))^2, where
    h = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|."""
    chosen = (policy_chosen - ref_chosen) / chosen_tokens
    rejected = (policy_rejected - ref_rejected) / rejected_tokens
    loss = (chosen - rejected - 1 / (2 * beta)) ** 2
    return loss, beta * chosen.detach(), beta * rejected.detach()


@register("simpo")
def simpo(policy_chosen, policy_rejected, beta: float, gamma: float = 0.5, chosen_tokens=None,
          rejected_tokens=None, **_):
    """SimPO (Meng et al. 2024, eq. 6), reference-free: -log sigma(beta (pi_c / |y_c| - pi_r / |y_r|) - gamma).
    LLaMA-Factory's simpo_gamma is the margin gamma itself (its default 0.5)."""
    chosen, rejected = policy_chosen / chosen_tokens, policy_rejected / rejected_tokens
    loss = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def orpo_terms(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens):
    """ORPO's two terms per pair: the chosen answer's NLL (per token) and the log odds ratio
    log odds(y_c) - log odds(y_r), odds(y) = p / (1 - p) with p the length-averaged likelihood."""
    chosen, rejected = policy_chosen / chosen_tokens, policy_rejected / rejected_tokens
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    return -chosen, log_odds


@register("orpo")
def orpo(policy_chosen, policy_rejected, beta: float, chosen_tokens=None, rejected_tokens=None, **_):
    """ORPO (Hong et al. 2024, eqs. 6-7), reference-free, on length-averaged log-probs: the chosen answer's NLL plus
    beta times the odds-ratio term -log sigma(log odds ratio). Rewards are beta x the length-averaged log-probs
    (as TRL reports them)."""
    nll, log_odds = orpo_terms(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens)
    loss = nll - beta * F.logsigmoid(log_odds)
    return loss, beta * (policy_chosen / chosen_tokens).detach(), beta * (policy_rejected / rejected_tokens).detach()


def reward_model(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """The pairwise reward-model loss (Ouyang et al. 2022, eq. 1): -log sigma(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)

"""dpo and orpo: preference training on pairs (LLaMA-Factory's stage dpo with pref_loss, and stage orpo).

One item of the loss is one pair: its chosen and rejected sequences (each prompt + answer) in the pair layout and
with the reference model of trainer/stages/pairs.py. Log-probabilities come from the chunked loss head (never full
logits), summed per sequence; the losses are the pure functions of trainer/model/preference_losses.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.errors import ConfigError
from trainer.stages.base import StageOutput, register
from trainer.stages.pairs import PolicyOptions, ReferenceStage

PREF_LOSSES = ("sigmoid", "hinge", "ipo", "simpo", "orpo")


@dataclass
class PreferenceOptions(PolicyOptions):
    pref_loss: str = field(default="sigmoid", metadata={"choices": PREF_LOSSES})
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.dpo_label_smoothing and self.pref_loss != "sigmoid":
            raise ConfigError(f"dpo_label_smoothing applies to pref_loss: sigmoid only (as in LLaMA-Factory), not "
                              f"{self.pref_loss}.")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            raise ConfigError(f"dpo_label_smoothing: {self.dpo_label_smoothing} must be in [0, 0.5).")


@dataclass
class OrpoOptions(PreferenceOptions):
    pref_loss: str = field(default="orpo", metadata={"choices": ("orpo",)})


@register
class DPO(ReferenceStage):
    name = "dpo"
    options = PreferenceOptions
    sequence_parallel = "rows"  # per-sequence log-probs: whole rows of token losses (sequence_parallel.WholeRows)

    def __init__(self, config=None, options=None):
        super().__init__(config, options)
        from trainer.model.preference_losses import LOSSES

        self.loss_fn = LOSSES[self.opts.pref_loss]

    def reference_needed(self) -> bool:
        from trainer.model.preference_losses import NEEDS_REFERENCE

        return self.opts.pref_loss in NEEDS_REFERENCE

    def compute(self, wrapper, model, batch: dict) -> StageOutput:
        import torch

        logps, tokens = self._sequence_logps(wrapper, model, batch)
        labelled = tokens.sum()
        chosen, rejected, n_chosen, n_rejected = logps[0::2], logps[1::2], tokens[0::2], tokens[1::2]
        ref_chosen = ref_rejected = None
        reference_passes = 0
        if self.needs_reference:
            ref, reference_passes = self.reference_for(wrapper, model, batch)
            ref = ref.to(logps.device, logps.dtype)
            ref_chosen, ref_rejected = ref[0::2], ref[1::2]
        o = self.opts
        losses, reward_chosen, reward_rejected = self.loss_fn(
            chosen, rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected, beta=o.pref_beta,
            label_smoothing=o.dpo_label_smoothing, gamma=o.simpo_gamma, chosen_tokens=n_chosen.clamp(min=1),
            rejected_tokens=n_rejected.clamp(min=1))
        if o.pref_ftx:  # LLaMA-Factory's pref_ftx: the chosen answer's SFT loss (per token) added to each pair's
            losses = losses + o.pref_ftx * (-chosen / n_chosen.clamp(min=1))
        one = torch.ones_like(losses)
        stats = {"loss": (losses.detach(), one),
                 "rewards/chosen": (reward_chosen, one), "rewards/rejected": (reward_rejected, one),
                 "rewards/accuracies": ((reward_chosen > reward_rejected).to(losses.dtype), one),
                 "rewards/margins": (reward_chosen - reward_rejected, one),
                 "logps/chosen": (chosen.detach(), one), "logps/rejected": (rejected.detach(), one)}
        if o.pref_loss == "orpo":  # TRL's and LLaMA-Factory's names for ORPO's two terms
            from trainer.model.preference_losses import orpo_terms

            nll, log_odds = orpo_terms(chosen.detach(), rejected.detach(), n_chosen.clamp(min=1),
                                       n_rejected.clamp(min=1))
            stats.update({"nll_loss": (nll, one), "log_odds_ratio": (log_odds, one)})
        return StageOutput(loss_sum=losses.sum(), items=one.sum(), stats=self.by_item(stats, batch),
                           head_tokens=labelled, reference_passes=reference_passes)


@register
class ORPO(DPO):
    name = "orpo"
    options = OrpoOptions

"""kto: preference training from unpaired desirable / undesirable examples (LLaMA-Factory's stage kto; Ethayarajh
et al. 2024, KTO).

One item of the loss is one example: a conversation whose last answer is tagged desirable or not (the kto_tag
column). Per example, Δ = log π(y|x) − log π_ref(y|x) of the answer; the reference point z is the mean of the
same log-ratio over mismatched pairs (each prompt with another example's answer), computed without gradient,
summed over every process and clamped at 0. As in the paper and TRL, a desirable example's loss is
w_d (1 − σ(β (Δ − z))) and an undesirable one's w_u (1 − σ(β (z − Δ))); rewards are β Δ.

The mismatched pairs are built by the collator from the batch itself (kto_data.KtoPairs: each example's prompt
with a neighbour's answer; with precompute_ref_log_probs, with its neighbour's in dataset order, fixed ahead so
that the pass before training computes the same pairs). Each example and its mismatched pair go through the model
together, sharing the prompt like a preference pair (pref_prefix_sharing), in the same padding-free forward. The
reference is the pair stages' (trainer/stages/pairs.py): the LoRA base with adapters off, a frozen copy placed
like the policy, or ref_model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from trainer.errors import ConfigError
from trainer.stages.base import StageOutput, register
from trainer.stages.kto_data import KtoPairs  # and the data kind "kto"
from trainer.stages.pairs import PolicyOptions, ReferenceStage

logger = logging.getLogger(__name__)


@dataclass
class KTOOptions(PolicyOptions):
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        for key in ("kto_chosen_weight", "kto_rejected_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: {getattr(self, key)} must be non-negative.")


def kto_losses(delta, kl, desirable, beta: float, chosen_weight: float, rejected_weight: float):
    """Per-example KTO losses from the log-ratios Δ, the reference point z (a scalar) and the tags."""
    import torch

    return torch.where(desirable, chosen_weight * (1 - torch.sigmoid(beta * (delta - kl))),
                       rejected_weight * (1 - torch.sigmoid(beta * (kl - delta))))


@register
class KTO(ReferenceStage):
    name = "kto"
    data_kind = "kto"
    item_name = "examples"
    options = KTOOptions

    @property
    def fixed_partners(self) -> bool:
        """With precomputed reference log-probs, each example's mismatched pair is fixed ahead (its neighbour in
        dataset order, as TRL pairs them), so the pass before training computes exactly the pairs training uses."""
        return self.precomputes

    def __init__(self, config=None, options=None):
        super().__init__(config, options)
        if config is not None:
            t = config.training
            if config.data.packing:
                raise ConfigError("packing: kto keeps one example a row with its mismatched pair; set packing: false "
                                  "(batches are padding-free anyway).")
            for key in ("per_device_train_batch_size", "per_device_eval_batch_size"):
                if getattr(t, key) < 2:  # after forward_batch_size's split: what one forward (and collator) holds
                    raise ConfigError(f"{key}: kto pairs each example's prompt with another example's answer of the "
                                      "same forward pass (its KL reference point); a batch of 1 has none. Set it "
                                      "to 2 or more (TRL refuses 1 too), and forward_batch_size to auto or 2 or "
                                      "more.")
        self._warned_one_kind = False

    def collator(self, pad_token_id: int, padding_free: bool = True):
        from trainer.data.collators import Collator

        return KtoPairs(Collator(pad_token_id, padding_free=padding_free, share_prefix=self.shares_prefix),
                        cutoff_len=self.config.data.cutoff_len if self.config is not None else None)

    def before_training(self, trainer) -> None:
        super().before_training(trainer)
        data = getattr(trainer.train_dataset, "data", None)
        if data is None or "kto_tag" not in data.column_names:
            return
        from trainer.data.processing import column_values

        tags = column_values(data, "kto_tag")
        desirable, undesirable = sum(tags), len(tags) - sum(tags)
        o = self.opts
        ratio = (o.kto_chosen_weight * desirable) / max(o.kto_rejected_weight * undesirable, 1e-12)
        logger.info("kto data: %d desirable and %d undesirable examples.", desirable, undesirable)
        if desirable and undesirable and not 1 <= ratio <= 4 / 3:
            low = o.kto_rejected_weight * undesirable / desirable
            logger.warning("kto_chosen_weight x desirable / (kto_rejected_weight x undesirable) = %.2f; the KTO paper "
                           "recommends 1 to 4/3. With kto_rejected_weight: %g, set kto_chosen_weight between %.3g "
                           "and %.3g.", ratio, o.kto_rejected_weight, low, low * 4 / 3)

    def compute(self, wrapper, model, batch: dict) -> StageOutput:
        import torch

        logps, tokens = self._sequence_logps(wrapper, model, batch)
        ref, reference_passes = self.reference_for(wrapper, model, batch)
        ref = ref.to(logps.device, logps.dtype)
        delta, n_tokens = logps[0::2] - ref[0::2], tokens[0::2]
        mismatched = (logps[1::2] - ref[1::2]).detach()
        valid = batch["kl_valid"].to(delta.dtype)
        totals = torch.stack([(mismatched * valid).sum(), valid.sum()]).double()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(totals)  # every process's mismatched pairs make one reference point
        kl = (totals[0] / totals[1].clamp(min=1)).clamp(min=0).to(delta.dtype)
        desirable = batch["kto_tag"].to(delta.device).bool()
        if not self._warned_one_kind and model.training and (desirable.all() or not desirable.any()):
            self._warned_one_kind = True
            logger.warning("A batch holds only %s examples; it still trains (its loss moves those rewards alone). "
                           "Shuffled data with both kinds in each batch trains KTO as intended.",
                           "desirable" if desirable.all() else "undesirable")
        o = self.opts
        losses = kto_losses(delta, kl, desirable, o.pref_beta, o.kto_chosen_weight, o.kto_rejected_weight)
        if o.pref_ftx:  # LLaMA-Factory's pref_ftx: the desirable answers' SFT loss (per token)
            losses = losses + o.pref_ftx * desirable * (-logps[0::2] / n_tokens.clamp(min=1))
        rewards = (o.pref_beta * delta).detach()
        good, bad, one = desirable.to(delta.dtype), (~desirable).to(delta.dtype), torch.ones_like(delta)
        policy = logps[0::2].detach()
        stats = {"loss": (losses.detach(), one),
                 "rewards/chosen": (rewards * good, good), "rewards/rejected": (rewards * bad, bad),
                 "logps/chosen": (policy * good, good), "logps/rejected": (policy * bad, bad),
                 "kl": (kl.detach().expand_as(delta), one),
                 "count/desirable": (good, None), "count/undesirable": (bad, None)}
        return StageOutput(loss_sum=losses.sum(), items=one.sum(), stats=self.by_item(stats, batch),
                           head_tokens=tokens.sum(), reference_passes=reference_passes)

    def summarize(self, totals: dict) -> dict:
        out = super().summarize(totals)
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

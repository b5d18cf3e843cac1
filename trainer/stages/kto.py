"""kto: preference training from unpaired desirable / undesirable examples (LLaMA-Factory's stage kto; Ethayarajh
et al. 2024, KTO).

One item of the loss is one example: a conversation whose last answer is tagged desirable or not (the kto_tag
column). Per example, Δ = log π(y|x) − log π_ref(y|x) of the answer; the reference point z is the mean of the
same log-ratio over mismatched pairs (each prompt with another example's answer), computed without gradient,
summed over every process and clamped at 0. As in the paper and TRL, a desirable example's loss is
w_d (1 − σ(β (Δ − z))) and an undesirable one's w_u (1 − σ(β (z − Δ))); rewards are β Δ.

Each example's mismatched pair is fixed ahead: its prompt with its dataset neighbour's answer (the data kind's
partners, as TRL and LLaMA-Factory pair them in dataset order). In training, z is the mean over every mismatched
pair of the optimizer step (every micro-batch, every process), computed in before_step, where the engine hands the
stage the step's micro-batches before the first loss: one no-grad pass of the policy (and of the reference, unless
precomputed) over the step's mismatched sequences. So neither the pairs nor z depend on how a step is split into
micro-batches and processes: batch 1 x accumulation 8 trains exactly as 8 x 1. TRL computes z per micro-batch
(gathered over processes), which is the same for a step of one micro-batch. An eval batch's z is its own
mismatched pairs' (over every process), as in TRL. The reference is the pair stages' (trainer/stages/pairs.py): the
LoRA base with adapters off, a frozen copy placed like the policy, or ref_model.
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

    wants_segments = False  # no shared prompts: an example and its mismatched pair run in separate passes
    # Per-sequence log-probs, of the examples and of their mismatched pairs: whole rows of token losses (WholeRows).
    # The reference point's all_reduce then counts each group's pairs N times, in its sum and its count alike.
    sequence_parallel = "rows"

    def __init__(self, config=None, options=None):
        super().__init__(config, options)
        self.shares_prefix = False
        if config is not None and config.data.packing:
            raise ConfigError("packing: kto keeps one example a row with its fixed mismatched pair; set packing: "
                              "false (batches are padding-free anyway).")
        self._warned_one_kind = False
        self._step_kl = None  # the reference point of the optimizer step being trained (before_step)

    def collator(self, pad_token_id: int, padding_free: bool = True):
        from trainer.data.collators import Collator

        return KtoPairs(Collator(pad_token_id, padding_free=padding_free),
                        cutoff_len=self.config.data.cutoff_len if self.config is not None else None)

    def count_items(self, batch: dict):
        return batch["item_lengths"].new_tensor(len(batch["item_lengths"]))  # one example a dataset item

    def reference_rows(self, wrapper, model, batch):
        """The precomputed table's rows: each example's reference log-prob and its mismatched pair's."""
        import torch

        return torch.stack([self.reference_logps(wrapper, model, batch),
                            self.reference_logps(wrapper, model, batch["kl"])], dim=1)

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

    def before_step(self, trainer, batch_samples: list[dict]) -> None:
        """The step's reference point, before its first loss: its mismatched pairs (taken out of the micro-batches,
        which then hold the examples alone) through the policy and the reference, without gradient."""
        import torch

        from trainer.data.collators import BOOKKEEPING

        model = trainer.model
        # In training mode, as training_step sets it (an eval may have just run): the mismatched pairs see the
        # policy as the step's examples do (dropout included, as in TRL's KL forward), and a full run's reference
        # can never silently be the moved policy (reference_logps refuses it in training).
        model.train()
        totals = torch.zeros(2, dtype=torch.float64, device=trainer.args.device)
        with torch.no_grad(), trainer.accelerator.autocast():
            for batch in batch_samples:
                mismatched = trainer._prepare_inputs({k: v for k, v in batch.pop("kl").items() if k not in BOOKKEEPING})
                totals += self._mismatched_totals(trainer.wrapper, model, mismatched).to(totals.device)
        self._step_kl = self._reference_point(totals)
        tags = torch.cat([b["kto_tag"] for b in batch_samples])
        if not self._warned_one_kind and (tags.all() or not tags.any()):
            self._warned_one_kind = True
            logger.warning("An optimizer step holds only %s examples; it still trains (its loss moves those rewards "
                           "alone). Shuffled data with both kinds in each step trains KTO as intended.",
                           "desirable" if tags.all() else "undesirable")

    def _mismatched_totals(self, wrapper, model, mismatched: dict):
        """(sum of the mismatched pairs' log-ratios, how many) of one batch of them. A pair without a trained token
        (a lone example has no partner) is left out."""
        import torch

        logps, tokens = self._sequence_logps(wrapper, model, mismatched)
        ref, _ = self.reference_for(wrapper, model, mismatched)
        valid = (tokens > 0).to(torch.float64)
        return torch.stack([((logps.double() - ref.to(logps.device).double()) * valid).sum(), valid.sum()])

    @staticmethod
    def _reference_point(totals):
        """z: the mean log-ratio of the mismatched pairs of every process, clamped at 0 (as in the paper and TRL)."""
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(totals)  # every process's mismatched pairs make one reference point
        return (totals[0] / totals[1].clamp(min=1)).clamp(min=0)

    def compute(self, wrapper, model, batch: dict) -> StageOutput:
        import torch

        mismatched = batch.pop("kl", None)
        logps, tokens = self._sequence_logps(wrapper, model, batch)
        ref, reference_passes = self.reference_for(wrapper, model, batch)
        delta = logps - ref.to(logps.device, logps.dtype)
        if mismatched is not None:  # an eval batch (no before_step): its own mismatched pairs
            with torch.no_grad():
                kl = self._reference_point(self._mismatched_totals(wrapper, model, mismatched))
        elif self._step_kl is None:
            raise RuntimeError("kto: a training batch without its step's reference point (before_step runs first)")
        else:
            kl = self._step_kl
        kl = kl.to(delta.device, delta.dtype)
        desirable = batch["kto_tag"].to(delta.device).bool()
        o = self.opts
        losses = kto_losses(delta, kl, desirable, o.pref_beta, o.kto_chosen_weight, o.kto_rejected_weight)
        if o.pref_ftx:  # LLaMA-Factory's pref_ftx: the desirable answers' SFT loss (per token)
            losses = losses + o.pref_ftx * desirable * (-logps / tokens.clamp(min=1))
        rewards = (o.pref_beta * delta).detach()
        good, bad, one = desirable.to(delta.dtype), (~desirable).to(delta.dtype), torch.ones_like(delta)
        policy = logps.detach()
        # One example a dataset item (kto never packs): the statistics are per item as they stand.
        stats = {"loss": (losses.detach(), one),
                 "rewards/chosen": (rewards * good, good), "rewards/rejected": (rewards * bad, bad),
                 "logps/chosen": (policy * good, good), "logps/rejected": (policy * bad, bad),
                 "kl": (kl.detach().expand_as(delta), one),
                 "count/desirable": (good, None), "count/undesirable": (bad, None)}
        return StageOutput(loss_sum=losses.sum(), items=one.sum(), stats=stats, head_tokens=tokens.sum(),
                           reference_passes=reference_passes)

    def summarize(self, totals: dict) -> dict:
        out = super().summarize(totals)
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

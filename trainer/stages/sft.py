"""sft and pt: next-token cross-entropy; one item of the loss is one trained token (an assistant reply's
token, or any token of a document)."""

from __future__ import annotations

from trainer.stages.base import Stage, StageOutput, register


class _TokenLM(Stage):
    sequence_parallel = "shard"  # a sum of token losses: each shard adds its own tokens

    def count_items(self, batch: dict):
        from trainer.model.losses import IGNORE_INDEX, shift_targets

        return shift_targets(batch["labels"]).ne(IGNORE_INDEX).sum()

    def compute(self, wrapper, model, batch: dict) -> StageOutput:
        from trainer.data.collators import item_sums

        nll, mask = wrapper.token_nll(model, batch, uniform=True)  # the loss is the plain sum of nll
        sums, counts = item_sums(nll * mask, batch), item_sums(mask.to(nll.dtype), batch)
        return StageOutput(loss_sum=sums.sum(), items=counts.sum(), stats={"loss": (sums, counts)})


@register
class SFT(_TokenLM):
    name = "sft"
    data_kind = "supervised"
    predicts = True


@register
class PT(_TokenLM):
    name = "pt"
    data_kind = "pretrain"
    needs_template = False
    packing_default = True

"""sft and pt: next-token cross-entropy on the trained tokens (assistant replies, or whole documents)."""

from __future__ import annotations

import torch

from trainer.stages.base import Stage, register


class _TokenLM(Stage):
    def row_losses(self, wrapper, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        nll, mask = wrapper.token_nll(model, batch)
        return (nll * mask).sum(dim=1), mask.sum(dim=1)


@register
class SFT(_TokenLM):
    name = "sft"
    data_kind = "supervised"


@register
class PT(_TokenLM):
    name = "pt"
    data_kind = "pretrain"
    needs_template = False

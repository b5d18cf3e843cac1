"""Batches for the model. Packed rows go without an attention_mask (the position_ids restarts keep
examples apart); unpacked rows are right-padded with an attention_mask. Both carry the bookkeeping
the engine needs: the real (non-pad) token count and the sum of squared example lengths (attention
FLOPs), which the engine pops before the forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data.processing import IGNORE_INDEX

BOOKKEEPING = ("real_tokens", "attn_square")


@dataclass
class Collator:
    pad_token_id: int
    packed: bool
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
            mask[b, :n] = 1
            if self.packed:
                positions[b, :n] = torch.tensor(row["position_ids"])
                # The padding tail restarts at 0 too: a segment of its own that attends to nothing real.
                positions[b, n:] = torch.arange(width - n)
        batch = {"input_ids": ids, "labels": labels}
        if self.packed:
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = mask
        batch["real_tokens"] = mask.sum(dim=1)
        batch["attn_square"] = torch.tensor([sum(n * n for n in r["lengths"]) for r in rows], dtype=torch.float64)
        return batch

"""What a stage is: how its examples are tokenized, batched, and turned into a loss.

A stage never owns a training loop, a model loader or packing; those are shared. It answers:
which data kind it reads, whether rows may be packed, and loss(wrapper, model, batch) ->
(sum of per-item losses, number of items), which the engine normalises over the whole batch.
"""

from __future__ import annotations

import torch

from trainer.errors import ConfigError

STAGES: dict[str, "Stage"] = {}


class Stage:
    name: str = ""
    data_kind: str = "supervised"  # what processing.tokenized_dataset builds
    needs_template: bool = True

    def loss(self, wrapper, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = self.row_losses(wrapper, model, batch)
        return sums.sum(), counts.sum()

    def row_losses(self, wrapper, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def register(cls: type[Stage]) -> type[Stage]:
    STAGES[cls.name] = cls()
    return cls


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"stage: {name!r} is not available; implemented: {', '.join(sorted(STAGES))}.")
    return STAGES[name]

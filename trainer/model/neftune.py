"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"), per example.

The paper adds uniform noise of magnitude alpha / sqrt(L * d) to the input embeddings of an example of L tokens
(d: the hidden size). transformers' hook takes L as the row's width: in a padded batch that counts the padding, and
in zerotune's padding-free or packed rows (several examples end to end in one row) it is the sum of all of them,
so every example would get far less noise than the paper's. Here each token takes its own sequence's length, read
from the batch's segment layout (cu_seq_lens, plus the shared prompt of a prefix-shared preference sequence, which
is part of that sequence), or from the attention mask of a padded batch.

Noise goes only into a forward that trains (module in training mode, gradients on): not into a reference model's
pass, ppo's rollouts, kto's no-grad KL pass, or evaluation.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def token_lengths(batch: dict) -> torch.Tensor:
    """Per token [rows, T], the length of the sequence it belongs to."""
    ids = batch["input_ids"]
    if "cu_seq_lens_q" in batch:
        own = batch["cu_seq_lens_q"].diff().to(ids.device, torch.long)
        shared = batch["shared_prefix"].to(ids.device, torch.long) if "shared_prefix" in batch else 0
        return torch.repeat_interleave(own + shared, own, output_size=ids.shape[-1]).view(1, -1)
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1, keepdim=True).expand_as(ids)
    return torch.full_like(ids, ids.shape[-1])


class NEFTune:
    """Holds the noise scale and, while a batch runs, its per-token lengths; a forward hook on the input embeddings
    adds the noise."""

    def __init__(self, embeddings: nn.Module, alpha: float):
        self.alpha = float(alpha)
        self.lengths: torch.Tensor | None = None
        self.handle = embeddings.register_forward_hook(self._hook)
        logger.info("NEFTune: uniform noise of alpha / sqrt(L * d) on the input embeddings (alpha %g), L each "
                    "example's own length (not the packed row's), in training forwards only.", self.alpha)

    @contextlib.contextmanager
    def batch(self, batch: dict):
        self.lengths = token_lengths(batch)
        try:
            yield
        finally:
            self.lengths = None

    def _hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not (module.training and torch.is_grad_enabled()) or self.lengths is None:
            return output
        scale = self.alpha / torch.sqrt(self.lengths.to(output.device, torch.float32) * output.shape[-1])
        noise = torch.empty_like(output, dtype=torch.float32).uniform_(-1, 1) * scale.unsqueeze(-1)
        return output + noise.to(output.dtype)  # padding gets noise too; nothing attends to it

    def remove(self) -> None:
        self.handle.remove()

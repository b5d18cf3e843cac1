"""Token losses that never hold the full [tokens x vocab] logits.

chunked_token_nll runs the output projection and cross-entropy chunk by chunk under activation
checkpointing: the forward keeps only each chunk's per-token loss, and the backward recomputes one
chunk's logits at a time. Peak memory for the head drops from tokens*vocab to chunk*vocab floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax over a large vocabulary needs fp32
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def chunked_token_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """Per-token negative log-likelihood of `targets` (0 where ignored). hidden: [N, H]; targets: [N]."""
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            out.append(checkpoint(_chunk_nll, h, weight, bias, t, use_reentrant=False))
        else:
            out.append(_chunk_nll(h, weight, bias, t))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1]: what position t is trained to predict (last position: nothing)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)

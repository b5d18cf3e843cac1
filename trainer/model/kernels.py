"""Attention and fused kernels: the fastest correct path the machine has, and a log line saying which.

`segment_attention` is registered with transformers as the attention implementation "zerotune_segments".
A packed row holds many examples; full masked attention over the row costs cutoff_len^2 per layer, most
of it on pairs the block-diagonal mask then throws away. This path runs causal SDPA on each example's
own block instead (sum of L_i^2), reading the example boundaries from the position_ids restarts. It
is the pure-torch counterpart of FlashAttention-2 varlen, for CPUs and GPUs without flash-attn.
Right-padded rows (no packing) need no mask either: under a causal mask, real tokens never see the
padding after them, and padded positions carry no label.
"""

from __future__ import annotations

import importlib.util
import logging
import re

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SEGMENTS = "zerotune_segments"


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example: a new one starts wherever the position does not go up by one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[1]
    bounds = []
    for row in starts:
        s = row.nonzero().flatten().tolist()
        bounds.append(list(zip(s, s[1:] + [length])))
    return bounds


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      position_ids=None, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or q_len != kv_len:
        # Generation with a KV cache, or a caller that built its own mask: the standard path.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    if position_ids is None:
        bounds = [[(0, q_len)]] * query.shape[0]
    else:
        if position_ids.shape[0] != query.shape[0]:
            position_ids = position_ids.expand(query.shape[0], -1)
        bounds = segment_bounds(position_ids)
    # unbind/split/cat rather than slice assignment: their backward is one stack/cat per row, where
    # every sliced read or write would allocate and zero a full-size gradient in backward (measured: ~15%
    # of a packed SmolLM2 step went to those zero fills and copies).
    rows = []
    for q_row, k_row, v_row, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), bounds):
        lengths = [e - s for s, e in row]
        pieces = [F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), dropout_p=p,
                                                 is_causal=True, scale=scaling, enable_gqa=gqa)[0].transpose(0, 1)
                  for q, k, v in zip(q_row.split(lengths, 1), k_row.split(lengths, 1), v_row.split(lengths, 1))]
        rows.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0].contiguous())
    return torch.stack(rows), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENTS, segment_attention)


def has_flash_attn() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


LIGER_MIN = (0, 8, 5)  # earlier releases scale reduction="none" gradients by the first token's upstream grad


def liger_available() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return False
    from importlib.metadata import version

    parts = tuple(int(p) for p in re.findall(r"\d+", version("liger-kernel"))[:3])
    if parts < LIGER_MIN:
        logger.warning("liger-kernel %s is older than %s; using zerotune's own kernels.", version("liger-kernel"),
                       ".".join(map(str, LIGER_MIN)))
        return False
    return True


def apply_liger(model_type: str, enabled: bool) -> bool:
    """Patch the model class with Liger's fused kernels (RMSNorm, RoPE, SwiGLU) before it is built.

    Liger's fused linear cross-entropy comes in through the model wrapper's loss head instead (so the
    loss path stays the one every stage uses). Liger needs triton on a CUDA GPU; elsewhere the
    pure-torch path runs and the log says so.
    """
    if not enabled:
        return False
    if not torch.cuda.is_available():
        logger.warning("enable_liger_kernel: true, but there is no CUDA GPU; using the pure-torch kernels.")
        return False
    if not liger_available():
        logger.warning("enable_liger_kernel: true, but liger-kernel >= %s is not installed (pip install "
                       "'zerotune[gpu]'); using the pure-torch kernels.", ".".join(map(str, LIGER_MIN)))
        return False
    from liger_kernel import transformers as liger

    patch = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if patch is None:
        logger.warning("Liger has no kernels for model type %r; using the pure-torch kernels.", model_type)
        return False
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    logger.info("Liger kernels applied to %s (RoPE, RMSNorm, SwiGLU).", model_type)
    return True

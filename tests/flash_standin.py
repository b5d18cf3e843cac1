"""A pure-torch FlashAttention-2, put exactly where transformers looks for flash-attn's functions.

transformers' `_flash_attention_forward` gets `flash_attn_func` / `flash_attn_varlen_func` from
`lazy_import_flash_attention`, which returns its module globals once an implementation is loaded. The
stand-in sets those globals, so the model runs transformers' own FA2 code (its unpadding for padded
batches, its varlen call with the batch's cu_seq_lens) on a machine without CUDA, and records every call.
The arithmetic is plain SDPA per sequence, causal with flash-attn's bottom-right alignment (a query at
row i of a length-Lq block sees keys up to i + Lk - Lq), which is what flash-attn >= 2.1 computes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

CALLS: list[dict] = []


def _attend(q, k, v, causal: bool, scale, bottom_right: bool = True):
    """q [Lq, H, D], k/v [Lk, Hkv, D] -> [Lq, H, D]; flash-attn before 2.1 aligned the causal mask top-left."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mask = None
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq if bottom_right else 0)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=scale)
    return out.transpose(0, 1)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, _bottom_right=True):
    CALLS.append({"fn": "varlen", "cu_seqlens_q": cu_seqlens_q.clone(), "cu_seqlens_k": cu_seqlens_k.clone(),
                  "max_seqlen_q": int(max_seqlen_q), "max_seqlen_k": int(max_seqlen_k)})
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = [_attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], causal, softmax_scale, _bottom_right)
              for i in range(len(cq) - 1)]
    return torch.cat(pieces)


def flash_attn_module(release: str):
    """A stand-in `flash_attn` module of that release, for sys.modules: its varlen function aligns the causal mask
    as that release does (bottom-right from 2.1, top-left before)."""
    import functools
    import importlib.machinery
    import re
    import types

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.__version__ = release
    bottom_right = tuple(int(p) for p in re.findall(r"\d+", release)[:2]) >= (2, 1)
    module.flash_attn_varlen_func = functools.partial(flash_attn_varlen_func, _bottom_right=bottom_right)
    return module


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D]: one sequence a row."""
    CALLS.append({"fn": "dense", "shape": tuple(q.shape)})
    return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])


@contextlib.contextmanager
def installed():
    """transformers' FA2 entry points answer with the stand-in inside this block."""
    from transformers import modeling_flash_attention_utils as fa

    names = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
             "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")
    saved = {n: getattr(fa, n) for n in names}
    fa._loaded_implementation = "flash_attention_2"
    fa._flash_fn, fa._flash_varlen_fn, fa._flash_with_kvcache_fn = flash_attn_func, flash_attn_varlen_func, None
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._lazy_define_process_function(flash_attn_varlen_func)
    fa._process_with_kvcache_kwargs_fn = dict
    CALLS.clear()
    try:
        yield CALLS
    finally:
        for n, v in saved.items():
            setattr(fa, n, v)


def use_flash_attention_2(model) -> None:
    """Switch a loaded model to transformers' FA2 code path (from_pretrained refuses it without CUDA)."""
    model.config._attn_implementation = "flash_attention_2"

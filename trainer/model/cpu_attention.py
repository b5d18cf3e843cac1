"""Causal attention of one segment as a few large matmuls: the CPU's faster path for the lengths sft trains on.

PyTorch's CPU flash-attention kernel walks small tiles and reaches 60-100 GFLOP/s in bf16 on a 2-core AVX512-BF16
EPYC whose matmuls run at ~380; this path runs 1.5-2.2x faster at 64-2048 tokens (python -m benchmarks.attention).
It computes the scores with batched matmuls (oneDNN) and one fused softmax pass, in query chunks of CHUNK rows:
chunk i only multiplies against the keys it can see (bottom-right causal), so the masked half of the matrix is
mostly never computed. Segments of up to KEEP_PROBS_UP_TO keys keep each chunk's probabilities for backward (3-4%
of a LoRA step measured, in-process A/B); longer ones recompute them there, keeping only q, k and v (no L^2 per
head).

The numbers are those of transformers' eager attention in bf16: scores and probabilities rounded to bf16, the
softmax itself in fp32 inside the kernel. The scale is folded into the queries (exact when it is a power of two,
1/8 for head dim 64, 1/sqrt(128) is not: one bf16 rounding of q). GQA reads each key/value head once for its
group of query heads. Used on CPU tensors without dropout (segment_attention decides); CUDA keeps
FlashAttention-2 / SDPA.
"""

from __future__ import annotations

import torch

from trainer.model.losses import compute_dtype

CHUNK = 128  # query rows a piece: scores stay cache-sized, the masked part one diagonal block (128 measured best)
# Segments of up to this many keys keep their probabilities for backward: bf16 chunks of [heads, CHUNK, keys], about
# heads x (keys + CHUNK) bytes a token and layer, at most 9 x 640 = 5.8 KB on SmolLM2, where a layer keeps ~28 KB a
# token anyway (up to +20%; +9% on Llama-3-8B's 32 heads and 229 KB). Longer segments recompute them.
KEEP_PROBS_UP_TO = 512


def fits(query: torch.Tensor, dropout: float) -> bool:
    """bf16 on the CPU without dropout: where this path is measured faster than the flash kernel (in fp32 the
    two run level, so fp32 keeps the kernel). Under bf16 autocast SDPA computes in bf16 whatever the queries are
    (a full fine-tune's fp32 residual stream makes RoPE's output fp32), so this path does too."""
    on_cpu = query.device.type == "cpu"
    return on_cpu and compute_dtype("cpu", query.dtype) == torch.bfloat16 and dropout == 0.0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [H, Lq, D], k/v [Hkv, Lk, D] with Lk >= Lq, causal aligned bottom-right -> [H, Lq, D], computed in the
    inputs' dtype whatever autocast says (the caller casts as autocast would have)."""
    with torch.autocast("cpu", enabled=False):
        return _ChunkedAttention.apply(q, k, v, scale)


def _grouped(x: torch.Tensor, groups: int, a: int, b: int) -> torch.Tensor:
    """Rows a:b of [H, L, D] as [Hkv, groups * (b - a), D]: each key head's query heads stacked for one bmm."""
    h, _, d = x.shape
    return x[:, a:b].reshape(h // groups, groups * (b - a), d)


def _probs(qg: torch.Tensor, k: torch.Tensor, groups: int, rows: int, keys: int) -> torch.Tensor:
    """softmax of the chunk's scores [Hkv, groups * rows, keys]; its last `rows` keys are the diagonal block."""
    s = torch.bmm(qg, k[:, :keys].transpose(1, 2))
    diag = s.view(s.shape[0], groups, rows, keys)[..., keys - rows:]
    diag.add_(_causal_bias(rows, s.dtype, s.device))  # 3x faster than masked_fill_ with a broadcast bool mask
    return torch.softmax(s, dim=-1)


_biases: dict = {}


def _causal_bias(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[n, n]: 0 on and below the diagonal, -inf above (the scores are finite, so adding it masks exactly)."""
    key = (n, dtype, str(device))
    if key not in _biases:
        upper = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)
        _biases[key] = torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(upper, float("-inf"))
    return _biases[key]


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        h, lq, d = q.shape
        groups, offset = h // k.shape[0], k.shape[1] - lq
        qs = q * scale
        out = q.new_empty(h, lq, d)
        keep = any(ctx.needs_input_grad[:3]) and k.shape[1] <= KEEP_PROBS_UP_TO
        ctx.probs = [] if keep else None
        for a in range(0, lq, CHUNK):
            b = min(a + CHUNK, lq)
            p = _probs(_grouped(qs, groups, a, b), k, groups, b - a, offset + b)
            out[:, a:b] = torch.bmm(p, v[:, :offset + b]).view(h, b - a, d)
            if keep:
                ctx.probs.append(p)
        ctx.save_for_backward(qs, k, v)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qs, k, v = ctx.saved_tensors
        h, lq, d = qs.shape
        groups, offset = h // k.shape[0], k.shape[1] - lq
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(qs)
        # Key/value gradients gather over chunks: summed in fp32 (at least), rounded once.
        wide = torch.promote_types(k.dtype, torch.float32)
        dk = torch.zeros(k.shape, dtype=wide, device=k.device)
        dv = torch.zeros(v.shape, dtype=wide, device=v.device)
        for a in range(0, lq, CHUNK):
            b, keys = min(a + CHUNK, lq), offset + min(a + CHUNK, lq)
            qg, go = _grouped(qs, groups, a, b), _grouped(grad_out, groups, a, b)
            p = ctx.probs[a // CHUNK] if ctx.probs is not None else _probs(qg, k, groups, b - a, keys)
            dv[:, :keys] += torch.bmm(p.transpose(1, 2), go)
            ds = torch._softmax_backward_data(torch.bmm(go, v[:, :keys].transpose(1, 2)), p, -1, p.dtype)
            dq[:, a:b] = torch.bmm(ds, k[:, :keys]).view(h, b - a, d)
            dk[:, :keys] += torch.bmm(ds.transpose(1, 2), qg)
        return dq.mul_(ctx.scale), dk.to(k.dtype), dv.to(v.dtype), None

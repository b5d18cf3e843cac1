"""Token losses that never hold the full [tokens x vocab] logits.

`chunked_token_nll` runs the output projection and cross-entropy chunk by chunk, only on the positions
that carry a label (prompt and padding positions cost nothing), and produces the gradients in the same
pass: while a chunk's logits exist, their softmax gives d(nll)/d(logits) = softmax - onehot, which is
turned at once into the gradient for the chunk's hidden states ([chunk x hidden]: small) and, when the
head is trained, summed into the head's weight gradient. Backward then only scales these by the
incoming per-token gradient, so the logits are computed once instead of twice (forward, then again in
a checkpointed backward) and the log-softmax backward pass disappears. Peak memory for the head is
chunk x vocab floats.

The weight gradient can be formed ahead only because sft and pt weight every labelled token the same
(loss = sum / token count): backward checks that, and when a caller weights tokens unequally (the
preference stages) it recomputes the chunks with the real weights instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The matmul dtype autocast would pick (bf16/fp16 under autocast, else the input's): the loss head's, and
    SDPA's for the CPU attention path."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _Workspace:
    """One chunk's logits, allocated once per call and reused by every chunk: fresh multi-hundred-MB
    buffers cost page faults on CPU on every chunk otherwise."""

    def __init__(self, rows: int, weight: torch.Tensor, cdtype: torch.dtype, acc: torch.dtype):
        self.wide = weight.new_empty(rows, weight.shape[0], dtype=acc)
        self.low = None if cdtype == acc else weight.new_empty(rows, weight.shape[0], dtype=cdtype)

    def logits(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """h @ w.T (+ b) in the compute dtype. Without a bias a bf16 chunk stays bf16 here: _nll_'s first pass
        widens it into `wide` as it subtracts the row maximum (one pass over the chunk instead of two; the same
        fp32 values, since widening bf16 is exact). A bias is added in fp32, after widening."""
        n = h.shape[0]
        if self.low is None:
            out = torch.mm(h, w.T, out=self.wide[:n])
        elif b is None:
            return torch.mm(h, w.T, out=self.low[:n])
        else:
            out = self.wide[:n].copy_(torch.mm(h, w.T, out=self.low[:n]))
        return out if b is None else out.add_(b)

    def narrow(self, d_logits: torch.Tensor) -> torch.Tensor:
        """d_logits in the compute dtype, for the gradient matmuls."""
        return d_logits if self.low is None else self.low[:d_logits.shape[0]].copy_(d_logits)


def _nll_(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool, wide: torch.Tensor):
    """(nll, d nll / d logits = softmax - onehot or None) in fp32 (at least), computed in `wide` (the chunk's fp32
    buffer, which may be `logits` itself): no [chunk x vocab] temporaries."""
    rows = torch.arange(len(targets), device=targets.device)
    picked = logits[rows, targets].to(wide.dtype)
    peak, top = logits.max(1)
    # One fused softmax pass, in place in the fp32 buffer (the row is read before it is written, by rows), instead of
    # subtract-max, exp, sum and divide as passes of their own over [chunk x vocab]: a third of the time.
    probs = wide[:len(targets)]
    if probs.data_ptr() != logits.data_ptr():
        probs.copy_(logits)  # bf16 -> fp32 is exact
    torch.ops.aten._softmax.out(probs, 1, False, out=probs)
    # logsumexp = max - log(softmax at the argmax), since that softmax is exp(0) / sum: at least 1/vocab, so it never
    # underflows (log(softmax at the target) would, for targets far below the max), and no host sync is needed.
    nll = peak.to(wide.dtype) - probs[rows, top].log() - picked
    if not want_grad:
        return nll, None
    probs[rows, targets] -= 1
    return nll, probs


class _LinearNLL(torch.autograd.Function):
    """nll[i] = logsumexp(h_i W^T + b) - (h_i W^T + b)[t_i] over rows that all carry a target."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, cdtype, grad_enabled, uniform):
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        acc = torch.promote_types(hidden.dtype, torch.float32)
        w = weight.to(cdtype)
        b = None if bias is None else bias.to(cdtype)
        work = _Workspace(min(chunk_size, len(targets)), weight, cdtype, acc)
        nll = torch.empty(len(targets), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden, dtype=acc) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        for s in range(0, len(targets), chunk_size):
            h, t = hidden[s:s + chunk_size].to(cdtype), targets[s:s + chunk_size]
            nll[s:s + len(t)], d_logits = _nll_(work.logits(h, w, b), t, need_h or need_w or need_b, work.wide)
            if d_logits is None:
                continue
            if need_b:
                grad_b += d_logits.sum(0)
            d_low = work.narrow(d_logits)
            if need_h:
                grad_h[s:s + len(t)] = d_low @ w
            if need_w:
                grad_w += d_low.T @ h
        ctx.chunk_size, ctx.cdtype, ctx.uniform = chunk_size, cdtype, uniform
        ctx.save_for_backward(hidden, weight, bias, targets, grad_h, grad_w, grad_b)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, bias, targets, grad_h, grad_w, grad_b = ctx.saved_tensors
        g = grad_nll.to(torch.promote_types(grad_nll.dtype, torch.float32))
        d_hidden = (grad_h * g.unsqueeze(1)).to(hidden.dtype) if grad_h is not None else None
        d_weight = d_bias = None
        if grad_w is not None or grad_b is not None:
            if ctx.uniform and len(g):
                # The caller's word that every token weighs alike (sft's sum / count), checked on the device: a host
                # read of g.min() == g.max() here would stall the GPU once per micro-batch.
                torch._assert_async(g.min() == g.max(), "chunked_token_nll(uniform=True) got unequal token weights")
            if len(g) and (ctx.uniform or bool(g.min() == g.max())):  # the sums formed ahead hold
                scale = g[0]
                d_weight = None if grad_w is None else (grad_w * scale).to(weight.dtype)
                d_bias = None if grad_b is None else (grad_b * scale).to(bias.dtype)
            else:
                d_weight, d_bias = _weighted_head_grads(hidden, weight, bias, targets, g, ctx.chunk_size, ctx.cdtype,
                                                        grad_w is not None, grad_b is not None)
        return d_hidden, d_weight, d_bias, None, None, None, None, None


def _weighted_head_grads(hidden, weight, bias, targets, g, chunk_size, cdtype, need_w, need_b):
    """Head gradients for per-token weights g, recomputing each chunk's softmax."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    w = weight.to(cdtype)
    b = None if bias is None else bias.to(cdtype)
    work = _Workspace(min(chunk_size, len(targets)), weight, cdtype, acc)
    d_w = torch.zeros_like(weight, dtype=acc) if need_w else None
    d_b = torch.zeros_like(bias, dtype=acc) if need_b else None
    for s in range(0, len(targets), chunk_size):
        h, t = hidden[s:s + chunk_size].to(cdtype), targets[s:s + chunk_size]
        d_logits = _nll_(work.logits(h, w, b), t, True, work.wide)[1].mul_(g[s:s + len(t)].unsqueeze(1))
        if need_b:
            d_b += d_logits.sum(0)
        if need_w:
            d_w += work.narrow(d_logits).T @ h
    return (None if d_w is None else d_w.to(weight.dtype)), (None if d_b is None else d_b.to(bias.dtype))


def chunked_token_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, chunk_size: int = 512, count: int | None = None,
                      uniform: bool = False) -> torch.Tensor:
    """Per-token negative log-likelihood of `targets` (0 where ignored), at least fp32. hidden: [N, H]; targets: [N].

    count: how many targets are not ignored, when the caller knows it on the host (the collator counted it): the
    labelled rows are then found without a device-to-host read. uniform: the caller weights every token alike (the
    loss is a plain sum or mean), so backward need not check that on the host."""
    cdtype = compute_dtype(hidden.device.type, hidden.dtype)
    keep = _kept_rows(targets, count)
    out = hidden.new_zeros(targets.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
    if keep.numel() == 0:
        # Nothing to learn here, but keep the head in the graph: every rank must produce the same gradients.
        return out + 0 * (hidden.sum() + weight.sum() + (0 if bias is None else bias.sum()))
    h = hidden.index_select(0, keep)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly inside
        nll = _LinearNLL.apply(h, weight, bias, targets.index_select(0, keep), chunk_size, cdtype,
                               torch.is_grad_enabled(), uniform)
    return out.index_put((keep,), nll)


def _kept_rows(targets: torch.Tensor, count: int | None) -> torch.Tensor:
    """Indices of the targets that are not ignored. nonzero() must read its result's size back to the host (a GPU
    stall per call); with the count known ahead, nonzero_static does not, and a device-side assert catches a count
    that does not match the targets (a batch changed after the collator counted it)."""
    kept = targets.ne(IGNORE_INDEX)
    if count is None:
        return kept.nonzero().squeeze(1)
    torch._assert_async(kept.sum() == count, "target_count does not match the labels: recount it after changing them")
    return torch.nonzero_static(kept, size=count).squeeze(1)


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1]: what position t is trained to predict (last position: nothing)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


@torch.no_grad()
def chunked_token_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, chunk_size: int = 512) -> torch.Tensor:
    """Entropy of the next-token distribution at each position that has a target (0 elsewhere), chunk by chunk:
    a metric (ppo logs it), so without gradient. hidden: [N, H] (already divided by any temperature)."""
    keep = targets.ne(IGNORE_INDEX).nonzero().squeeze(1)
    out = hidden.new_zeros(targets.shape[0], dtype=torch.float32)
    for start in range(0, keep.numel(), chunk_size):
        rows = keep[start:start + chunk_size]
        logits = F.linear(hidden.index_select(0, rows), weight.to(hidden.dtype),
                          None if bias is None else bias.to(hidden.dtype)).float()
        logp = torch.log_softmax(logits, dim=-1)
        out[rows] = -(logp.exp() * logp).sum(-1)
    return out

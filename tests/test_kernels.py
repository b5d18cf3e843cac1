"""Segment attention (each example's causal block only) equals full attention under the packed block-diagonal
mask, in values and gradients, and a whole model gives the same logits with either path."""

import pytest
import torch
import torch.nn.functional as F

from trainer.model.kernels import segment_attention, segment_bounds


class _Module(torch.nn.Module):
    is_causal = True


def _packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]


def _reference(q, k, v, lengths):
    """Full-row SDPA with an explicit block-diagonal causal mask."""
    t = sum(lengths)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("lengths", [[1, 5, 1, 9], [16], [3, 1, 1, 1, 10], [7, 9]])
def test_segment_attention_matches_masked_attention(lengths):
    torch.manual_seed(0)
    t, h, hkv, d = sum(lengths), 4, 2, 8
    q = torch.randn(1, h, t, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, hkv, t, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, hkv, t, d, dtype=torch.float64, requires_grad=True)
    got, _ = segment_attention(_Module(), q, k, v, None, scaling=d ** -0.5, position_ids=_packed_positions(lengths))
    ref = _reference(q, k, v, lengths)
    torch.testing.assert_close(got, ref)
    grad = torch.randn_like(ref)
    g_got = torch.autograd.grad(got, (q, k, v), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


def test_segment_bounds_with_padding_tail_and_batch():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert segment_bounds(pos) == [[(0, 3), (3, 4), (4, 6), (6, 8)], [(0, 8)]]


def test_model_logits_same_with_segment_attention(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from trainer.model.kernels import SEGMENTS, register

    register()
    torch.manual_seed(0)
    lengths = [5, 1, 12, 30, 1, 15]
    ids = torch.randint(0, 300, (2, sum(lengths)))
    pos = _packed_positions(lengths).expand(2, -1)
    outs = {}
    for impl in ("sdpa", SEGMENTS):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        outs[impl] = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(outs[SEGMENTS], outs["sdpa"], rtol=1e-4, atol=1e-4)

"""The lean RMSNorm and SwiGLU give transformers' own values and gradients, keep less for backward, and are
applied only to modules that compute what they compute."""

import copy

import pytest
import torch
from torch import nn

from trainer.model.lean_ops import apply_lean_ops


def _tiny_llama(hidden=32, layers=2, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).to(dtype)
    for p in model.parameters():  # random norm weights, so a wrong weight gradient cannot hide behind ones
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    return model


def _run(model, ids, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, use_cache=False).logits
    loss = logits.float().logsumexp(-1).mean() - logits.float()[..., 3].mean()
    loss.backward()
    return logits.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                     if p.grad is not None}


def test_fp32_values_and_gradients_match_transformers():
    ref = _tiny_llama()
    lean = copy.deepcopy(ref)
    assert sorted(apply_lean_ops(lean)) == ["LlamaMLP", "LlamaRMSNorm"]
    ids = torch.randint(0, 64, (2, 17))
    out_ref, g_ref = _run(ref, ids)
    out_lean, g_lean = _run(lean, ids)
    torch.testing.assert_close(out_lean, out_ref, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g_lean[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_weights_under_autocast_stay_within_bf16_rounding():
    """The LoRA layout: frozen bf16 weights, bf16 activations. The lean ops round less often than the
    original, so compare both against an fp32 run of the same weights."""
    ref = _tiny_llama(dtype=torch.bfloat16)
    lean = copy.deepcopy(ref)
    apply_lean_ops(lean)
    exact = copy.deepcopy(ref).float()
    ids = torch.randint(0, 64, (2, 33))
    out_exact, g_exact = _run(exact, ids)
    out_ref, g_ref = _run(ref, ids, autocast=True)
    out_lean, g_lean = _run(lean, ids, autocast=True)
    err = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert err(out_lean, out_exact) <= 1.5 * err(out_ref, out_exact) + 1e-3
    for name in g_exact:
        assert err(g_lean[name], g_exact[name]) <= 1.5 * err(g_ref[name], g_exact[name]) + 1e-3, name


def _saved_bytes(model, ids):
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, use_cache=False)
    return sum(storages.values())


def test_keeps_less_for_backward():
    ref = _tiny_llama(hidden=64, dtype=torch.bfloat16)
    for p in ref.model.layers.parameters():  # frozen bf16 weights, as under LoRA; the activations still need grads
        p.requires_grad_(False)
    lean = copy.deepcopy(ref)
    apply_lean_ops(lean)
    ids = torch.randint(0, 64, (1, 256))
    before, after = _saved_bytes(ref, ids), _saved_bytes(lean, ids)
    # Per layer and token the original keeps an fp32 copy of each norm's input where the lean norm keeps the bf16
    # input (2 norms x 64 x 2 bytes less), and silu(gate) (192 x 2 bytes) that the lean MLP recomputes.
    assert before - after >= 2 * 256 * (2 * 64 * 2 + 192 * 2), (before, after)


class _GemmaLikeRMSNorm(nn.Module):
    """(1 + weight) scaling: the same attributes as Llama's norm, another formula."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return x * (1 + self.weight)


class _GeluMLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(width, 8), nn.Linear(width, 8), nn.Linear(8, width)
        self.act_fn = nn.GELU()

    def forward(self, x):  # the attributes of a SwiGLU MLP, another activation
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("module", [_GemmaLikeRMSNorm(16), _GeluMLP(16)])
def test_modules_that_compute_something_else_are_left_alone(module):
    forward = module.forward
    assert apply_lean_ops(nn.Sequential(module)) == []
    assert module.forward == forward


def test_lora_input_cast_skipped_under_autocast_only():
    """Under autocast the adapters see the same bf16 input either way (so identical values and gradients) but no
    fp32 copy is kept; without autocast PEFT's cast still runs, so a bf16 base with fp32 adapters works."""
    from peft import LoraConfig, get_peft_model

    from trainer.model.lean_ops import lean_lora_inputs

    def build():
        model = get_peft_model(_tiny_llama(hidden=64, dtype=torch.bfloat16),
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return model

    ref, lean = build(), build()
    assert lean_lora_inputs(lean) == 14  # 7 linear layers x 2 decoder layers
    ids = torch.randint(0, 64, (1, 256))
    out_ref, g_ref = _run(ref, ids, autocast=True)
    out_lean, g_lean = _run(lean, ids, autocast=True)
    torch.testing.assert_close(out_lean, out_ref, rtol=0, atol=0)
    for name, grad in g_ref.items():
        torch.testing.assert_close(g_lean[name], grad, rtol=1e-6, atol=1e-8, msg=name)
    assert _saved_bytes(lean.get_base_model(), ids) < _saved_bytes(ref.get_base_model(), ids)
    with torch.no_grad():  # no autocast: PEFT's cast to the adapters' fp32 still applies
        assert torch.isfinite(lean(input_ids=ids[:, :8], use_cache=False).logits).all()


def _lora_pair(dropout=0.0):
    from peft import LoraConfig, get_peft_model

    def build():
        model = get_peft_model(_tiny_llama(hidden=64, dtype=torch.bfloat16),
                               LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules="all-linear",
                                          init_lora_weights=False))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return model

    return build(), build()


def test_fused_lora_forward_follows_peft_to_bf16_rounding():
    """base + s * B(A(x)) as one addmm (scale folded into B, the sum into the accumulator). One adapted layer under
    autocast: output and the x / A / B gradients no further from a float64 computation than PEFT's own forward (and
    within bf16 rounding of it); without autocast, or with the adapter disabled, PEFT's forward runs as it is."""
    from peft import LoraConfig, get_peft_model

    from trainer.model.lean_ops import fuse_lora_forward

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(96, 160, bias=False).to(torch.bfloat16))
        model = get_peft_model(net, LoraConfig(r=4, lora_alpha=12, target_modules=["0"], init_lora_weights=False))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return model

    ref, fused = build(), build()
    assert fuse_lora_forward(fused) == 1
    x = torch.randn(300, 96)
    grad = torch.randn(300, 160)

    def run(model, dtype=torch.bfloat16, autocast=True):
        inp = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(inp)
        out.backward(grad.to(out.dtype))
        trained = [p.grad for p in model.parameters() if p.requires_grad]
        return [t.double() for t in (out, inp.grad, *trained)]

    exact = copy.deepcopy(ref).double()
    got, peft, truth = run(fused), run(ref), run(exact, torch.float64, autocast=False)
    assert not torch.equal(got[0], peft[0])  # the fused path ran: its single rounding differs somewhere
    for g, p, t in zip(got, peft, truth):
        scale = t.abs().max()
        assert (g - t).abs().max() <= 1.5 * (p - t).abs().max() + 1e-3 * scale
        torch.testing.assert_close(g, p, rtol=0, atol=0.02 * scale.item())
    with torch.no_grad():
        inp = x.bfloat16()
        torch.testing.assert_close(fused(inp), ref(inp), rtol=0, atol=0)
        with fused.disable_adapter(), ref.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fused(inp), ref(inp), rtol=0, atol=0)


def test_fused_lora_forward_leaves_dropout_to_peft():
    from trainer.model.lean_ops import fuse_lora_forward

    ref, fused = _lora_pair(dropout=0.5)
    fuse_lora_forward(fused)
    ids = torch.randint(0, 64, (1, 32))
    for model in (ref, fused):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.train()
            model.logits_ = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(fused.logits_, ref.logits_, rtol=0, atol=0)


def _rotary_inputs(dtype, table_dtype, tokens=37):
    """q, k as transformers makes them (a transposed view of the projection), GQA, and a real RoPE table."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, tokens, 6, 16, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, tokens, 2, 16, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    angles = torch.arange(tokens).float()[:, None] * (10000 ** (-torch.arange(8) / 8))[None]
    angles = torch.cat([angles, angles], -1).expand(2, tokens, 16)
    return q, k, angles.cos().to(table_dtype), angles.sin().to(table_dtype)


def _rotary_run(fn, q, k, cos, sin):
    q.grad = k.grad = None
    out_q, out_k = fn(q, k, cos, sin)
    g = torch.Generator().manual_seed(5)
    (out_q * torch.randn(out_q.shape, generator=g).to(out_q.dtype)).sum().backward(retain_graph=True)
    (out_k * torch.randn(out_k.shape, generator=g).to(out_k.dtype)).sum().backward()
    return out_q.detach(), out_k.detach(), q.grad.clone(), k.grad.clone()


@pytest.mark.parametrize("dtype,table_dtype", [(torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
def test_lean_rotary_values_and_gradients(dtype, table_dtype):
    """Exact in float64; in bf16 (LoRA) and bf16 queries with an fp32 table (a full fine-tune under autocast) the
    same dtypes as transformers' and errors against float64 no larger (it rounds once less)."""
    from transformers.models.llama import modeling_llama

    from trainer.model.lean_ops import _lean_rotary

    original = getattr(modeling_llama.apply_rotary_pos_emb, "zerotune_original", modeling_llama.apply_rotary_pos_emb)
    lean = _lean_rotary(original)
    q, k, cos, sin = _rotary_inputs(dtype, table_dtype)
    ours, theirs = _rotary_run(lean, q, k, cos, sin), _rotary_run(original, q, k, cos, sin)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    exact = _rotary_run(original, q64, k64, cos.double(), sin.double())
    for a, b, e in zip(ours, theirs, exact):
        assert a.dtype == b.dtype and a.shape == b.shape
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        else:
            assert (a.double() - e).abs().max() <= (b.double() - e).abs().max()


def test_lean_rotary_swaps_only_a_matching_function(monkeypatch):
    """A Llama's modeling module gets the lean function (the model's output unchanged, fp32); a module whose
    function computes something else keeps it."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    from trainer.model import lean_ops

    original = getattr(modeling_llama.apply_rotary_pos_emb, "zerotune_original", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 12))
    before = _run(model, ids)
    assert lean_ops.lean_rotary(model) == ["transformers.models.llama.modeling_llama"]
    assert modeling_llama.apply_rotary_pos_emb.zerotune_original is original
    after = _run(model, ids)
    torch.testing.assert_close(after[0], before[0], rtol=1e-6, atol=1e-6)
    for name in before[1]:
        torch.testing.assert_close(after[1][name], before[1][name], rtol=1e-5, atol=1e-6, msg=name)

    other = types.ModuleType("zerotune_test_other_rotary")
    other.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: (q * cos.unsqueeze(1), k * cos.unsqueeze(1))
    monkeypatch.setitem(sys.modules, other.__name__, other)
    odd = type("OddAttention", (nn.Module,), {"__module__": other.__name__})()
    assert lean_ops.lean_rotary(nn.Sequential(odd)) == []
    assert not hasattr(other.apply_rotary_pos_emb, "zerotune_original")

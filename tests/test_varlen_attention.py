"""PyTorch's own varlen flash attention (torch.nn.attention.varlen.varlen_attn) as zerotune_segments runs it.

varlen_attn needs CUDA; here a pure-torch stand-in (causal SDPA per segment, refusing fewer key/value heads unless
enable_gqa, as the real one does) is put where zerotune calls it, in the two signatures torch has had (torch 2.13:
window_size=(-1, 0) for causal; earlier: is_causal=True, no enable_gqa). A packed batch's logits through it equal
each example's alone (the tiny Llama has 4 query heads over 2 key/value heads: GQA), the probe learns each signature
and rejects a broken kernel with its reason, and the path order is flash-attn, then varlen_attn, then SDPA per
segment, with the log line saying which.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

import flash_standin
from trainer.data.collators import Collator, model_inputs
from trainer.model import kernels
from trainer.model.loading import attention_implementation

CALLS: list[dict] = []


def _segments(q, k, v, cu_q, cu_k, scale):
    if q.shape[1] != k.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return torch.cat([F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True,
                                                     scale=scale).transpose(0, 1)
                      for a, b in zip(cq, cq[1:])]) if cq == ck else None


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.13's signature."""
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError("Expect query and key/value to have the same number of heads")
    assert tuple(window_size) == (-1, 0), "zerotune always asks for causal attention"
    CALLS.append({"cu": cu_seq_q.clone(), "max_q": max_q, "gqa": enable_gqa, "heads": (query.shape[1], key.shape[1])})
    return _segments(query, key, value, cu_seq_q, cu_seq_k, scale)


def varlen_attn_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False,
                    scale=None):
    """An earlier torch's signature: is_causal, no grouped key/value heads."""
    if query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads")
    assert is_causal
    CALLS.append({"cu": cu_seq_q.clone(), "max_q": max_q, "gqa": False, "heads": (query.shape[1], key.shape[1])})
    return _segments(query, key, value, cu_seq_q, cu_seq_k, scale)


def _broken(*args, **kwargs):
    raise RuntimeError("no kernel image is available for execution on the device")


@pytest.fixture()
def varlen_path(monkeypatch):
    """The varlen path engaged on this CPU with a given stand-in: (function) -> its probed status."""

    def engage(fn):
        monkeypatch.setattr(kernels, "_varlen_function", lambda: fn)
        status = kernels._probe_varlen("cpu")
        assert status.usable, status.why
        monkeypatch.setattr(kernels, "varlen_status", lambda: status)
        monkeypatch.setattr(kernels, "flash_status", lambda: kernels.FlashStatus(False, why="not installed"))
        monkeypatch.setattr(kernels, "_flash_device", lambda query: True)  # stands for "a CUDA bf16 tensor"
        CALLS.clear()
        return status

    return engage


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    kernels.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=kernels.SEGMENTS, dtype=torch.float32)
    with torch.no_grad():  # random weights make every position matter
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return model.eval()


@pytest.mark.parametrize("fn", [varlen_attn, varlen_attn_old], ids=["torch-2.13", "is_causal"])
def test_packed_logits_through_varlen_attn_equal_each_example_alone(fn, varlen_path, tiny_model_dir, packed_rows):
    status = varlen_path(fn)
    assert status.gqa == (fn is varlen_attn)
    model = _model(tiny_model_dir)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert model.config.num_key_value_heads < heads  # GQA
    batch = Collator(0)(packed_rows)
    with torch.no_grad():
        packed = model(**model_inputs(batch), use_cache=False).logits[0]
        assert len(CALLS) == layers
        for call in CALLS:  # the collator's cu_seq_lens as they are, and its longest example
            assert torch.equal(call["cu"], batch["cu_seq_lens_q"]) and call["max_q"] == batch["max_length_q"]
            # torch 2.13 gets the 2 key/value heads with enable_gqa; the older signature gets them repeated to 4
            assert call["heads"] == ((heads, 2) if status.gqa else (heads, heads)) and call["gqa"] == status.gqa
        start = 0
        for n in batch["cu_seq_lens_q"].diff().tolist():
            ids = batch["input_ids"][:, start:start + n]
            alone = model(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
    assert len(CALLS) > layers  # each example alone ran the varlen path too (its cu_seq_lens built here)


def test_the_probe_learns_the_signature_and_rejects_a_broken_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_varlen_function", lambda: varlen_attn)
    new = kernels._probe_varlen("cpu")
    assert new.usable and new.gqa and dict(new.causal) == {"window_size": (-1, 0)}
    monkeypatch.setattr(kernels, "_varlen_function", lambda: varlen_attn_old)
    old = kernels._probe_varlen("cpu")
    assert old.usable and not old.gqa and dict(old.causal) == {"is_causal": True}
    monkeypatch.setattr(kernels, "_varlen_function", lambda: _broken)
    assert not kernels._probe_varlen("cpu").usable  # takes neither keyword

    def broken(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        _broken()

    monkeypatch.setattr(kernels, "_varlen_function", lambda: broken)
    status = kernels._probe_varlen("cpu")
    assert not status.usable and "RuntimeError: no kernel image" in status.why

    def missing():
        raise ImportError("no module named torch.nn.attention.varlen")

    monkeypatch.setattr(kernels, "_varlen_function", missing)
    assert "has no torch.nn.attention.varlen.varlen_attn" in kernels._probe_varlen("cpu").why


def _attend(query_heads=4, kv_heads=2, lengths=(3, 5)):
    gen = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q = torch.randn(1, query_heads, t, 8, generator=gen)
    k, v = (torch.randn(1, kv_heads, t, 8, generator=gen) for _ in range(2))
    cu = torch.tensor([0, lengths[0], t], dtype=torch.int32)
    module = torch.nn.Module().eval()
    return kernels.segment_attention(module, q, k, v, None, cu_seq_lens_q=cu, segment_lengths=lengths)[0]


def test_flash_attn_comes_first_then_varlen_then_sdpa_per_segment(varlen_path, monkeypatch):
    varlen_path(varlen_attn)
    reference = _attend()
    assert len(CALLS) == 1
    with flash_standin.installed() as flash_calls:
        monkeypatch.setattr(kernels, "flash_status", lambda: kernels.FlashStatus(True, bottom_right=True))
        monkeypatch.setattr(kernels, "_flash_varlen", lambda: flash_standin.flash_attn_varlen_func)
        torch.testing.assert_close(_attend(), reference)
        assert len(CALLS) == 1 and [c["fn"] for c in flash_calls] == ["varlen"]  # flash-attn took it
    monkeypatch.setattr(kernels, "flash_status", lambda: kernels.FlashStatus(False))
    monkeypatch.setattr(kernels, "varlen_status", lambda: kernels.VarlenStatus(False, why="none"))
    torch.testing.assert_close(_attend(), reference)  # SDPA per segment
    assert len(CALLS) == 1


def test_auto_picks_the_path_and_says_which(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "varlen_status", lambda: kernels.VarlenStatus(True, why="torch 2.13.0"))
    monkeypatch.setattr(kernels, "has_flash_attn", lambda: False)
    monkeypatch.setattr(kernels, "flash_status", lambda: kernels.FlashStatus(False, why="flash-attn is not installed"))
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert attention_implementation("auto") == kernels.SEGMENTS
    assert "PyTorch's varlen flash attention (torch 2.13.0)" in caplog.text
    assert "flash-attn: flash-attn is not installed" in caplog.text
    caplog.clear()
    monkeypatch.setattr(kernels, "varlen_status", lambda: kernels.VarlenStatus(False, why="torch 2.9 has no varlen"))
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert attention_implementation("auto") == kernels.SEGMENTS
    assert "SDPA per segment" in caplog.text and "torch 2.9 has no varlen" in caplog.text
    monkeypatch.setattr(kernels, "has_flash_attn", lambda: True)
    assert attention_implementation("auto") == "flash_attention_2"  # flash-attn healthy: transformers' FA2
    assert attention_implementation("auto", segments_wanted=True) == kernels.SEGMENTS  # it runs FA2 itself

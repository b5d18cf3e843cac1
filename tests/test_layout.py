"""The batch layout every attention path reads, and the one generation function.

- A padding-free batch of 4 packed rows (many examples end to end): every example's logits equal those of
  the example alone, on FlashAttention-2 (transformers' own FA2 code, with a pure-torch flash-attn put where
  it looks for one), zerotune_segments, SDPA and eager; FA2 receives exactly the cu_seq_lens the collator built.
- Batched, left-padded greedy generation of prompts of different lengths equals generating each alone, on
  every path (zerotune_segments honours the padding mask since it registers a mask function).
"""

import pytest
import torch

import flash_standin
from trainer.data.collators import Collator, model_inputs
from trainer.data.templates import get_template
from trainer.model import kernels

PATHS = ["flash_attention_2", kernels.SEGMENTS, "sdpa", "eager"]


def _model(model_dir, path: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    kernels.register()
    load_as = "sdpa" if path == "flash_attention_2" else path
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=load_as, dtype=dtype)
    # Random weights make every position matter (a near-uniform tiny model would hide contamination).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    if path == "flash_attention_2":
        flash_standin.use_flash_attention_2(model)
    return model.eval()


@pytest.mark.parametrize("path", PATHS)
def test_packed_batch_logits_equal_each_example_alone(path, tiny_model_dir, packed_rows):
    model = _model(tiny_model_dir, path)
    batch = Collator(0)(packed_rows)
    examples = []
    for row in packed_rows:
        start = 0
        for n in row["lengths"]:
            examples.append(row["input_ids"][start:start + n])
            start += n
    assert batch["input_ids"].shape == (1, sum(len(e) for e in examples))
    assert batch["cu_seq_lens_q"].diff().tolist() == [len(e) for e in examples]
    with flash_standin.installed() as calls, torch.no_grad():
        packed = model(**model_inputs(batch), use_cache=False).logits[0]
        if path == "flash_attention_2":
            layers = model.config.num_hidden_layers
            assert [c["fn"] for c in calls] == ["varlen"] * layers
            for call in calls:
                assert torch.equal(call["cu_seqlens_q"], batch["cu_seq_lens_q"])
                assert torch.equal(call["cu_seqlens_k"], batch["cu_seq_lens_k"])
                assert call["max_seqlen_q"] == max(len(e) for e in examples)
        start = 0
        for ids in examples:
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(ids)


def test_the_same_row_without_the_layout_lets_examples_see_each_other(tiny_model_dir, packed_rows):
    """The check above can fail: without position restarts and cu_seq_lens the logits change."""
    model = _model(tiny_model_dir, kernels.SEGMENTS)
    batch = Collator(0)(packed_rows)
    with torch.no_grad():
        kept = model(**model_inputs(batch), use_cache=False).logits
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert (kept - leaky).abs().max() > 1e-2


def test_segments_read_the_layout_once_per_forward_pass(tiny_model_dir, packed_rows, monkeypatch):
    model = _model(tiny_model_dir, kernels.SEGMENTS)
    batch = Collator(0)(packed_rows)
    reads = []
    monkeypatch.setattr(kernels._layout_lengths, "compute", lambda cu: reads.append(1) or cu.diff().tolist())
    monkeypatch.setattr(kernels, "segment_bounds", lambda *a: pytest.fail("boundaries inferred from positions"))
    with torch.no_grad():
        model(**model_inputs(batch), use_cache=False)
        model(**model_inputs(Collator(0)(packed_rows[:2])), use_cache=False)
        assert reads == []  # the collator's host copy of the lengths: nothing read back from the device
        for rows in (packed_rows, packed_rows[:2]):  # a caller with the device tensors alone: once a forward
            inputs = model_inputs(Collator(0)(rows))
            del inputs["segment_lengths"]
            model(**inputs, use_cache=False)
    assert len(reads) == 2 and model.config.num_hidden_layers > 1


@pytest.mark.parametrize("path", PATHS)
def test_batched_left_padded_generation_equals_each_prompt_alone(path, tiny_model_dir, tiny_tokenizer):
    from trainer.generation import GenerationSettings, generate

    model = _model(tiny_model_dir, path)
    template = get_template("chatml", tiny_tokenizer)
    questions = ["Hi", "What is the capital of France and of Italy?", "Write a poem about the sea and the wind.",
                 "One two three"]
    prompts = [template.encode_prompt(tiny_tokenizer, [{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == 4
    greedy = GenerationSettings(max_new_tokens=12, do_sample=False)
    stops = template.stop_token_ids(tiny_tokenizer)
    with flash_standin.installed() as calls:
        together = generate(model, prompts, stops, tiny_tokenizer.pad_token_id, greedy)
        if path == "flash_attention_2":  # the padded batch went through FA2's unpadding into varlen
            assert calls and all(c["fn"] == "varlen" for c in calls[:model.config.num_hidden_layers])
        alone = [generate(model, [p], stops, tiny_tokenizer.pad_token_id, greedy)[0] for p in prompts]
    assert together == alone
    assert all(len(a) == 12 or a[-1] in stops for a in alone) and any(len(a) > 3 for a in alone)

"""MFU's FLOP count against torch's own FLOP counter on a real forward and backward."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.engine.metrics import flops_per_token


@pytest.mark.parametrize("tied", [False, True])
def test_flop_count_matches_torch_flop_counter(tiny_model_dir, tied):
    """Full fine-tune, every token labelled, full logits, eager attention: the matmuls torch counts must be
    tokens x (linear + head) FLOPs, and the attention batched matmuls the full L x L square eager computes
    (twice the causal pairs MFU charges)."""
    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    linear, pair, head = flops_per_token(model)
    length = 24
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    aten = torch.ops.aten
    linear_counted = sum(v for op, v in counts.items() if op in (aten.mm, aten.addmm))
    attention_counted = sum(v for op, v in counts.items() if op is aten.bmm)
    # 6N counts every parameter by convention; the norms' 1-D weights are no matmul, so torch leaves them out.
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert norms and linear_counted == pytest.approx(length * (linear + head - 6 * norms), rel=1e-9)
    assert attention_counted == pytest.approx(2 * pair * length * length, rel=1e-9)


def test_frozen_weights_cost_no_weight_gradient(tiny_model_dir):
    """LoRA-like: the matmul weights frozen, activations still need gradients. torch counts forward + input
    gradients only: 4 FLOPs per frozen parameter and token, against the 6 of a trained one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)  # only the norms train: every activation still needs its gradient
    linear, pair, head = flops_per_token(model)
    length = 24
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    aten = torch.ops.aten
    counted = sum(v for op, v in counts.items() if op in (aten.mm, aten.addmm))
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # trained (6 each) but no matmul
    assert counted == pytest.approx(length * (linear + head - 6 * norms), rel=1e-9)
    weight = model.get_output_embeddings().weight
    assert head == 4 * weight.numel()  # the frozen head: forward and input gradient, no weight gradient

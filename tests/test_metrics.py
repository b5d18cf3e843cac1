"""MFU's FLOP count against torch's own FLOP counter on a real forward and backward."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.engine.metrics import flops_per_token

LENGTH = 24


def _counted(model) -> tuple[float, float]:
    """(matmul FLOPs, attention batched-matmul FLOPs) torch counts for one forward + backward of LENGTH tokens."""
    ids = torch.randint(0, model.config.vocab_size, (1, LENGTH))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    aten = torch.ops.aten
    return (sum(v for op, v in counts.items() if op in (aten.mm, aten.addmm)),
            sum(v for op, v in counts.items() if op is aten.bmm))


def _norms(model) -> int:
    """6N counts every trained parameter by convention; the norms' 1-D weights are no matmul, so torch leaves
    them out."""
    return sum(p.numel() for p in model.parameters() if p.dim() == 1)


@pytest.mark.parametrize("tied", [False, True])
def test_flop_count_matches_torch_flop_counter(tiny_model_dir, tied):
    """Full fine-tune, every token labelled, full logits, eager attention: the matmuls torch counts must be
    tokens x (linear + head) FLOPs, and the attention batched matmuls the full L x L square eager computes
    (twice the causal pairs MFU charges)."""
    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    linear, pair, head = flops_per_token(model)
    linear_counted, attention_counted = _counted(model)
    assert _norms(model) and linear_counted == pytest.approx(LENGTH * (linear + head - 6 * _norms(model)), rel=1e-9)
    assert attention_counted == pytest.approx(2 * pair * LENGTH * LENGTH, rel=1e-9)


def test_frozen_weights_cost_no_weight_gradient(tiny_model_dir):
    """LoRA-like: the matmul weights frozen, activations still need gradients. torch counts forward + input
    gradients only: 4 FLOPs per frozen parameter and token, against the 6 of a trained one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)  # only the norms train: every activation still needs its gradient
    linear, pair, head = flops_per_token(model)
    counted, _ = _counted(model)
    assert counted == pytest.approx(LENGTH * (linear + head - 6 * _norms(model)), rel=1e-9)
    assert head == 4 * model.get_output_embeddings().weight.numel()  # frozen head: no weight gradient


def test_a_reference_forward_costs_two_flops_per_base_parameter(tiny_model_dir):
    """What MFU charges for a preference stage's reference pass: a no-grad forward of the base model (adapters
    off), against torch's count; LoRA's own parameters are not part of it."""
    from peft import LoraConfig, get_peft_model

    from trainer.engine.metrics import forward_flops_per_token

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    linear, head = forward_flops_per_token(model)
    ids = torch.randint(0, model.config.vocab_size, (1, LENGTH))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    aten = torch.ops.aten
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if op in (aten.mm, aten.addmm))
    assert counted == pytest.approx(LENGTH * (linear + head - 2 * _norms(model)), rel=1e-9)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert forward_flops_per_token(lora) == (linear, head)


def test_total_flos_count_is_transformers_own(tiny_model_dir):
    """ZeroTrainer takes the parameter count once per model instead of walking the model every step; the
    count must stay transformers' (6 x input tokens x non-embedding parameters), and follow a new model."""
    from types import SimpleNamespace

    from transformers import Trainer

    from trainer.engine.trainer import ZeroTrainer

    inputs = {"input_ids": torch.ones(3, 17, dtype=torch.long)}
    first = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    second = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir, num_hidden_layers=1))
    ours, theirs = SimpleNamespace(model=first), SimpleNamespace(model=first)
    for model in (first, first, second):
        ours.model = theirs.model = model
        assert ZeroTrainer.floating_point_ops(ours, inputs) == Trainer.floating_point_ops(theirs, inputs) > 0
    assert ZeroTrainer.floating_point_ops(ours, {"labels": inputs["input_ids"]}) == 0


@pytest.mark.parametrize("name,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H100 NVL", "float16", 835e12), ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12), ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA L40S", "bfloat16", 362e12), ("NVIDIA GeForce RTX 4090", "bfloat16", 165e12),
    ("NVIDIA H100 80GB HBM3", "float32", None),  # TF32 or not is a setting: measured
    ("Tesla V100-SXM2-16GB", "bfloat16", None),  # no bf16 tensor cores: measured
    ("NVIDIA Some Future GPU", "bfloat16", None),
])
def test_mfu_peak_by_exact_device_name(name, dtype, peak):
    from trainer.engine.metrics import table_peak

    assert table_peak(name, dtype) == peak


def test_a_given_peak_is_used_as_is_and_nothing_is_measured(monkeypatch, caplog):
    import logging

    from trainer.engine import metrics

    def measure(dtype_name):
        raise AssertionError("measured although mfu_peak_tflops was given")

    monkeypatch.setattr(metrics, "_measured_peak", measure)
    with caplog.at_level(logging.INFO, logger="trainer.engine.metrics"):
        assert metrics.device_peak_flops("float32", 2.5) == 2.5e12
    assert "2.5 TFLOP/s (mfu_peak_tflops)" in caplog.text


@pytest.mark.parametrize("value", [0, -1.0])
def test_a_peak_that_is_not_positive_is_refused_by_name(value, tmp_path):
    from tiny import base_config

    from trainer.errors import ConfigError
    from trainer.run import build_config

    with pytest.raises(ConfigError, match="mfu_peak_tflops"):
        build_config(base_config(tmp_path, tmp_path, tmp_path / "out", mfu_peak_tflops=value))

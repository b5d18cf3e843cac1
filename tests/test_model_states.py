"""What each process keeps of weights, gradients and optimizer states, the figure gradient checkpointing is decided
against, compared with figures written by hand from the ZeRO paper's mixed-precision accounting (Rajbhandari et al.
2020, section 3: 2 bytes of 16-bit weights + 2 of 16-bit gradients + K = 12 of fp32 master weights, momentum and
variance per parameter; ZeRO-1 partitions the 12 over N processes, ZeRO-2 the gradients too, ZeRO-3 the weights too)
and DeepSpeed's documented bucket sizes (reduce_bucket_size and allgather_bucket_size elements; "overlap_comm uses
4.5x the allgather_bucket_size and reduce_bucket_size values"; transformers fills "auto" with hidden_size^2 and the
ZeRO-3 prefetch bucket with 0.9 hidden_size^2)."""

from types import SimpleNamespace

import pytest
import torch

from trainer.plan import model_states_bytes


def _model(freeze_layers: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    if freeze_layers:
        for p in model.model.layers.parameters():
            p.requires_grad_(False)
    return model


def _args(zero: dict | None, world: int = 4, bf16: bool = True):
    return SimpleNamespace(world_size=world, bf16=bf16, fp16=False,
                           deepspeed={"zero_optimization": zero} if zero is not None else None)


BUCKETS = {"reduce_bucket_size": 1000, "allgather_bucket_size": 3000}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_match_the_paper(stage):
    model = _model()
    psi = sum(p.numel() for p in model.parameters())
    n = 4
    paper = {0: 2 * psi + 2 * psi + 12 * psi, 1: 2 * psi + 2 * psi + 12 * psi / n,
             2: 2 * psi + (2 + 12) * psi / n, 3: (2 + 2 + 12) * psi / n}[stage]
    weights, states, buffers, how = model_states_bytes(model, _args({"stage": stage, **BUCKETS}, n))
    assert weights + states == pytest.approx(paper)
    assert weights == pytest.approx(2 * psi / (n if stage == 3 else 1))
    # ZeRO-1/2: both buckets in 16 bits; ZeRO-3: the reduce bucket and the prefetch bucket (DeepSpeed's 5e7 default)
    assert buffers == {0: 0, 1: 2 * 4000, 2: 2 * 4000, 3: 2 * (1000 + 5e7)}[stage]
    assert f"ZeRO-{stage}: 2+2+12 bytes" in how


def test_frozen_weights_offload_overlap_auto_and_fp32():
    model = _model(freeze_layers=True)
    psi = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n, h = 4, 64
    # ZeRO-2: frozen 16-bit weights whole on every process; ZeRO-3: partitioned like the trained ones
    weights, states, _, _ = model_states_bytes(model, _args({"stage": 2}, n))
    assert weights == 2 * psi + 2 * frozen and states == pytest.approx(14 * psi / n)
    weights, states, _, _ = model_states_bytes(model, _args({"stage": 3}, n))
    assert weights == pytest.approx((2 * psi + 2 * frozen) / n) and states == pytest.approx(14 * psi / n)
    # offload_optimizer: master weights and moments live in CPU memory; offload_param: the ZeRO-3 weights too
    off = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    weights, states, _, _ = model_states_bytes(model, _args(off, n))
    assert weights == 0 and states == pytest.approx(2 * psi / n)
    # overlap_comm: 4.5x both buckets; "auto" as transformers fills it
    _, _, buffers, _ = model_states_bytes(model, _args({"stage": 2, "overlap_comm": True, **BUCKETS}, n))
    assert buffers == pytest.approx(4.5 * 4000 * 2)
    _, _, buffers, _ = model_states_bytes(model, _args({"stage": 3, "reduce_bucket_size": "auto",
                                                        "stage3_prefetch_bucket_size": "auto"}, n))
    assert buffers == pytest.approx(2 * (h * h + int(0.9 * h * h)))
    # DeepSpeed in fp32: the weights are the master copy, 4 + 4 + 8 bytes
    weights, states, buffers, how = model_states_bytes(model, _args({"stage": 1, **BUCKETS}, n, bf16=False))
    assert weights == 4 * psi + 4 * frozen and states == pytest.approx(4 * psi + 8 * psi / n)
    assert buffers == 4 * 4000 and "4+4+8 bytes" in how


def test_without_deepspeed_weights_as_stored_and_fsdp_divides_everything():
    model = _model(freeze_layers=True).to(torch.float32)
    psi = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert model_states_bytes(model, _args(None, 4)) == (4 * total, 12 * psi, 0.0, "")
    weights, states, buffers, _ = model_states_bytes(model, _args(None, 4), sharded=True)
    assert (weights, states, buffers) == (4 * total / 4, 12 * psi / 4, 0.0)

"""Tiled MLP (tiled_mlp, model/tiled_mlp.py): the same losses and gradient norms as the plain MLP through real
training steps (fp32), the tiling provably run (the MLP's forward once a shard, twice: forward and recompute), the
dropout masks of the forward replayed in the recompute, autograd's kept bytes as the plan counts them, and what
cannot work refused by name. With DeepSpeed and sequence parallelism: tests/test_sequence_parallel.py."""

import json

import pytest
import torch
from torch import nn

from tiny import base_config, train_with
from trainer.errors import ConfigError
from trainer.model import tiled_mlp


def _history(out) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e[k] for e in state["log_history"] if "loss" in e for k in ("loss", "grad_norm")]


def test_tiled_mlp_trains_as_the_plain_mlp_and_runs_once_a_shard(tiny_model_dir, data_dir, tmp_path, monkeypatch,
                                                                    caplog):
    """LoRA: the adapters inside the MLP train through the recompute (full fine-tuning, where the MLP's own weights
    do: tests/test_sequence_parallel.py, under DeepSpeed)."""
    common = dict(finetuning_type="lora", max_steps=3, packing=True, per_device_train_batch_size=1,
                  learning_rate=1e-2)
    train_with(base_config(tiny_model_dir, data_dir, tmp_path / "plain", **common))
    calls = []
    replay = tiled_mlp._Replay.__call__
    monkeypatch.setattr(tiled_mlp._Replay, "__call__",
                        lambda self, module, x: calls.append(torch.is_grad_enabled()) or replay(self, module, x))
    with caplog.at_level("INFO", logger="trainer.model.tiled_mlp"):
        train_with(base_config(tiny_model_dir, data_dir, tmp_path / "tiled", **common, tiled_mlp=True,
                               tiled_mlp_num_shards=3))
    assert "Tiled MLP (DeepSpeed's TiledMLP) in 2 decoder layers (LlamaMLP): 3 shards a row" in caplog.text
    # 3 steps x 2 layers: 3 shards without gradient (the forward), then 3 with it (the backward's recompute).
    assert calls.count(False) == calls.count(True) == 3 * 2 * 3
    plain, tiled = _history(tmp_path / "plain"), _history(tmp_path / "tiled")
    assert len(plain) == 6
    assert tiled == pytest.approx(plain, rel=1e-5)


class _DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.drop = nn.Linear(8, 16), nn.Linear(16, 8), nn.Dropout(0.5)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.drop(x))))


def test_the_recompute_draws_the_dropout_masks_of_the_forward():
    """lora_dropout inside a tiled MLP: the gradient is that of the masks the forward drew. Reference: the module run
    shard by shard from the same seed, with autograd (the same draws in the same order)."""
    torch.manual_seed(0)
    mlp, x0 = _DropoutMLP().train(), torch.randn(1, 12, 8)

    def grads(out, x):
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        got = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
        x.grad = None
        mlp.zero_grad()
        return out.detach(), got

    torch.manual_seed(1)
    x = x0.clone().requires_grad_()
    want = grads(torch.cat([mlp(s) for s in x.chunk(3, dim=1)], 1), x)
    mlp.forward = tiled_mlp._tiled(mlp.forward).__get__(mlp)
    setattr(mlp, tiled_mlp.MARK, 3)
    torch.manual_seed(1)
    x = x0.clone().requires_grad_()
    got = grads(mlp(x), x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_a_length_the_shards_do_not_divide_is_padded_to_exactly_that_many():
    """torch.chunk cuts 6 tokens into 3 pieces when 4 are asked; DeepSpeed's backward would then never mark the
    parameters ready for ZeRO's reduction (ds_grad_is_ready stays False). Padded: 4 calls, and the plain gradient."""
    torch.manual_seed(0)
    mlp, x0 = _DropoutMLP().train(), torch.randn(1, 6, 8)
    mlp.drop.p = 0.0
    x = x0.clone().requires_grad_()
    mlp(x).square().sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    calls = []
    inner = mlp.forward
    mlp.forward = tiled_mlp._tiled(lambda s: calls.append(s.shape[-2]) or inner(s)).__get__(mlp)
    setattr(mlp, tiled_mlp.MARK, 4)
    x = x0.clone().requires_grad_()
    out = mlp(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert calls == [2] * 8  # 6 tokens + 2 of padding, 4 shards, forward and recompute
    for g, w in zip([x.grad] + [p.grad for p in mlp.parameters()], want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert all(getattr(p, "ds_grad_is_ready", True) for p in mlp.parameters())


def test_the_plan_counts_what_autograd_keeps_with_the_tiled_mlp(tiny_model_dir):
    """activation_gb(tiled_mlp=True) against the bytes autograd keeps for a decoder forward with the tiled MLP (the
    same measurement and factor-of-1.5 promise as the plain estimate, tests/test_plan.py); and fewer than plain."""
    from transformers import AutoModelForCausalLM

    from test_plan import _saved_bytes
    from trainer.model import kernels
    from trainer.model.lean_ops import apply_lean_ops, lean_rotary
    from trainer.plan import activation_gb

    kernels.register()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=kernels.SEGMENTS).train()
    apply_lean_ops(model)
    lean_rotary(model)
    plain = _saved_bytes(model, 1024, torch.float32)
    tiled_mlp.apply_tiled_mlp(model, None)
    tiled = _saved_bytes(model, 1024, torch.float32)
    ratio = tiled / (activation_gb(model.config, 1024, 4, tiled_mlp=True) * 2**30)
    assert 1 / 1.5 <= ratio <= 1.5, ratio
    assert tiled < plain


def test_what_cannot_take_it_is_refused_by_name(tiny_model_dir, data_dir, tmp_path):
    from trainer.run import build_config

    with pytest.raises(ConfigError, match="tiled_mlp_num_shards: 0 must be at least 1"):
        build_config(base_config(tiny_model_dir, data_dir, tmp_path, tiled_mlp=True, tiled_mlp_num_shards=0))
    with pytest.raises(ConfigError, match="not supported with fsdp"):
        tiled_mlp.check_engine(deepspeed=False, fsdp=True, processes=2)
    with pytest.raises(ConfigError, match="several processes needs deepspeed"):
        tiled_mlp.check_engine(deepspeed=False, fsdp=False, processes=2)
    tiled_mlp.check_engine(deepspeed=True, fsdp=False, processes=2)
    tiled_mlp.check_engine(deepspeed=False, fsdp=False, processes=1)
    moe = nn.Module()
    moe.mlp = nn.Linear(2, 2)
    moe.mlp.experts = nn.ModuleList()
    with pytest.raises(ConfigError, match="mixture of experts"):
        tiled_mlp.apply_tiled_mlp(moe, None)
    with pytest.raises(ConfigError, match="no decoder-layer MLP"):
        tiled_mlp.apply_tiled_mlp(nn.Linear(2, 2), None)


def test_zerotune_check_counts_the_tiled_mlp_in_the_longest_cutoffs(tiny_model_dir, data_dir, tmp_path, monkeypatch,
                                                                     capsys):
    """Each size's longest cutoff is the longest whose activations, without the MLP's intermediates, fit; longer than
    without tiling; and `zerotune check` reports those, saying so."""
    import yaml
    from transformers import LlamaConfig

    from trainer.cli import check
    from trainer.plan import activation_gb, longest_cutoffs

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3)
    plain = longest_cutoffs(config, states_gb=2.0, free_gb=10.0, compute_bytes=2)
    tiled = longest_cutoffs(config, states_gb=2.0, free_gb=10.0, compute_bytes=2, tiled_mlp=True)
    for n, (longest, _) in tiled.items():
        assert activation_gb(config, longest, 2, tiled_mlp=True) / n <= 8.0 < \
            activation_gb(config, longest + 256, 2, tiled_mlp=True) / n
        assert longest > plain[n][0] and tiled[n][1] > plain[n][1]
    monkeypatch.setattr("trainer.plan.available_gb", lambda: 10.0)
    texts = []
    for on in (False, True):
        cfg = base_config(tiny_model_dir, data_dir, tmp_path / "out", tiled_mlp=on)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        assert check(str(tmp_path / "cfg.yaml"), []) == 0
        texts.append(capsys.readouterr().out)
    assert "tiled_mlp keeps no MLP intermediates" in texts[1] and "tiled_mlp" not in texts[0]

    def cutoff(text):
        return int(text.split("sequence_parallel_size 1:")[1].split("tokens")[0].replace(",", ""))

    assert cutoff(texts[1]) > cutoff(texts[0])

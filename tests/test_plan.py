"""zerotune check, and the checkpointing decision it shares with training."""

import subprocess
import sys
from pathlib import Path

import yaml

from tiny import base_config
from trainer.plan import activation_gb, decide_checkpointing, zero_memory

ROOT = Path(__file__).resolve().parents[1]


def test_check_prints_plan_with_packing_and_zero_memory(tiny_model_dir, data_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tiny_model_dir, data_dir, tmp_path / "o", per_device_train_batch_size=2,
                                              gradient_accumulation_steps=4, packing=True)))
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "check", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, env={"NNODES": "2", "NPROC_PER_NODE": "8", **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "processes        16 (8 per node x 2 node(s))" in out
    assert "2 x 4 accumulation x 16 = 128 packed rows a step" in out
    assert "packing efficiency" in out
    for stage in ("ZeRO-0 (DDP)", "ZeRO-2 + offload", "ZeRO-3 + offload"):
        assert stage in out
    assert not (tmp_path / "o").exists()  # nothing trained or written


def test_zero3_shards_model_states():
    mem = zero_memory(total=8_000_000_000, trained=8_000_000_000, largest=500_000_000, per_node=8, nodes=2)
    assert mem["ZeRO-3"][0] < mem["ZeRO-2"][0] < mem["ZeRO-0 (DDP)"][0]
    assert round(mem["ZeRO-0 (DDP)"][0]) == round(16 * 8e9 / 2**30)  # 16 bytes per trained parameter


def test_checkpointing_decided_by_memory(tiny_model_dir):
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True)
    assert decide_checkpointing(model, args, 1024)[0] is False
    assert decide_checkpointing(model, args, 10**12)[0] is True
    assert activation_gb(model.config, 2048, 2) == 2 * activation_gb(model.config, 1024, 2)

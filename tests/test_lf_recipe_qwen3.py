"""LLaMA-Factory's flagship recipe, examples/train_lora/qwen3_lora_sft.yaml (stored unchanged in tests/data/lf_yaml,
from hiyouga/LLaMA-Factory at 77e7f47), trains through the CLI with only the model and dataset paths changed: a tiny
local Qwen3 model whose tokenizer speaks ChatML, and zerotune's identity set. It used to stop at data preparation
("template: 'qwen3_nothink' is unknown")."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _tiny_qwen3(folder: Path) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_tokenizer(folder, eos="<|im_end|>")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_llama_factory_qwen3_recipe_trains_unchanged(tmp_path):
    model = _tiny_qwen3(tmp_path / "tiny-qwen3")
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", str(ROOT / "tests/data/lf_yaml/qwen3_lora_sft.yaml"),
                           f"model_name_or_path={model}", f"dataset_dir={ROOT / 'examples/data'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "saves/qwen3-4b/lora/sft"  # the recipe's output_dir, relative to where it ran
    assert (out / "adapter_model.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 36 and len(losses) == 3  # 90 rows / 8 a step, 3 epochs; logged every 10 steps
    assert losses[-1] < losses[0]

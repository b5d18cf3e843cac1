"""Tiny tokenizers and models built locally (no hub): a byte-level BPE that knows every template's
special tokens, and a 2-layer Llama sized to it."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "Hello there! How are you today? I am fine, thank you.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Write a short poem about the sea and the wind and the sky.",
    "def add(a, b):\n    return a + b\n",
    "Machine learning models learn patterns from data.",
    "Nimbus is an assistant built by the zerotune team.",
    "One two three four five six seven eight nine ten.",
] * 20

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "<bos>", "<start_of_turn>", "<end_of_turn>",
           "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def build_tokenizer(folder: Path, special: list[str] | None = None, eos: str = "<|endoftext|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL if special is None else special
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


def build_tiny(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    build_model(folder, len(tok))
    return folder


def write_dataset_dir(folder: Path, alpaca_rows: list[dict], sharegpt_rows: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alpaca.json").write_text(json.dumps(alpaca_rows))
    info = {"alpaca": {"file_name": "alpaca.json"}}
    if sharegpt_rows is not None:
        (folder / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in sharegpt_rows))
        info["chat"] = {"file_name": "chat.jsonl", "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "system": "system"}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def alpaca_rows(n: int = 24) -> list[dict]:
    """Deterministic rows of varied length, some with an input field."""
    words = "the quick brown fox jumps over the lazy dog while seven small birds sing".split()
    rows = []
    for i in range(n):
        k = 3 + (i * 7) % 40
        answer = " ".join(words[(i + j) % len(words)] for j in range(k))
        rows.append({"instruction": f"Question {i}: say {k} words.", "input": "context" if i % 3 == 0 else "",
                     "output": answer})
    return rows


def base_config(model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> dict:
    """A small, fast, fp32 sft config over the tiny model; overrides win."""
    cfg = {
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "dataset": "alpaca", "dataset_dir": str(data_dir), "template": "chatml",
        "cutoff_len": 128, "output_dir": str(output_dir), "logging_steps": 1, "save_steps": 1000,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
        "num_train_epochs": 1, "lr_scheduler_type": "constant", "bf16": False, "report_to": "none",
        "disable_tqdm": True, "seed": 7, "dataloader_num_workers": 0,
        # MFU against a given peak (about this 2-core CPU's bf16 one): each training process would otherwise
        # measure a second of matmuls, some minutes over the suite's processes (test_e2e keeps the measurement)
        "mfu_peak_tflops": 0.1,
    }
    cfg.update(overrides)
    return cfg


def train_with(cfg: dict) -> tuple[dict, dict]:
    """Run a config in-process; return (results, trainer_state)."""
    from trainer.run import build_config
    from trainer.run import run

    results = run(build_config(cfg))
    state_file = Path(cfg["output_dir"]) / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return results, state


def run_example(name: str, model_dir: Path, output_dir: Path, steps: int = 3):
    """`zerotune train examples/<name>` on the tiny model for `steps` steps, logging each; the finished process."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "trainer.cli", "train", f"examples/{name}",
                           f"model_name_or_path={model_dir}", f"output_dir={output_dir}", "bf16=false",
                           f"max_steps={steps}", "logging_steps=1"], cwd=root, capture_output=True, text=True,
                          timeout=600)

"""End to end through the command line on a tiny model: training, saving, plots, resume, evaluation,
the deepspeed-launcher entry point and W&B offline logging."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tiny import base_config, train_with
from trainer.engine.hardware import cpu_supports_bf16

ROOT = Path(__file__).resolve().parents[1]


def _cli(cfg: dict, tmp_path: Path, *overrides: str, entry=("-m", "trainer.cli", "train"), env=None):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    args = [sys.executable, *entry]
    args += ["--config", str(cfg_file)] if "launch" in entry[0] else [str(cfg_file)]
    proc = subprocess.run(args + list(overrides), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> list[tuple[int, float]]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]


def _check_mfu(logged: list[dict], stderr: str, model_dir: Path, cutoff: int = 128) -> None:
    """MFU x peak / tokens-per-second is the FLOPs charged per token: a full fine-tune must be charged between
    6 per body parameter (counted here from the saved weights) and that plus the head and the longest
    attention an example of cutoff_len tokens can have."""
    import re

    from safetensors.torch import load_file
    from transformers import AutoConfig

    peak = float(re.search(r"matmul peak: ([\d.]+) GFLOP/s", stderr).group(1)) * 1e9
    weights = load_file(str(model_dir / "model.safetensors"))
    config = AutoConfig.from_pretrained(model_dir)
    body = sum(t.numel() for n, t in weights.items() if "embed" not in n and "lm_head" not in n)
    head = config.vocab_size * config.hidden_size
    lower = 6 * body
    upper = 6 * (body + head) + 12 * config.hidden_size * config.num_hidden_layers * cutoff
    for e in logged:
        charged = e["mfu"] * peak / e["tokens_per_second"]
        assert 0.9 * lower <= charged <= 1.1 * upper, (e, charged, lower, upper)


def test_full_finetune_through_cli(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "full"
    cfg = base_config(tiny_model_dir, data_dir, out, finetuning_type="full", plot_loss=True, num_train_epochs=4,
                      learning_rate=5e-3, val_size=0.2, eval_strategy="steps", eval_steps=4)
    del cfg["mfu_peak_tflops"]  # MFU against the peak this process measures, as a user's run without the key
    proc = _cli(cfg, tmp_path, "logging_steps=2", "lr_scheduler_type=cosine", "warmup_ratio=0.1")
    losses = [loss for _, loss in _losses(out)]
    assert losses[-1] < losses[0] * 0.9
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training_loss.png",
                 "training_eval_loss.png", "trainer_state.json", "all_results.json"):
        assert (out / name).is_file(), name
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert all(e["tokens_per_second"] > 0 and 0 <= e["padding_fraction"] < 1 and e["peak_memory_gb"] > 0
               for e in logged)
    _check_mfu(logged, proc.stderr, out)
    assert "Batches padding-free" in proc.stderr and "zerotune_segments attention" in proc.stderr

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.vocab_size > 0


def test_lora_resume_and_eval_of_the_adapter(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "lora"
    cfg = base_config(tiny_model_dir, data_dir, out, max_steps=6, save_steps=3, val_size=4,
                      per_device_train_batch_size=1, packing=False, do_eval=True)
    _cli(cfg, tmp_path)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "checkpoint-3").is_dir()
    straight = dict(_losses(out))

    resumed = tmp_path / "resumed"
    import shutil

    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    _cli({**cfg, "output_dir": str(resumed)}, tmp_path, "resume_from_checkpoint=true")
    again = dict(_losses(resumed))
    assert sorted(again) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's state
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(straight[step], rel=1e-5)

    # do_train: false evaluates the saved adapter on the same validation split
    ev = tmp_path / "eval"
    results, _ = train_with({**cfg, "output_dir": str(ev), "do_train": False, "do_eval": True,
                             "adapter_name_or_path": str(out)})
    trained, _ = train_with({**cfg, "output_dir": str(tmp_path / "eval_base"), "do_train": False, "do_eval": True})
    final = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss"] != pytest.approx(trained["eval_loss"], rel=1e-6)  # the adapter changed the model
    assert results["eval_tokens"] > 0
    assert results["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_launcher_entry_point_and_freeze(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "freeze"
    cfg = base_config(tiny_model_dir, data_dir, out, finetuning_type="freeze", freeze_trainable_layers=1,
                      max_steps=2, learning_rate=1e-2)
    _cli(cfg, tmp_path, entry=("launch/train.py",))
    from safetensors.torch import load_file

    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)


def _wandb_history(run_file: Path) -> list[dict]:
    """Read the history records of a .wandb file: LevelDB log framing around protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    pos, block, records, pending = 7, 32768, [], b""  # 7-byte W&B header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            if rec.HasField("history"):
                records.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
    return records


def test_wandb_offline_run_holds_loss_and_throughput(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "wb"
    cfg = base_config(tiny_model_dir, data_dir, out, max_steps=3, report_to="wandb", run_name="tiny")
    _cli(cfg, tmp_path, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = [h for h in _wandb_history(files[0]) if "train/loss" in h]
    assert len(history) == 3
    expected = [loss for _, loss in _losses(out)]
    assert [h["train/loss"] for h in history] == pytest.approx(expected)
    assert all(h["train/tokens_per_second"] > 0 and "train/mfu" in h for h in history)


def test_untrained_stop_token_is_reported(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.model.options import FinetuningArguments
    from trainer.model.adapters import untrained_token_rows, warn_untrained_stop_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).requires_grad_(False)  # frozen, as LoRA leaves it
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert untrained_token_rows(model, [eot, im_end]) == []
    with torch.no_grad():  # what resizing does to a new token: the mean of the other rows
        model.get_output_embeddings().weight[eot] = model.get_output_embeddings().weight.mean(dim=0)
    assert untrained_token_rows(model, [eot, im_end]) == [eot]
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("trainer").addHandler(handler)
    try:
        warn_untrained_stop_tokens(model, tok, [eot], FinetuningArguments(finetuning_type="lora"))
    finally:
        logging.getLogger("trainer").removeHandler(handler)
    assert any("STOP TOKEN NOT TRAINED" in r.getMessage() and "<|eot_id|>" in r.getMessage() for r in records)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_lora_bf16_keeps_the_frozen_base_in_bf16_and_trains(tiny_model_dir, data_dir, tmp_path):
    """bf16 LoRA on CPU: frozen weights in bf16 (as on GPU), adapters trained and saved in fp32; its
    losses follow the fp32 run's to bf16 precision, and it learns."""
    common = dict(max_steps=6, learning_rate=1e-2, per_device_train_batch_size=4)
    ref = _losses_of(train_with(base_config(tiny_model_dir, data_dir, tmp_path / "fp32", **common))[1])
    got = _losses_of(train_with(base_config(tiny_model_dir, data_dir, tmp_path / "bf16", bf16=True, **common))[1])
    assert got == pytest.approx(ref, rel=2e-3)  # bf16 follows the fp32 trajectory
    assert got[-1] < got[0] - 0.1
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())


def _losses_of(state: dict) -> list[float]:
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_a_comma_list_of_adapters_trains_as_in_llama_factory(tiny_model_dir, data_dir, tmp_path):
    """adapter_name_or_path: a,b merges a into the base and trains b further (LLaMA-Factory's reading). The first
    step's loss equals that of plain peft's base + a merged + b, and b is what the run saves."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.data.collators import Collator
    from trainer.model.wrapper import ModelWrapper

    first, second = tmp_path / "a", tmp_path / "b"
    train_with(base_config(tiny_model_dir, data_dir, first, max_steps=3, learning_rate=5e-2))
    train_with(base_config(tiny_model_dir, data_dir, second, max_steps=3, learning_rate=5e-2, seed=11))
    _, state = train_with(base_config(tiny_model_dir, data_dir, tmp_path / "ab", max_steps=1, learning_rate=0.0,
                                      adapter_name_or_path=f"{first},{second}", per_device_train_batch_size=24))
    loss = state["log_history"][0]["loss"]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(base, str(first)).merge_and_unload()
    reference = PeftModel.from_pretrained(merged, str(second))
    from trainer.data.options import DataArguments
    from trainer.data.processing import tokenized_dataset
    from trainer.data.templates import get_template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data, _ = tokenized_dataset(["alpaca"], DataArguments(dataset_dir=str(data_dir), template="chatml", cutoff_len=128),
                                "supervised", tok, get_template("chatml", tok), rebuild=False)
    items = [{"input_ids": r["input_ids"], "labels": r["labels"], "lengths": [len(r["input_ids"])]} for r in data]
    batch = Collator(tok.pad_token_id)(items)
    with torch.no_grad():
        nll, mask = ModelWrapper(reference).token_nll(reference, batch)
    assert loss == pytest.approx((nll * mask).sum().item() / mask.sum().item(), rel=1e-4)
    from safetensors.torch import load_file

    saved, trained = (load_file(str(f / "adapter_model.safetensors")) for f in (tmp_path / "ab", second))
    assert saved.keys() == trained.keys()  # at learning rate 0, b itself, continued
    for name in saved:
        torch.testing.assert_close(saved[name], trained[name])

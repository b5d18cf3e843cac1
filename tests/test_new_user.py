"""What a new user coming from LLaMA-Factory ran into (issue "Found trying zerotune as a new user"): each test
reproduces one item and checks the message names the key, file, line or checkpoint it is about."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import base_config, train_with
from trainer.run import build_config
from trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _steps(out: Path) -> int:
    return json.loads((out / "trainer_state.json").read_text())["global_step"]


# ---- resume and output_dir ------------------------------------------------------------------------------------
def test_overwriting_sets_the_old_run_aside_and_true_resumes_only_this_run(tiny_model_dir, data_dir, tmp_path,
                                                                           caplog):
    out = tmp_path / "o"
    cfg = base_config(tiny_model_dir, data_dir, out, max_steps=6, save_steps=2)
    train_with(cfg)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    with caplog.at_level("WARNING", logger="trainer"):
        train_with({**cfg, "max_steps": 4, "overwrite_output_dir": True})
    aside = sorted(out.glob("previous-run-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-2", "checkpoint-4",
                                                                           "checkpoint-6"]
    assert str(aside[0]) in caplog.text  # says where
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer"):
        results, _ = train_with({**cfg, "max_steps": 4, "resume_from_checkpoint": True})
    assert f"{out}/checkpoint-4" in caplog.text and "already complete" in caplog.text
    assert not (out / "checkpoint-5").exists() and not (out / "checkpoint-6").exists()


def test_resuming_a_finished_run_trains_nothing_and_exits_zero(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "o"
    cfg = base_config(tiny_model_dir, data_dir, out, max_steps=4, save_steps=2)
    train_with(cfg)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({**cfg, "resume_from_checkpoint": True}))
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", str(cfg_file)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint-4 is at step 4 of max_steps 4: the run is already complete" in proc.stderr
    assert not (out / "checkpoint-5").exists() and _steps(out) == 4


def test_a_finished_runs_folder_is_not_a_checkpoint(tiny_model_dir, data_dir, tmp_path):
    done = tmp_path / "done"
    train_with(base_config(tiny_model_dir, data_dir, done, max_steps=2))
    cfg = base_config(tiny_model_dir, data_dir, tmp_path / "next", max_steps=4, resume_from_checkpoint=str(done))
    with pytest.raises(ConfigError) as err:
        build_config(cfg)
    message = str(err.value)
    assert str(done) in message and "no optimizer state" in message
    assert "adapter_name_or_path" in message and "model_name_or_path" in message


def test_a_folder_that_is_no_checkpoint_is_refused_before_the_model_loads(tiny_model_dir, data_dir, tmp_path):
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"not-a-checkpoint' cannot be resumed: it is not a checkpoint"):
        build_config(base_config(tiny_model_dir, data_dir, tmp_path / "o", resume_from_checkpoint=str(empty)))


# ---- values refused before anything loads -------------------------------------------------------------------------
@pytest.mark.parametrize("extra,expect", [
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size: 0 must be at least 1"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps: 0 must be at least 1"),
    ({"num_train_epochs": -1, "max_steps": -1}, "Nothing to train: num_train_epochs is -1"),
    ({"lora_alpha": 0}, "lora_alpha: 0 must be positive"),
    ({"report_to": "tensorboardx"}, "report_to: 'tensorboardx' is not an integration. Did you mean: tensorboard"),
    ({"report_to": "tensorboard"}, "report_to: tensorboard needs the tensorboard package, which is not installed: "
                                   "pip install tensorboard"),
])
def test_bad_values_are_refused_by_key(extra, expect, tmp_path):
    if extra.get("report_to") == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            pytest.skip("tensorboard is installed here")
    with pytest.raises(ConfigError) as err:
        build_config(base_config(tmp_path, tmp_path, tmp_path / "o", **extra))
    assert expect in str(err.value)


# ---- data ------------------------------------------------------------------------------------------------------
def test_a_malformed_jsonl_line_is_named_with_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    lines = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(10)]
    lines[7] = '{"instruction": "q7", "output": "a7"'  # line 8, 1-based
    (data / "bad.jsonl").write_text("\n".join(lines))
    (data / "dataset_info.json").write_text(json.dumps({"bad": {"file_name": "bad.jsonl"}}))
    with pytest.raises(ConfigError) as err:
        train_with(base_config(tiny_model_dir, data, tmp_path / "o", dataset="bad", max_steps=1))
    message = str(err.value)
    assert "1 of 10 lines of" in message and "bad.jsonl are not valid JSON: line 8" in message


# ---- LLaMA-Factory keys ----------------------------------------------------------------------------------------
def test_freeze_extra_modules_takes_llama_factory_short_names_and_layers_clamp(tiny_model_dir, data_dir, tmp_path,
                                                                              caplog):
    cfg = base_config(tiny_model_dir, data_dir, tmp_path / "o", finetuning_type="freeze", max_steps=1,
                      freeze_trainable_layers=5, freeze_extra_modules="embed_tokens")
    with caplog.at_level("WARNING", logger="trainer"):
        train_with(cfg)
    assert "freeze_trainable_layers: 5, but the model has 2 layers; training all of them" in caplog.text
    from safetensors.torch import load_file

    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert not (before["model.embed_tokens.weight"] == after["model.embed_tokens.weight"]).all()  # it trained
    assert (before["lm_head.weight"] == after["lm_head.weight"]).all()  # lm_head was not asked for
    with pytest.raises(ConfigError, match=r"freeze_extra_modules: 'embeddings' is not a module .* choose from: "
                                          r"embed_tokens, lm_head, norm"):
        train_with({**cfg, "freeze_extra_modules": "embeddings", "output_dir": str(tmp_path / "o2")})


def test_tokenized_path_saves_then_loads(tiny_model_dir, data_dir, tmp_path, caplog):
    saved = tmp_path / "tokenized"
    cfg = base_config(tiny_model_dir, data_dir, tmp_path / "o", max_steps=1, tokenized_path=str(saved))
    with caplog.at_level("INFO", logger="trainer"):
        train_with(cfg)
    assert (saved / "zerotune_report.json").is_file() and "Saved the tokenized data to tokenized_path" in caplog.text
    caplog.clear()
    (data_dir / "alpaca.json").unlink()  # the second run must not need the raw data any more
    with caplog.at_level("INFO", logger="trainer"):
        train_with({**cfg, "output_dir": str(tmp_path / "o2"), "dataset_dir": str(data_dir)})
    assert "Loading tokenized data from tokenized_path" in caplog.text


# ---- zerotune check --------------------------------------------------------------------------------------------
def test_check_prints_steps_warns_on_oversized_steps_and_names_the_zero_stage(tiny_model_dir, data_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tiny_model_dir, data_dir, tmp_path / "o", per_device_train_batch_size=8,
                                              packing=True, cutoff_len=64,
                                              deepspeed=str(ROOT / "ds_configs/ds_z3_offload_config.json"))))
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "check", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "NNODES": "2", "NPROC_PER_NODE": "8"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "ZeRO-3 with optimizer and param offload" in out
    import re

    rows = int(re.search(r"packed into (\d+) rows", out).group(1))
    assert f"steps an epoch   1 optimizer steps over {rows} packed rows" in out
    assert f"WARNING          one step takes 128 packed rows but the data has only {rows}" in out
    assert "on GPUs each device's batch of 8 runs in one pass" in out
    assert "~" in out and "real tokens" in out


def test_zero3_counts_parameters_from_their_full_shapes():
    import torch

    from trainer.model import adapters

    class Partitioned(torch.nn.Parameter):
        pass

    model = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.ds_numel = p.numel()  # what ZeRO-3 leaves: the full size here, an empty local tensor
        p.data = torch.empty(0)
    args = type("F", (), {"finetuning_type": "full"})()
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    adapters.logger.addHandler(handler)
    adapters.logger.setLevel(logging.INFO)
    try:
        adapters.prepare_trainable(model, args, None, is_trainable=True)
    finally:
        adapters.logger.removeHandler(handler)
    assert any("Trainable parameters: 15 of 15" in r.getMessage() for r in records)

"""YAML + overrides -> typed config; every bad input names the key and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.options import parse_override
from trainer.run import build_config, load_config
from trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _base(tmp_path, **kw):
    return {"model_name_or_path": "m", "dataset": "a", "do_train": True, "output_dir": str(tmp_path / "out"), **kw}


def test_overrides_are_typed(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model_name_or_path: m\ndataset: a\ndo_train: true\nlearning_rate: 1.0e-4\noutput_dir: %s\n" % (tmp_path / "o"))
    cfg = load_config(cfg_file, ["learning_rate=1e-5", "per_device_train_batch_size=4", "bf16=false",
                                 "dataset=x,y", "lora_target=q_proj,v_proj", "num_train_epochs=2",
                                 "max_grad_norm=0.5", "eval_strategy=no", "save_steps=50"])
    assert cfg.training.learning_rate == pytest.approx(1e-5)
    assert cfg.training.per_device_train_batch_size * cfg.passes == 4  # on CPU run as passes of 1 row
    assert cfg.training.bf16 is False
    assert cfg.data.dataset == ["x", "y"]
    assert cfg.finetuning.lora_target == ["q_proj", "v_proj"]
    assert cfg.training.num_train_epochs == 2.0
    assert cfg.training.max_grad_norm == 0.5
    assert cfg.training.eval_strategy == "no"
    assert cfg.training.save_steps == 50


def test_seed_keys_are_honoured(tmp_path):
    cfg = build_config(_base(tmp_path, warmup_ratio=0.1, ddp_timeout=180000000, lr_scheduler_type="cosine",
                             gradient_accumulation_steps=8, val_size=0.1, eval_strategy="steps", eval_steps=500,
                             per_device_eval_batch_size=1, overwrite_cache=True, preprocessing_num_workers=16,
                             plot_loss=True, overwrite_output_dir=True, cutoff_len=1024, max_samples=1000,
                             logging_steps=10, do_train=True, template="llama3", finetuning_type="lora"))
    t = cfg.training
    assert t.warmup_steps == pytest.approx(0.1)  # transformers 5: a float < 1 is a ratio
    assert t.ddp_timeout == 180000000 and t.lr_scheduler_type == "cosine" and t.eval_steps == 500
    assert cfg.data.packing is False and cfg.data.padding_free  # sft: padding-free batches, as many steps as LF
    assert cfg.engine.overwrite_output_dir and cfg.engine.plot_loss
    assert cfg.checkpointing_auto  # decided from the memory estimate once the model is loaded
    assert build_config(_base(tmp_path, disable_gradient_checkpointing=True)).training.activation_checkpointing is False


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_config(_base(tmp_path, learning_rte=1e-4))
    assert "learning_rte" in str(err.value) and "learning_rate" in str(err.value)


@pytest.mark.parametrize("key,value,expect", [
    ("learning_rate", "fast", "not a number"),
    ("per_device_train_batch_size", 1.5, "not an integer"),
    ("bf16", "maybe", "not a boolean"),
    ("finetuning_type", "qlora", "lora, freeze, full"),
    ("lr_scheduler_type", "cosin", "cosine"),
    ("eval_strategy", "step", "steps"),
    ("stage", "sftt", "sft"),
    ("val_size", -1, "val_size"),
])
def test_bad_values_name_key_value_and_choices(tmp_path, key, value, expect):
    with pytest.raises(ConfigError) as err:
        build_config(_base(tmp_path, **{key: value}))
    assert key in str(err.value) and expect in str(err.value)


def test_fsdp_is_read_by_zerotune_not_handed_to_accelerate(tmp_path):
    from trainer.engine.options import FSDPOptions

    cfg = build_config(_base(tmp_path, fsdp="shard_grad_op auto_wrap",
                             fsdp_config={"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}))
    assert cfg.fsdp == FSDPOptions(reshard_after_forward=False, layer_classes=["LlamaDecoderLayer"])
    assert not cfg.training.fsdp  # accelerate's FSDP would silently train plain DDP on CPU
    assert build_config(_base(tmp_path, fsdp=True)).fsdp == FSDPOptions()
    assert build_config(_base(tmp_path, fsdp=["full_shard", "offload"])).fsdp.cpu_offload
    assert build_config(_base(tmp_path, fsdp=False)).fsdp is None


@pytest.mark.parametrize("extra,expect", [
    ({"fsdp": "hybrid_shard"}, "fsdp: 'hybrid_shard' is not supported"),
    ({"fsdp": "full_shard shard_grad_op"}, "not both"),
    ({"fsdp": "full_shard", "deepspeed": "ds_configs/ds_z3_config.json"}, "fsdp or deepspeed"),
    ({"fsdp": "full_shard", "fsdp_config": {"transformer_layer_cls": "X"}}, "transformer_layer_cls_to_wrap"),
    ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "fsdp_config.version"),
    ({"fsdp": "full_shard", "skip_nonfinite_batches": True}, "skip_nonfinite_batches"),
])
def test_bad_fsdp_settings_name_the_key(tmp_path, extra, expect):
    with pytest.raises(ConfigError, match=expect):
        build_config(_base(tmp_path, **extra))


def test_yaml_no_is_the_string_no(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model_name_or_path: m\ndataset: a\ndo_train: true\noutput_dir: {tmp_path}/o\neval_strategy: no\n")
    assert load_config(cfg_file).training.eval_strategy == "no"


def test_yaml_syntax_error_names_line(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("model_name_or_path: m\ndataset: [a\nlearning_rate: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file)
    assert "bad.yaml" in str(err.value) and "line" in str(err.value)


def test_override_parsing():
    assert parse_override("learning_rate=1e-5") == ("learning_rate", "1e-5")
    assert parse_override("bf16=true") == ("bf16", True)
    with pytest.raises(ConfigError):
        parse_override("learning_rate")


def test_output_dir_holding_a_run_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-10").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        build_config(_base(tmp_path, do_train=True))
    assert "overwrite_output_dir" in str(err.value) and str(out) in str(err.value)
    build_config(_base(tmp_path, do_train=True, overwrite_output_dir=True))
    build_config(_base(tmp_path, do_train=True, resume_from_checkpoint="true"))


def test_cli_reports_config_errors_without_traceback(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model_name_or_path: m\ndataset: a\noutput_dir: {tmp_path}/o\nlerning_rate: 1\n")
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", str(cfg_file)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "lerning_rate" in proc.stderr and "learning_rate" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_version_and_help():
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "version"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("zerotune ")
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "zerotune train" in out.stdout


def test_forward_batch_size_splits_the_batch_and_names_bad_values(tmp_path):
    import json

    # auto on CPU: packed rows one a pass; a padding-free batch (the sft default) is one row already.
    cfg = build_config(_base(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2, packing=True))
    assert (cfg.training.per_device_train_batch_size, cfg.training.gradient_accumulation_steps, cfg.passes) == (1, 12, 6)
    cfg = build_config(_base(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2))
    assert (cfg.training.per_device_train_batch_size, cfg.training.gradient_accumulation_steps, cfg.passes) == (6, 2, 1)
    cfg = build_config(_base(tmp_path, per_device_train_batch_size=6, forward_batch_size=3))
    assert (cfg.training.per_device_train_batch_size, cfg.training.gradient_accumulation_steps, cfg.passes) == (3, 2, 2)
    cfg = build_config(_base(tmp_path, per_device_train_batch_size=6, forward_batch_size=16))
    assert (cfg.training.per_device_train_batch_size, cfg.passes) == (6, 1)
    for value, words in ((4, "does not divide per_device_train_batch_size: 6"), ("fast", "neither auto nor"),
                         (0, "neither auto nor")):
        with pytest.raises(ConfigError, match="forward_batch_size") as err:
            build_config(_base(tmp_path, per_device_train_batch_size=6, forward_batch_size=value))
        assert words in str(err.value)
    # A DeepSpeed config that fixes the batch shape is left as written under auto, refused when asked for.
    # (_split_batch itself: TrainingArguments with deepspeed would start a process group inside pytest.)
    from trainer.engine.training_args import split_batch

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 6, "gradient_accumulation_steps": 1}))
    values = {"per_device_train_batch_size": 6, "deepspeed": str(ds)}
    split_batch(values, "auto", whole=False)
    assert values == {"per_device_train_batch_size": 6, "deepspeed": str(ds)}
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu, gradient_accumulation_steps"):
        split_batch(values, "2", whole=False)
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}))
    split_batch(values, "auto", whole=False)
    assert (values["per_device_train_batch_size"], values["gradient_accumulation_steps"]) == (1, 6)
    values = {"per_device_train_batch_size": 6}
    split_batch(values, "auto", whole=True)  # GPU, or a padding-free batch: the whole batch a pass
    assert values == {"per_device_train_batch_size": 6}


def test_a_refused_deepspeed_config_leaves_the_environment_alone(tmp_path, monkeypatch):
    """DeepSpeed's one-process rendezvous is process-wide (RANK, WORLD_SIZE, MASTER_PORT): set only for a config that
    passed every check, right before TrainingArguments start DeepSpeed. A refused config leaving it behind made every
    later run in the same process (and its subprocesses) join a process group on a port already taken."""
    import os

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="Set fsdp or deepspeed, not both"):
        build_config(_base(tmp_path, deepspeed="ds_configs/ds_z2_config.json", fsdp="full_shard"))
    with pytest.raises(ConfigError, match="forward_batch_size"):
        build_config(_base(tmp_path, deepspeed={"train_micro_batch_size_per_gpu": 4}, forward_batch_size="2",
                           per_device_train_batch_size=4))
    assert not any(k in os.environ for k in ("WORLD_SIZE", "MASTER_PORT"))

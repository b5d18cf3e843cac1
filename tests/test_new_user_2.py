"""Found trying zerotune as a new user coming from LLaMA-Factory, second round (issue 30): each item failed before."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import base_config, train_with
from trainer.errors import ConfigError
from trainer.run import build_config

ROOT = Path(__file__).resolve().parents[1]


# 1. a key of another stage: warned, ignored, kept -------------------------------------------------------------------
def test_a_yaml_toggled_from_dpo_to_rm_keeps_its_pref_beta_and_runs(tiny_model_dir, tmp_path, caplog):
    pairs = [{"instruction": f"Pick {i}", "input": "", "chosen": "good answer", "rejected": "bad"} for i in range(8)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.json").write_text(json.dumps(pairs))
    (data / "dataset_info.json").write_text(json.dumps({"pairs": {"file_name": "pairs.json", "ranking": True,
                                                                  "columns": {"prompt": "instruction", "query": "input",
                                                                              "chosen": "chosen",
                                                                              "rejected": "rejected"}}}))
    out = tmp_path / "rm"
    cfg = base_config(tiny_model_dir, data, out, stage="rm", dataset="pairs", max_steps=1, pref_beta=0.1,
                      pref_loss="sigmoid")
    with caplog.at_level("WARNING"):
        results, _ = train_with(cfg)
    assert results["global_step"] == 1 if "global_step" in results else (out / "value_head.safetensors").is_file()
    for key in ("pref_beta", "pref_loss"):
        assert f"Ignoring {key}: a key of stage" in caplog.text and "this run's stage is rm" in caplog.text
    saved = yaml.safe_load((out / "zerotune_config.yaml").read_text())
    assert saved["pref_beta"] == 0.1 and saved["pref_loss"] == "sigmoid"  # the run's config as given


def test_a_key_of_no_stage_keeps_its_did_you_mean(tiny_model_dir, data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown key 'pref_bta'.*Did you mean: pref_beta"):
        build_config(base_config(tiny_model_dir, data_dir, tmp_path / "o", pref_bta=0.1))


# 4. a mapped column is used or refused by name -----------------------------------------------------------------------
@pytest.mark.parametrize("role,message", [
    ("images", "maps a 'images' column .'images'., and multimodal inputs"),
    ("videos", "multimodal inputs"),
    ("imgs", r"unknown column role 'imgs'. Did you mean: images\?"),
])
def test_a_mapped_column_zerotune_does_not_use_is_refused_by_name(tiny_model_dir, tmp_path, role, message):
    rows = [{"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant",
                                                                                "content": "A cat."}],
             "images": ["cat.png"], "videos": [], "tools": "[]", "imgs": []}] * 4
    data = tmp_path / "data"
    data.mkdir()
    (data / "mm.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"mm": {
        "file_name": "mm.json", "formatting": "sharegpt", "columns": {"messages": "messages", role: role},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    with pytest.raises(ConfigError, match=message):
        train_with(base_config(tiny_model_dir, data, tmp_path / "o", dataset="mm", max_steps=1))


# 7. key=value overrides after --message ----------------------------------------------------------------------------
def test_chat_takes_overrides_after_the_message(tiny_model_dir, tmp_path):
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "template": "chatml",
                                   "do_sample": False}))
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "chat", str(cfg), "--message", "hi",
                           "max_new_tokens=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()  # three tokens of the tiny model's answer


# 9. empty data files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("empty.json", "[]"), ("blank.json", "\n  \n")])
def test_an_empty_data_file_is_named_with_the_reason(tiny_model_dir, tmp_path, name, text):
    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_text(text)
    (data / "dataset_info.json").write_text(json.dumps({"e": {"file_name": name}}))
    with pytest.raises(ConfigError, match=rf"dataset 'e': file .*{name} holds no rows"):
        train_with(base_config(tiny_model_dir, data, tmp_path / "o", dataset="e", max_steps=1))


def test_a_csv_of_only_a_header_holds_no_rows(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "h.csv").write_text("instruction,input,output\n")
    (data / "dataset_info.json").write_text(json.dumps({"h": {"file_name": "h.csv"}}))
    with pytest.raises(ConfigError, match=r"dataset 'h': .*h.csv holds no rows"):
        train_with(base_config(tiny_model_dir, data, tmp_path / "o", dataset="h", max_steps=1))


# 10. small ones ----------------------------------------------------------------------------------------------------
def test_stage_grpo_is_a_stage_and_asks_for_its_rewards(tiny_model_dir, data_dir, tmp_path):
    """stage: grpo is TRL's GRPO (tests/test_grpo.py); without reward_funcs it says what it needs."""
    with pytest.raises(ConfigError, match=r"stage grpo needs reward_funcs"):
        build_config(base_config(tiny_model_dir, data_dir, tmp_path / "o", stage="grpo"))


def test_the_load_line_counts_zero3_partitioned_parameters_whole(tiny_model_dir, caplog):
    """Under ZeRO-3 a loaded parameter holds nothing locally (numel 0) and its size in ds_numel: the load line counts
    whole parameters, as the one parameter count does."""
    import torch

    from trainer.model import loading
    from trainer.model.options import ModelArguments
    from trainer.model.params import human_count, parameter_count

    real = loading.parameter_count

    def partitioned(params):
        params = list(params)
        for p in params:
            p.ds_numel = p.numel()
            p.data = torch.empty(0)
        return real(params)

    loading.parameter_count = partitioned
    try:
        with caplog.at_level("INFO"):
            model = loading.load_causal_lm(ModelArguments(model_name_or_path=str(tiny_model_dir)),
                                           dtype=torch.float32, attention="sdpa")
    finally:
        loading.parameter_count = real
    assert all(p.numel() == 0 for p in model.parameters())
    count = parameter_count(model.parameters())
    assert count > 1000 and f"(LlamaForCausalLM, {human_count(count)} parameters)" in caplog.text


def test_overwriting_keeps_only_the_last_previous_run(tiny_model_dir, data_dir, tmp_path, caplog):
    out = tmp_path / "o"
    cfg = base_config(tiny_model_dir, data_dir, out, max_steps=2, save_steps=2)
    train_with(cfg)
    for _ in range(2):
        train_with({**cfg, "overwrite_output_dir": True})
    aside = sorted(out.glob("previous-run-*"))
    assert len(aside) == 1 and [p.name for p in aside[0].iterdir()] == ["checkpoint-2"]
    with caplog.at_level("WARNING", logger="trainer"):
        train_with({**cfg, "overwrite_output_dir": True})
    assert f"deleted {aside[0].name}, set aside by an earlier overwrite" in caplog.text
    assert len(list(out.glob("previous-run-*"))) == 1


def test_a_ppo_critic_is_no_reward_model(tmp_path):
    """ppo saves its critic under the names TRL and LLaMA-Factory give a reward head; the file's metadata says which
    it is, so a critic is never taken for a reward model (reward_model) nor exported as one."""
    from trainer.model import value_head
    from trainer.stages.ppo import PPO
    from trainer.stages.reward import RM
    from trainer.stages.rewards import load_value_head

    assert (PPO.head_role, RM.head_role) == ("critic", "reward")
    for role in value_head.ROLES:
        value_head.save(value_head.ValueHead(8), str(tmp_path / role), role=role)
        assert value_head.saved_role(str(tmp_path / role / value_head.FILE)) == role
    assert load_value_head(str(tmp_path / "reward"), 8) is not None
    with pytest.raises(ConfigError, match=r"holds a ppo run's critic"):
        load_value_head(str(tmp_path / "critic"), 8)


def test_export_leaves_a_ppo_critic_out_and_keeps_a_reward_head(tiny_model_dir, data_dir, tmp_path):
    from trainer import inference
    from trainer.model import value_head
    from trainer.run import load_inference_config

    adapter = tmp_path / "adapter"
    train_with(base_config(tiny_model_dir, data_dir, adapter, max_steps=1))
    hidden = json.loads((Path(tiny_model_dir) / "config.json").read_text())["hidden_size"]
    for role, kept in (("critic", False), ("reward", True)):
        value_head.save(value_head.ValueHead(hidden), str(adapter), role=role)
        out = tmp_path / f"export-{role}"
        cfg = load_inference_config(None, [f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={adapter}",
                                           "template=chatml", f"export_dir={out}"])
        inference.export(cfg)
        assert (out / value_head.FILE).is_file() == kept, role

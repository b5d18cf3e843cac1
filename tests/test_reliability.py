"""No lost work: atomic checkpoints, preemption, exact resume, clear errors for bad input, no leaked secrets."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tiny import base_config, train_with
from trainer.errors import ConfigError, TrainingHalted

ROOT = Path(__file__).resolve().parents[1]


def _drive(tmp_path: Path, cfg: dict, patch: str, *overrides: str) -> subprocess.CompletedProcess:
    """Run `zerotune train` in a child process after applying `patch` (test-side fault injection)."""
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    script = textwrap.dedent(f"""
        import os, signal, sys
        from trainer.engine.trainer import ZeroTrainer
        {textwrap.indent(textwrap.dedent(patch), '        ').strip()}
        from trainer.cli import main
        sys.exit(main(["train", {str(cfg_file)!r}, *{list(overrides)!r}]))
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def _cfg(tiny_model_dir, data_dir, out, **kw):
    settings = dict(per_device_train_batch_size=1, lora_dropout=0.1, lr_scheduler_type="cosine", warmup_steps=2,
                    max_steps=8)
    return base_config(tiny_model_dir, data_dir, out, **{**settings, **kw})


def test_kill_during_checkpoint_save_leaves_previous_checkpoint(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, data_dir, out, save_steps=2)
    patch = """
        original = ZeroTrainer._save_rng_state
        def dying(self, output_dir):  # model and optimizer are written, RNG and state are not
            if self.state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, output_dir)
        ZeroTrainer._save_rng_state = dying
    """
    proc = _drive(tmp_path, cfg, patch)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / ".staging" / "checkpoint-4").is_dir()  # the half-written one never became visible

    proc = _drive(tmp_path, cfg, "", "resume_from_checkpoint=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint-2 (the newest complete checkpoint)" in proc.stderr
    assert "Removed incomplete checkpoint(s) checkpoint-4" in proc.stderr
    assert not (out / ".staging").exists()

    straight = tmp_path / "straight"
    train_with(_cfg(tiny_model_dir, data_dir, straight, save_steps=100))
    resumed, reference = _losses(out), _losses(straight)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(3, 9):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


def test_sigterm_saves_a_resumable_checkpoint(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, data_dir, out, save_steps=100)
    patch = """
        original = ZeroTrainer.training_step
        def step(self, *args, **kwargs):
            if self.state.global_step == 3 and not getattr(self, "_sent", False):
                self._sent = True
                os.kill(os.getpid(), signal.SIGTERM)  # what a cluster scheduler sends before preemption
            return original(self, *args, **kwargs)
        ZeroTrainer.training_step = step
    """
    proc = _drive(tmp_path, cfg, patch)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "stopped by SIGTERM" in proc.stderr and "resume_from_checkpoint: true" in proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    proc = _drive(tmp_path, cfg, "", "resume_from_checkpoint=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert max(_losses(out)) == 8


def test_exact_resume(tiny_model_dir, data_dir, tmp_path):
    """2N steps straight == N steps, then resume, then N more: data order, packing, dropout RNG, LR schedule."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_with(_cfg(tiny_model_dir, data_dir, straight, save_steps=100))
    train_with(_cfg(tiny_model_dir, data_dir, split, save_steps=4))
    # continue from the step-4 checkpoint in a fresh folder, as a resumed job would
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(split / "checkpoint-4", resumed / "checkpoint-4")
    train_with(_cfg(tiny_model_dir, data_dir, resumed, save_steps=100, resume_from_checkpoint="true"))
    a, b = _losses(straight), _losses(resumed)
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    state = json.loads((resumed / "trainer_state.json").read_text())
    lr = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
    ref = {e["step"]: e["learning_rate"] for e in json.loads((straight / "trainer_state.json").read_text())[
        "log_history"] if "learning_rate" in e}
    assert all(lr[s] == pytest.approx(ref[s]) for s in range(5, 9))


def test_save_total_limit_keeps_the_newest(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    train_with(_cfg(tiny_model_dir, data_dir, out, save_steps=2, save_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]


# ---- the bad-input table: each message names the key, file or row --------------------------------------

def test_missing_model_folder(data_dir, tmp_path):
    cfg = base_config(tmp_path / "no-such-model", data_dir, tmp_path / "o")
    with pytest.raises(ConfigError, match="no-such-model.*no such folder"):
        train_with(cfg)


def test_too_many_bad_rows_is_an_error_naming_rows(tiny_model_dir, tmp_path):
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "", "output": "a"}, {"instruction": "q", "output": None}]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(rows))
    (tmp_path / "d" / "dataset_info.json").write_text(json.dumps({"alpaca": {"file_name": "a.json"}}))
    cfg = base_config(tiny_model_dir, tmp_path / "d", tmp_path / "o")
    with pytest.raises(ConfigError) as err:
        train_with(cfg)
    msg = str(err.value)
    assert "2 of 3 rows are malformed" in msg and "a.json) row 2: empty prompt" in msg and "row 3: empty response" in msg
    assert "max_bad_rows" in msg


def test_cutoff_policy_drop_counts_dropped(tiny_model_dir, data_dir, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="trainer"):
        train_with(base_config(tiny_model_dir, data_dir, tmp_path / "o", cutoff_len=60, cutoff_policy="drop",
                               max_steps=1))
    assert "longer than cutoff_len=60 (cutoff_policy: drop)" in caplog.text


def _nan_model(tmp_path, tiny_model_dir):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(folder)
    return folder


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tiny_model_dir, data_dir, tmp_path):
    folder = _nan_model(tmp_path, tiny_model_dir)
    cfg = base_config(folder, data_dir, tmp_path / "o", max_steps=2)
    with pytest.raises(TrainingHalted, match="non-finite loss .* at step 1 .*skip_nonfinite_batches"):
        train_with(cfg)
    results, state = train_with({**cfg, "output_dir": str(tmp_path / "o2"), "skip_nonfinite_batches": True})
    # Every micro-batch is nan (the model's final norm is): 2 steps of one padding-free pass each, all skipped.
    assert results["skipped_nonfinite_batches"] == 2 and state["global_step"] == 2
    import torch
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "o2" / "adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


def test_no_secret_reaches_outputs_or_wandb(tiny_model_dir, data_dir, tmp_path):
    secret = "hf_FAKEzerotuneSECRET123"
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_dir, out, max_steps=2, save_steps=1, report_to="wandb",
                      hub_token=secret, hf_hub_token=secret)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "HF_TOKEN": secret,
           "WANDB_API_KEY": "0" * 40}
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", str(cfg_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert secret not in proc.stdout + proc.stderr
    files = [p for p in list(out.rglob("*")) + list((tmp_path / "wandb").rglob("*")) if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "training_args.bin" for p in files)
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaks
    saved = yaml.safe_load((out / "zerotune_config.yaml").read_text())
    assert saved["hub_token"] == "<redacted>" and saved["learning_rate"] == cfg["learning_rate"]


def test_rotation_keeps_the_checkpoint_just_written_even_below_stale_ones(tmp_path):
    import time

    from trainer.engine.checkpoints import rotate

    for step in (900, 1000, 100):  # an overwritten run left 900 and 1000; this run just wrote 100
        (tmp_path / f"checkpoint-{step}").mkdir()
        time.sleep(0.01)
    deleted = rotate(str(tmp_path), 2, newest=str(tmp_path / "checkpoint-100"))
    assert deleted == [str(tmp_path / "checkpoint-900")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100", "checkpoint-1000"]


def test_resume_false_still_protects_an_existing_run(tmp_path):
    from trainer.run import build_config

    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        build_config({"model_name_or_path": "m", "dataset": "a", "do_train": True,
                      "output_dir": str(tmp_path / "out"), "resume_from_checkpoint": False})


def test_val_size_with_eval_dataset_is_refused(tmp_path):
    from trainer.run import build_config

    with pytest.raises(ConfigError, match="val_size or eval_dataset"):
        build_config({"model_name_or_path": "m", "dataset": "a", "eval_dataset": "b", "val_size": 0.1,
                      "do_train": True, "output_dir": str(tmp_path / "o")})


def test_models_that_rescale_logits_take_the_full_logits_path(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from trainer.model.wrapper import ModelWrapper

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert ModelWrapper(model).chunked
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.logit_scale = 0.0625  # what Cohere applies after its head
    assert not ModelWrapper(model).chunked


def test_streaming_column_typo_is_an_error(tiny_model_dir, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (tmp_path / "d" / "dataset_info.json").write_text(json.dumps({"alpaca": {"file_name": "a.jsonl"}}))
    cfg = base_config(tiny_model_dir, tmp_path / "d", tmp_path / "o", streaming=True, max_steps=2)
    with pytest.raises(Exception, match="column 'instruction' not found"):
        train_with(cfg)

"""Two CPU processes under the DeepSpeed launcher (gloo) give the losses and eval_loss of one process for the
same global batch, under ZeRO-0, 2 and 3; ZeRO-3 saves weights that plain from_pretrained loads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import base_config, train_with

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def _history(out: Path, key: str) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e[key] for e in state["log_history"] if key in e and "train_runtime" not in e]


def _deepspeed(cfg: dict, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    cfg_file = tmp_path / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000),
                           "launch/train.py", "--config", str(cfg_file)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_processes_match_one(stage, tiny_model_dir, data_dir, tmp_path):
    common = dict(finetuning_type="full", max_steps=3, packing=False, val_size=4, do_eval=True, learning_rate=1e-2)
    single = tmp_path / "one"  # the reference: one plain process, no DeepSpeed
    train_with(base_config(tiny_model_dir, data_dir, single, per_device_train_batch_size=4,
                           per_device_eval_batch_size=4, **common))
    double = tmp_path / "two"
    proc = _deepspeed(base_config(tiny_model_dir, data_dir, double, per_device_train_batch_size=2,
                                  per_device_eval_batch_size=1, **common,
                                  deepspeed=str(ROOT / f"ds_configs/ds_z{stage}_config.json")), tmp_path, f"z{stage}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _history(double, "loss") == pytest.approx(_history(single, "loss"), rel=1e-4)
    one = json.loads((single / "all_results.json").read_text())
    two = json.loads((double / "all_results.json").read_text())
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    if stage == 3:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(double)
        ev = train_with(base_config(reloaded.name_or_path, data_dir, tmp_path / "ev", do_train=False, do_eval=True,
                                    val_size=4, finetuning_type="full", per_device_eval_batch_size=4))[0]
        assert ev["eval_loss"] == pytest.approx(two["eval_loss"], rel=1e-4)


def test_zero3_lora_saves_a_loadable_adapter(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "lora"
    proc = _deepspeed(base_config(tiny_model_dir, data_dir, out, max_steps=2, learning_rate=1e-2,
                                  deepspeed=str(ROOT / "ds_configs/ds_z3_config.json")), tmp_path, "z3lora")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained, not the zero init
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


def test_zero2_optimizer_offload(tiny_model_dir, data_dir, tmp_path):
    """DeepSpeed's CPU Adam is built just in time on first use (minutes, then cached)."""
    common = dict(finetuning_type="full", max_steps=3, packing=False, learning_rate=1e-2)
    single = tmp_path / "one"
    train_with(base_config(tiny_model_dir, data_dir, single, per_device_train_batch_size=4, **common))
    out = tmp_path / "offload"
    proc = _deepspeed(base_config(tiny_model_dir, data_dir, out, per_device_train_batch_size=2, **common,
                                  deepspeed=str(ROOT / "ds_configs/ds_z2_offload_config.json")), tmp_path, "z2off")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _history(out, "loss") == pytest.approx(_history(single, "loss"), rel=1e-4)


def test_sigterm_on_one_rank_stops_all_ranks_at_a_checkpoint(tiny_model_dir, data_dir, tmp_path):
    """Only rank 1 is signalled; the ranks agree at the step boundary, save one checkpoint together, and resume."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"""
import os, runpy, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from trainer.engine.trainer import ZeroTrainer
original = ZeroTrainer.training_step
def step(self, *args, **kwargs):
    if self.state.global_step == 3 and os.environ.get("RANK") == "1" and not getattr(self, "_sent", False):
        self._sent = True
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *args, **kwargs)
ZeroTrainer.training_step = step
sys.argv = [{str(ROOT / 'launch/train.py')!r}] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_dir, out, per_device_train_batch_size=1, max_steps=8, save_steps=100,
                      deepspeed=str(ROOT / "ds_configs/ds_z2_config.json"))
    cfg_file = tmp_path / "sig.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(31500 + os.getpid() % 1000), str(driver),
           "--config", str(cfg_file)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 128 + 15, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    proc = _deepspeed({**cfg, "resume_from_checkpoint": "true"}, tmp_path, "sig-resume")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8

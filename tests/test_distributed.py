"""Two CPU processes (gloo) give the losses and eval_loss of one process for the same global batch, under
DeepSpeed ZeRO-0, 2 and 3 and under FSDP2 (torchrun); FSDP really shards; ZeRO-3 and FSDP save weights that plain
from_pretrained loads, and resume exactly."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tiny import base_config, train_with

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def _history(out: Path, key: str) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e[key] for e in state["log_history"] if key in e and "train_runtime" not in e]


def _losses_by_step(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def _launch(launcher: list[str], cfg: dict, tmp_path: Path, name: str, script: str) -> subprocess.CompletedProcess:
    cfg_file = tmp_path / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launcher, script, "--config", str(cfg_file)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)


def _deepspeed(cfg: dict, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return _launch([launcher, "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000)], cfg, tmp_path,
                   name, "launch/train.py")


# Test-side instrumentation: at the first training step each rank writes down what it really trains.
RECORD_SHARDS = """
import json, os, runpy, sys
from torch.distributed.tensor import DTensor
from trainer.engine.trainer import ZeroTrainer
original = ZeroTrainer.training_step
def step(self, model, *args, **kwargs):
    if not getattr(self, "_recorded", False):
        self._recorded = True
        params = {n: {"dtensor": isinstance(p, DTensor), "placements": [repr(x) for x in getattr(p, "placements", ())],
                      "local": (p.to_local() if isinstance(p, DTensor) else p).numel(), "global": p.numel()}
                  for n, p in model.named_parameters() if p.requires_grad}
        with open(os.path.join(self.args.output_dir, f"shards-rank{os.environ['RANK']}.json"), "w") as f:
            json.dump({"world": int(os.environ["WORLD_SIZE"]), "params": params}, f)
    return original(self, model, *args, **kwargs)
ZeroTrainer.training_step = step
sys.argv = ["launch/train.py"] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _step_driver(tmp_path: Path, before_each_step: str) -> Path:
    """launch/train.py behind a script that runs `before_each_step` (Python, with `self`, `os`, `signal` and `time`
    at hand) at the start of every training step of every rank: how the tests below signal a rank mid-run."""
    driver = tmp_path / "driver.py"
    body = "\n".join("    " + line for line in before_each_step.strip().splitlines())
    driver.write_text(f"""
import os, runpy, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from trainer.engine.trainer import ZeroTrainer
original = ZeroTrainer.training_step
def step(self, *args, **kwargs):
{body}
    return original(self, *args, **kwargs)
ZeroTrainer.training_step = step
sys.argv = [{str(ROOT / 'launch/train.py')!r}] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    return driver


def _deepspeed_command(script: Path, cfg: dict, tmp_path: Path, name: str, port: int) -> list[str]:
    cfg_file = tmp_path / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", "2", "--master_port", str(port + os.getpid() % 1000), str(script), "--config",
            str(cfg_file)]


def _torchrun(cfg: dict, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    driver = tmp_path / "record_shards.py"
    driver.write_text(RECORD_SHARDS)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(30500 + os.getpid() % 1000)]
    return _launch(launcher, cfg, tmp_path, name, str(driver))


def _trained_shards(out: Path) -> list[dict]:
    """Per rank: the trained parameters as DTensors sharded over 2 ranks (fails if FSDP was not applied)."""
    ranks = [json.loads((out / f"shards-rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world"] == 2 and rank["params"]
        for name, p in rank["params"].items():
            assert p["dtensor"] and p["placements"] == ["Shard(dim=0)"], name
    for name, p in ranks[0]["params"].items():
        assert p["local"] + ranks[1]["params"][name]["local"] == p["global"], name  # each rank holds its half
        assert p["local"] < p["global"], name
    return ranks


FULL = dict(finetuning_type="full", max_steps=3, packing=False, val_size=4, do_eval=True, learning_rate=1e-2)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_processes_match_one(stage, tiny_model_dir, data_dir, tmp_path):
    single = tmp_path / "one"  # the reference: one plain process, no DeepSpeed
    train_with(base_config(tiny_model_dir, data_dir, single, per_device_train_batch_size=4,
                           per_device_eval_batch_size=4, **FULL))
    double = tmp_path / "two"
    # DeepSpeed's CPU all-reduce leaves a 66 MB /dev/shm file a rank, named by the port (engine/shm_buffers.py)
    leftovers = (lambda: list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{29500 + os.getpid() % 1000}_*")))
    for stale in leftovers():  # an earlier DeepSpeed's run on this port
        stale.unlink()
    proc = _deepspeed(base_config(tiny_model_dir, data_dir, double, per_device_train_batch_size=2,
                                  per_device_eval_batch_size=1, **FULL,
                                  deepspeed=str(ROOT / f"ds_configs/ds_z{stage}_config.json")), tmp_path, f"z{stage}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all-reduce buffer: its /dev/shm name removed" in proc.stderr and not leftovers()
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
    driver = _step_driver(tmp_path, """
if self.state.global_step == 3 and os.environ.get("RANK") == "1" and not getattr(self, "_sent", False):
    self._sent = True
    os.kill(os.getpid(), signal.SIGTERM)
""")
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_dir, out, per_device_train_batch_size=1, max_steps=8, save_steps=100,
                      deepspeed=str(ROOT / "ds_configs/ds_z2_config.json"))
    cmd = _deepspeed_command(driver, cfg, tmp_path, "sig", 31500)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 128 + 15, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    proc = _deepspeed({**cfg, "resume_from_checkpoint": "true"}, tmp_path, "sig-resume")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8


def test_fsdp_two_processes_match_one_and_really_shard(tiny_model_dir, data_dir, tmp_path):
    single = tmp_path / "one"
    train_with(base_config(tiny_model_dir, data_dir, single, per_device_train_batch_size=4,
                           per_device_eval_batch_size=4, **FULL))
    double = tmp_path / "two"
    proc = _torchrun(base_config(tiny_model_dir, data_dir, double, per_device_train_batch_size=2,
                                 per_device_eval_batch_size=1, fsdp="full_shard auto_wrap", **FULL), tmp_path, "fsdp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FSDP: weights loaded on rank 0 only, broadcast at sharding" in proc.stderr
    shards = _trained_shards(double)
    weight = "model.layers.0.mlp.down_proj.weight"
    assert shards[0]["params"][weight]["local"] == shards[0]["params"][weight]["global"] // 2
    assert _history(double, "loss") == pytest.approx(_history(single, "loss"), rel=1e-4)
    # clipping and its reported norm see the whole gradient, not this rank's shard
    assert _history(double, "grad_norm") == pytest.approx(_history(single, "grad_norm"), rel=1e-4)
    one = json.loads((single / "all_results.json").read_text())
    two = json.loads((double / "all_results.json").read_text())
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(double)  # ordinary weights, gathered by rank 0
    ev = train_with(base_config(reloaded.name_or_path, data_dir, tmp_path / "ev", do_train=False, do_eval=True,
                                val_size=4, finetuning_type="full", per_device_eval_batch_size=4))[0]
    assert ev["eval_loss"] == pytest.approx(two["eval_loss"], rel=1e-5)


def test_fsdp_lora_matches_one_process_and_saves_a_loadable_adapter(tiny_model_dir, data_dir, tmp_path):
    """shard_grad_op with gradient checkpointing: the adapters, applied before sharding, are sharded too; every
    process loads the best checkpoint at the end."""
    lora = dict(max_steps=2, learning_rate=1e-2, packing=False, gradient_checkpointing=True, val_size=4)
    single = tmp_path / "one"
    train_with(base_config(tiny_model_dir, data_dir, single, per_device_train_batch_size=4, **lora))
    out = tmp_path / "lora"
    # "best" = the highest eval_loss, i.e. step 1's, so the end of the run must go back to it
    best = dict(do_eval=True, eval_strategy="steps", eval_steps=1, save_steps=1, per_device_eval_batch_size=1,
                load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    proc = _torchrun(base_config(tiny_model_dir, data_dir, out, per_device_train_batch_size=2, fsdp="shard_grad_op",
                                 **lora, **best), tmp_path, "fsdp-lora")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FSDP: weights loaded on rank 0 only, broadcast at sharding" in proc.stderr
    assert all("lora_" in name for name in _trained_shards(out)[0]["params"])
    assert _history(out, "loss") == pytest.approx(_history(single, "loss"), rel=1e-4)
    step1, step2 = _history(out, "eval_loss")[:2]
    assert step1 > step2 and json.loads((out / "all_results.json").read_text())["eval_loss"] == pytest.approx(step1)
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors.keys() == load_file(single / "adapter_model.safetensors").keys()
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained, not the zero init
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


def test_fsdp_in_one_process_warns_and_trains(tiny_model_dir, data_dir, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="trainer"):
        results, _ = train_with(base_config(tiny_model_dir, data_dir, tmp_path / "o", max_steps=1, fsdp="full_shard"))
    assert "fsdp is set but this is a single process" in caplog.text and results["train_loss"] > 0


@pytest.mark.parametrize("layout", ["zero3", "fsdp"])
def test_resume_matches_an_uninterrupted_run(layout, tiny_model_dir, data_dir, tmp_path):
    """2N steps straight == resume from the step-N checkpoint (weights, optimizer moments, LR schedule, data order)."""
    launch, extra = (_deepspeed, {"deepspeed": str(ROOT / "ds_configs/ds_z3_config.json")}) if layout == "zero3" \
        else (_torchrun, {"fsdp": "full_shard"})
    settings = dict(finetuning_type="full", per_device_train_batch_size=1, max_steps=4, save_steps=2,
                    learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=1, **extra)
    straight = tmp_path / "straight"
    proc = launch(base_config(tiny_model_dir, data_dir, straight, **settings), tmp_path, "straight")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = tmp_path / "resumed"  # a fresh folder holding only the step-2 checkpoint, as a restarted job sees it
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    proc = launch(base_config(tiny_model_dir, data_dir, resumed, resume_from_checkpoint="true", **settings),
                  tmp_path, "resumed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _losses_by_step(straight), _losses_by_step(resumed)
    assert sorted(b) == [1, 2, 3, 4]  # 1 and 2 come with the checkpoint's state; 3 and 4 trained after resuming
    assert [b[3], b[4]] == pytest.approx([a[3], a[4]], rel=1e-5)  # step 4 moved with the restored Adam moments


def _session_processes(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                pids.append(int(entry.name))
    return pids


def test_sigterm_to_the_deepspeed_runner_alone_checkpoints_and_leaves_nothing_running(tiny_model_dir, data_dir,
                                                                                      tmp_path):
    """What a scheduler or container runtime that signals only the main process does: the runner exits at once
    without passing the signal on; the workers notice their launcher is gone, save at the next step boundary and
    exit, and the launcher follows. Resume then finishes the run."""
    import signal
    import time

    marker = tmp_path / "reached-step-2"
    driver = _step_driver(tmp_path, f"""
time.sleep(0.2)  # steps of a tiny model are too quick to watch
if self.state.global_step == 2 and os.environ.get("RANK") == "0":
    open({str(marker)!r}, "w").close()
""")
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_dir, out, per_device_train_batch_size=1, max_steps=60, save_steps=1000,
                      deepspeed=str(ROOT / "ds_configs/ds_z2_config.json"))
    log = (tmp_path / "runner.log").open("w")
    runner = subprocess.Popen(_deepspeed_command(driver, cfg, tmp_path, "runner", 32500), cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert runner.poll() is None and time.time() < deadline, (tmp_path / "runner.log").read_text()[-3000:]
            time.sleep(0.2)
        os.kill(runner.pid, signal.SIGTERM)
        runner.wait(timeout=30)
        while _session_processes(runner.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not _session_processes(runner.pid), "workers or launcher still running after the runner exited"
    finally:
        for pid in _session_processes(runner.pid):
            os.kill(pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "runner.log").read_text()
    assert "DeepSpeed launcher" in text and "has exited" in text, text[-3000:]
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and 2 <= int(saved[0].name.split("-")[1]) < 60, (saved, text[-3000:])
    proc = _deepspeed({**cfg, "resume_from_checkpoint": "true"}, tmp_path, "runner-resume")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 60


@pytest.mark.parametrize("stage,kind,layout", [("dpo", "lora", "zero3"), ("rm", "full", "zero3"),
                                               ("dpo", "full", "zero3"), ("dpo", "freeze", "zero3"),
                                               ("dpo", "lora", "fsdp"), ("rm", "full", "fsdp"),
                                               ("dpo", "full", "fsdp"), ("dpo", "freeze", "fsdp"),
                                               ("dpo", "freeze", "zero2"), ("rm", "lora", "zero2"),
                                               ("rm", "full", "ddp")])
def test_pair_stages_two_processes_match_one(stage, kind, layout, tiny_model_dir, tmp_path):
    """The pair stages on the same engine: dpo's reference (LoRA adapters switched off), rm's value head (added
    after ZeRO-3 partitioned the model at load, or sharded with the root under FSDP) and the pair layout hold under
    sharded weights; 1 process and 2 give the same losses and metrics, and rm's value_head.safetensors is the same
    tensor. A full dpo run precomputes its reference log-probs (its sharded weights before the first step are the
    reference: no copy), the pass split over the processes; a freeze run keeps a reference copy, partitioned by
    ZeRO-3 or sharded by FSDP like the policy."""
    metric = "rewards/margins" if stage == "dpo" else "margin"
    launch, extra = {"zero3": (_deepspeed, {"deepspeed": str(ROOT / "ds_configs/ds_z3_config.json")}),
                     "zero2": (_deepspeed, {"deepspeed": str(ROOT / "ds_configs/ds_z2_config.json")}),
                     "fsdp": (_torchrun, {"fsdp": "full_shard auto_wrap"}),
                     "ddp": (_torchrun, {})}[layout]  # rm full: the untied lm_head computes nothing (DDP's unused check)
    data = tmp_path / "pairs"
    data.mkdir()
    pairs = [{"instruction": f"Question {i}?", "chosen": "Yes." + " yes" * (i % 3), "rejected": "No." + " no" * (i % 4)}
             for i in range(16)]
    (data / "p.json").write_text(json.dumps(pairs))
    (data / "dataset_info.json").write_text(json.dumps({"p": {"file_name": "p.json", "ranking": True}}))
    common = dict(stage=stage, finetuning_type=kind, dataset="p", max_steps=3, learning_rate=1e-2,
                  gradient_accumulation_steps=1, per_device_eval_batch_size=7)  # 3 chunks over 2 processes
    if stage == "dpo" and kind == "full":
        common["precompute_ref_log_probs"] = True
    single = tmp_path / "one"
    train_with(base_config(tiny_model_dir, data, single, per_device_train_batch_size=4, **common))
    double = tmp_path / "two"
    proc = launch(base_config(tiny_model_dir, data, double, per_device_train_batch_size=2, **common, **extra),
                  tmp_path, f"{stage}-{layout}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _history(double, "loss") == pytest.approx(_history(single, "loss"), rel=1e-4)
    assert _history(double, metric) == pytest.approx(_history(single, metric), rel=1e-3, abs=1e-6)
    if layout == "fsdp":  # rank 0 alone read the weights of a LoRA or full run (model/rank0_load.py)
        from trainer.model.rank0_load import LOGGED

        assert (LOGGED in proc.stdout + proc.stderr) == (kind != "freeze"), proc.stderr[-3000:]
    if kind == "freeze" and layout != "zero2":  # ZeRO-2 does not shard weights: the reference is a plain copy
        placed = "partitioned by ZeRO-3" if layout == "zero3" else "sharded with FSDP"
        assert f"Reference model {placed} like the policy" in proc.stdout + proc.stderr
    if stage == "dpo":
        assert _history(single, "loss")[0] == pytest.approx(0.693147, rel=1e-4)
    else:
        from safetensors.torch import load_file

        heads = [load_file(out / "value_head.safetensors") for out in (single, double)]
        torch.testing.assert_close(heads[1], heads[0], rtol=1e-3, atol=1e-5)
        saved = double / ("model.safetensors" if kind == "full" else "adapter_model.safetensors")
        assert not any("v_head" in k for k in load_file(saved))


@pytest.mark.parametrize("precompute", [False, True])
def test_kto_two_processes_match_one(precompute, tiny_model_dir, tmp_path):
    """kto's reference point z is summed over every process's mismatched pairs (each example's fixed dataset
    neighbour), so a batch split over 2 processes trains exactly like the whole batch in 1; with precomputed
    reference log-probs (the pass split over the processes) too."""
    data = tmp_path / "tagged"
    data.mkdir()
    rows = [{"instruction": f"Question {i}?", "kto_tag": bool(i % 2),
             "output": ("Yes." + " yes" * (i % 3)) if i % 2 else "No." + " no" * (i % 4)} for i in range(16)]
    (data / "t.json").write_text(json.dumps(rows))
    info = {"t": {"file_name": "t.json", "columns": {"kto_tag": "kto_tag"}}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    common = dict(stage="kto", dataset="t", max_steps=4, learning_rate=1e-2, gradient_accumulation_steps=1,
                  precompute_ref_log_probs=precompute)
    single = tmp_path / "one"
    train_with(base_config(tiny_model_dir, data, single, per_device_train_batch_size=4, **common))
    double = tmp_path / "two"
    proc = _deepspeed(base_config(tiny_model_dir, data, double, per_device_train_batch_size=2, **common,
                                  deepspeed=str(ROOT / "ds_configs/ds_z3_config.json")), tmp_path, "kto-z3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _history(double, "loss") == pytest.approx(_history(single, "loss"), rel=1e-4)
    assert _history(double, "kl") == pytest.approx(_history(single, "kl"), rel=1e-3, abs=1e-6)
    assert _history(single, "kl")[-1] > 0  # the reference point moved, and the same on both sides


def test_packed_pair_eval_on_two_processes_matches_one(tiny_model_dir, tmp_path):
    """Packed eval rows hold several pairs each, a different number on each process: the statistics are summed per
    row, so the gathered eval is exact (and equal to one process's) instead of failing or dropping pairs."""
    data = tmp_path / "pairs"
    data.mkdir()
    pairs = [{"instruction": f"Question {i}?" + " more" * (i % 5), "chosen": "Yes." + " yes" * (i % 3),
              "rejected": "No." + " no" * (i % 4)} for i in range(20)]
    (data / "p.json").write_text(json.dumps(pairs))
    (data / "dataset_info.json").write_text(json.dumps({"p": {"file_name": "p.json", "ranking": True}}))
    common = dict(stage="dpo", dataset="p", do_train=False, do_eval=True, eval_dataset="p", packing=True,
                  cutoff_len=48, per_device_eval_batch_size=2, adapter_name_or_path=None)
    single = tmp_path / "one"
    results, _ = train_with(base_config(tiny_model_dir, data, single, **common))
    double = tmp_path / "two"
    proc = _torchrun(base_config(tiny_model_dir, data, double, **common), tmp_path, "packed-eval")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((double / "eval_results.json").read_text())
    assert two["eval_tokens"] == results["eval_tokens"] == 20  # every pair counted once
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
        assert two[key] == pytest.approx(results[key], rel=1e-5, abs=1e-7), key


def _ppo_prompts(tmp_path: Path, name: str, body: str) -> tuple[Path, str]:
    """16 alpaca prompts and a reward function file beside them: (data folder, reward_function value)."""
    from tiny import alpaca_rows, write_dataset_dir

    data = write_dataset_dir(tmp_path / "prompts", alpaca_rows(16))
    (data / "rewards.py").write_text(f"def {name}(prompts, responses):\n    return {body}\n")
    return data, f"{data}/rewards.py:{name}"


def _sharp_model(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny model with its output head scaled up: greedy answers without near ties, so generating in batches of
    another size (other padding) picks the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,layout,extra", [("lora", "zero3", {}), ("full", "zero3", {"gradient_accumulation_steps": 2}),
                                              ("lora", "zero2", {"ppo_buffer_size": 2}),
                                              ("lora", "zero3", {"reward_model": "rm"})])
def test_ppo_two_processes_match_one(kind, layout, extra, tiny_model_dir, pairs_dir, tmp_path):
    """ppo over two processes: each samples its share of the buffer (greedy here, so the answers do not depend on the
    process), generation under ZeRO-3 gathers the partitioned weights, advantages are whitened and the KL
    coefficient adapted over both shares, a full run's reference is partitioned like the policy, and an rm LoRA
    adapter scores as a second adapter of the partitioned policy: the losses, rewards, KL and value losses of one
    process with the whole batch, with accumulation and with buffers of two steps too."""
    model = _sharp_model(tiny_model_dir, tmp_path / "sharp")
    data, vowels = _ppo_prompts(tmp_path, "vowels",
                                "[sum(c in 'aeiou' for c in r) / max(len(r), 1) for r in responses]")
    common = dict(stage="ppo", finetuning_type=kind, reward_function=vowels, do_sample=False,
                  max_new_tokens=8, ppo_epochs=2, max_steps=4, learning_rate=1e-2, gradient_accumulation_steps=1)
    common.update(extra)
    if extra.get("reward_model"):
        rm = tmp_path / "rm"
        train_with(base_config(model, pairs_dir, rm, stage="rm", dataset="pairs", max_steps=4, learning_rate=1e-2))
        common.update(reward_model=str(rm), reward_function=None)
    per_device = 4 // common["gradient_accumulation_steps"]
    single = tmp_path / "one"
    train_with(base_config(model, data, single, **{**common, "per_device_train_batch_size": per_device * 2,
                                                   "gradient_accumulation_steps": common["gradient_accumulation_steps"]}))
    double = tmp_path / "two"
    ds = {"deepspeed": str(ROOT / f"ds_configs/ds_z{layout[-1]}_config.json")}
    proc = _deepspeed(base_config(model, data, double, per_device_train_batch_size=per_device, **common, **ds),
                      tmp_path, f"ppo-{kind}-{layout}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # With buffers of two steps, the later passes reshuffle prompts across the buffer's steps within each process,
    # so which prompts share a step then depends on the process count: the first pass must match.
    shown = 2 if extra.get("ppo_buffer_size") else None
    for key in ("loss", "value_loss"):
        assert _history(double, key)[:shown] == pytest.approx(_history(single, key)[:shown], rel=1e-4, abs=1e-6), key
    assert _history(double, "reward") == pytest.approx(_history(single, "reward"), rel=1e-4, abs=1e-6)
    assert _history(double, "kl") == pytest.approx(_history(single, "kl"), rel=1e-3, abs=1e-5)
    assert _history(single, "kl")[0] == 0 and (shown or _history(single, "kl")[-1] != 0)
    if kind == "full" and layout == "zero3":
        assert "Reference model partitioned by ZeRO-3 like the policy" in proc.stdout + proc.stderr


def test_grpo_under_zero3_samples_each_process_its_own_responses(tiny_model_dir, tmp_path):
    data, length = _ppo_prompts(tmp_path, "length", "[len(r) / 50 for r in responses]")
    out = tmp_path / "two"
    proc = _deepspeed(base_config(tiny_model_dir, data, out, stage="ppo", advantage_estimator="grpo",
                                  num_generations=4, reward_function=length, max_new_tokens=8,
                                  ppo_epochs=2, max_steps=4, per_device_train_batch_size=2,
                                  deepspeed=str(ROOT / "ds_configs/ds_z3_config.json")), tmp_path, "grpo-z3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kls = _history(out, "kl")
    assert kls[0] == 0 and len(_history(out, "loss")) == 4
    assert not (out / "value_head.safetensors").exists() and (out / "adapter_model.safetensors").is_file()


def test_ppo_under_fsdp_generates_in_step_and_trains(tiny_model_dir, tmp_path):
    """FSDP2 shards the policy; generation runs with synced_gpus (engine/fsdp.py's sharding is not one transformers
    recognises by itself), so processes whose answers end at different lengths keep gathering weights together."""
    data, length = _ppo_prompts(tmp_path, "length", "[len(r) / 50 for r in responses]")
    out = tmp_path / "two"
    proc = _torchrun(base_config(tiny_model_dir, data, out, stage="ppo", finetuning_type="full",
                                 reward_function=length, max_new_tokens=8, ppo_epochs=2,
                                 max_steps=4, per_device_train_batch_size=2, fsdp="full_shard auto_wrap"),
                     tmp_path, "ppo-fsdp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _history(out, "kl")[0] == 0 and len(_history(out, "loss")) == 4
    assert "Reference model sharded with FSDP like the policy" in proc.stdout + proc.stderr

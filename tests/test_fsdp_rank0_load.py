"""FSDP reads the weights once: rank 0 loads the checkpoint, rank 1 builds the model on the meta device and receives
its shards at sharding (model/rank0_load.py, engine/fsdp.py). Rank 1's host memory never holds the whole model, and
the run trains and saves exactly as one process that loaded the model itself."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import FULL, RECORD_SHARDS, ROOT, _history, _launch, _trained_shards
from tiny import base_config, build_model, build_tokenizer, train_with

pytestmark = pytest.mark.distributed

# Each rank notes its resident set just before the model loads (with the peak reset there: clear_refs 5), and the
# peak once the model is sharded: what loading and sharding took, before gradients and Adam's moments. The modules
# loading and sharding import are imported first (code, not weights).
MEASURE_RSS = """
import json, os
import torch.distributed.checkpoint.state_dict, torch.distributed.fsdp  # code, not weights: imported ahead
import transformers.models.llama.modeling_llama
import trainer.engine.fsdp as fsdp
import trainer.model.loading as loading

def _status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

_load = loading.load_model
def load_model(*args, **kwargs):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    global _before
    _before = _status("VmRSS")
    return _load(*args, **kwargs)
loading.load_model = load_model

_shard = fsdp.shard
def shard(model, options, *args, **kwargs):
    model = _shard(model, options, *args, **kwargs)
    with open(os.path.join(RSS_DIR, f"rss-rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"before_load": _before, "peak": _status("VmHWM")}, f)
    return model
fsdp.shard = shard
"""


@pytest.fixture(scope="module")
def mid_model_dir(tmp_path_factory) -> Path:
    """A random-init Llama of ~190 MB in fp32 (5 layers of width 1024) over the tiny 400-token vocabulary."""
    folder = tmp_path_factory.mktemp("mid-llama")
    build_model(folder, len(build_tokenizer(folder)), hidden=1024, layers=5)
    return folder


def _fp32_bytes(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(model_dir / "model.safetensors").values()) * 4


def _torchrun_measured(cfg: dict, tmp_path: Path, name: str):
    driver = tmp_path / "measure_rss.py"
    driver.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nRSS_DIR = {str(tmp_path)!r}\n" + MEASURE_RSS
                      + RECORD_SHARDS)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(31500 + os.getpid() % 1000)]
    return _launch(launcher, cfg, tmp_path, name, str(driver))


@pytest.mark.slow  # ~100 s on 2 cores: a 190 MB model trained in one process and in two
def test_fsdp_full_loads_on_rank0_only_and_matches_one_process(mid_model_dir, data_dir, tmp_path, monkeypatch):
    settings = dict(FULL, max_steps=2, val_size=0, do_eval=False, cutoff_len=64)
    single = tmp_path / "one"
    train_with(base_config(mid_model_dir, data_dir, single, per_device_train_batch_size=4, **settings))
    double = tmp_path / "two"
    # glibc hands blocks of 1 MiB and more back when freed (zerotune keeps them for reuse on CPU otherwise:
    # engine/host_memory.py), so the peak counts what a process holds, not what its allocator kept.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    proc = _torchrun_measured(base_config(mid_model_dir, data_dir, double, per_device_train_batch_size=2,
                                          fsdp="full_shard auto_wrap", **settings), tmp_path, "rank0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FSDP: weights loaded on rank 0 only, broadcast at sharding" in proc.stderr
    _trained_shards(double)

    size = _fp32_bytes(mid_model_dir)
    rss = [json.loads((tmp_path / f"rss-rank{r}.json").read_text()) for r in (0, 1)]
    grew = [r["peak"] - r["before_load"] for r in rss]
    print(f"fp32 model {size >> 20} MiB; host memory grown by loading and sharding: rank 0 {grew[0] >> 20} MiB, "
          f"rank 1 {grew[1] >> 20} MiB")
    assert grew[0] > size  # rank 0 held the whole model and its own shard: the measure sees the weights
    assert grew[1] < 0.7 * size, (grew, size)  # rank 1: its half and one tensor in flight, never the whole

    assert _history(double, "loss") == pytest.approx(_history(single, "loss"), rel=1e-4)
    assert _history(double, "grad_norm") == pytest.approx(_history(single, "grad_norm"), rel=1e-4)

    # What the meta-loaded run saved is an ordinary checkpoint with the weights one process trains.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(double).state_dict()
    reference = load_file(single / "model.safetensors")
    assert reloaded.keys() >= reference.keys()
    for key, weight in reference.items():
        torch.testing.assert_close(reloaded[key], weight, rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp_keeps_every_process_loading_where_rank0_cannot(tiny_model_dir, data_dir, tmp_path, caplog):
    """Outside rank-0 loading (freeze, or cpu_ram_efficient_loading: false) every process loads, and the log says
    why; lora and full load on rank 0 by default."""
    import logging

    from trainer.model.rank0_load import chosen
    from trainer.run import build_config

    def decide(**overrides) -> bool:
        config = build_config(base_config(tiny_model_dir, data_dir, tmp_path, fsdp="full_shard", **overrides))
        return chosen(config.finetuning, config.model, 2, config.fsdp.rank0_load)

    with caplog.at_level(logging.INFO, logger="trainer"):
        assert decide() and decide(finetuning_type="full")
        assert not decide(finetuning_type="freeze")
        assert not decide(fsdp_config={"fsdp_cpu_ram_efficient_loading": False})
    assert "FSDP: every process loads the full weights (finetuning_type freeze" in caplog.text
    assert "FSDP: every process loads the full weights (fsdp_config.cpu_ram_efficient_loading: false)" in caplog.text

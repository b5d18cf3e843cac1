"""Sequence parallelism (engine/sequence_parallel.py): two CPU processes sharing each row through DeepSpeed's Ulysses
train exactly as one process does on the whole rows (losses and gradient norms, fp32), packed rows and padding-free
rows, ZeRO-2 and ZeRO-3; with a core attention that does not read the segment layout the same comparison fails; the
shard cut rebuilds the row; what cannot run is refused by name."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tiny import alpaca_rows, base_config, train_with, write_dataset_dir

ROOT = Path(__file__).resolve().parents[1]

# A row of several packed examples (cutoff 256) always has one crossing the middle, where a 2-way cut falls; the long
# example fills a row alone (truncated at the cutoff).
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)
COMMON = dict(finetuning_type="full", max_steps=3, cutoff_len=256, learning_rate=1e-2, save_steps=1000)
LAYOUTS = {"packed": dict(packing=True, per_device_train_batch_size=1),
           "padding_free": dict(packing=False, per_device_train_batch_size=2)}


def _data(folder: Path) -> Path:
    rows = alpaca_rows(20)
    rows[1]["output"] = LONG
    return write_dataset_dir(folder, rows)


def _history(out: Path) -> list[float]:
    """Each step's loss and gradient norm, in turn."""
    state = json.loads((out / "trainer_state.json").read_text())
    return [e[k] for e in state["log_history"] if "loss" in e for k in ("loss", "grad_norm")]


@pytest.fixture(scope="module")
def references(tiny_model_dir, tmp_path_factory):
    """One plain process (no DeepSpeed, no sequence parallelism) per layout: the losses and gradient norms to meet."""
    folder = tmp_path_factory.mktemp("sp-reference")
    data = _data(folder / "data")
    out = {}
    for name, layout in LAYOUTS.items():
        train_with(base_config(tiny_model_dir, data, folder / name, **COMMON, **layout))
        out[name] = _history(folder / name)
    return data, out


# Launched under the DeepSpeed launcher; MUTATION=sdpa makes DeepSpeed's core attention transformers' SDPA, which
# gets no mask after the all-to-all (DeepSpeed drops it) and so lets packed examples attend to each other.
DRIVER = """
import os, runpy, sys
sys.path.insert(0, {root!r})
if os.environ.get("MUTATION") == "sdpa":
    from trainer.engine import sequence_parallel
    sequence_parallel.SEGMENT_AWARE = (*sequence_parallel.SEGMENT_AWARE, "sdpa")
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _launch(cfg: dict, tmp_path: Path, name: str, mutation: str = "", processes: int = 2) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), script=str(ROOT / "launch/train.py")))
    cfg_file = tmp_path / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MUTATION": mutation}
    return subprocess.run([launcher, "--num_gpus", str(processes), "--master_port", str(33500 + os.getpid() % 1000),
                           str(driver), "--config", str(cfg_file)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.distributed
# tiled: each process's shard of the row also runs its MLP in shards (model/tiled_mlp.py; automatic count, agreed
# over the processes under ZeRO-3), against the same plain one-process reference.
@pytest.mark.parametrize("layout, zero, tiled", [("packed", 2, False), ("padding_free", 3, False), ("packed", 3, True)])
def test_two_way_sequence_parallel_matches_one_process(layout, zero, tiled, references, tiny_model_dir, tmp_path):
    data, reference = references
    out = tmp_path / "sp"
    proc = _launch(base_config(tiny_model_dir, data, out, **COMMON, **LAYOUTS[layout], sequence_parallel_size=2,
                               deepspeed=str(ROOT / f"ds_configs/ds_z{zero}_config.json"),
                               **({"tiled_mlp": True} if tiled else {})), tmp_path, "sp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("Tiled MLP (DeepSpeed's TiledMLP) in 2 decoder layers" in proc.stderr) == tiled
    assert "DeepSpeed Ulysses over 2 processes a group, zerotune_segments" in proc.stderr
    assert "data-parallel degree 1" in proc.stderr
    got = _history(out)
    assert len(got) == 6
    assert got == pytest.approx(reference[layout], rel=1e-5)


@pytest.mark.slow  # 4 + 2 processes on the shared 2-core machine: minutes
@pytest.mark.distributed
def test_two_data_parallel_by_two_sequence_parallel_matches_two_processes_of_plain_data_parallelism(
        references, tiny_model_dir, tmp_path):
    data, _ = references
    settings = dict(**COMMON, **LAYOUTS["packed"], deepspeed=str(ROOT / "ds_configs/ds_z2_config.json"))
    plain = tmp_path / "plain"
    proc = _launch(base_config(tiny_model_dir, data, plain, **settings), tmp_path, "plain")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    grid = tmp_path / "grid"
    proc = _launch(base_config(tiny_model_dir, data, grid, **settings, sequence_parallel_size=2), tmp_path, "grid",
                   processes=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data-parallel degree 2" in proc.stderr
    assert _history(grid) == pytest.approx(_history(plain), rel=1e-5)


@pytest.mark.distributed
def test_examples_attend_across_without_the_segment_layout_and_the_comparison_fails(references, tiny_model_dir,
                                                                                    tmp_path):
    """The mutation check: the same run with SDPA as DeepSpeed's core attention (no segment layout after the
    all-to-all) trains a different model."""
    data, reference = references
    out = tmp_path / "sdpa"
    proc = _launch(base_config(tiny_model_dir, data, out, **COMMON, **LAYOUTS["packed"], sequence_parallel_size=2,
                               flash_attn="sdpa", deepspeed=str(ROOT / "ds_configs/ds_z2_config.json")),
                   tmp_path, "sdpa", mutation="sdpa")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, want = _history(out), reference["packed"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    assert got != pytest.approx(want, rel=1e-5) and worst > 1e-4, (worst, got, want)


def _pair_history(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e[k] for e in state["log_history"] if "loss" in e for k in ("loss", "grad_norm", "rewards/margins")]


@pytest.mark.slow  # two minutes on the shared 2-core machine
@pytest.mark.distributed
def test_dpo_with_two_way_sequence_parallelism_matches_one_process(tiny_model_dir, tmp_path):
    """dpo reads each sequence's summed log-prob, and a pair's sequences straddle the cut: the wrapper gathers the
    whole row's token losses (WholeRows); LoRA, so the reference is the same sharded model with the adapters off."""
    data = tmp_path / "pairs"
    data.mkdir()
    pairs = [{"instruction": f"Question {i}: " + "tell me more " * (i % 5), "chosen": "Yes." + " yes indeed" * (i % 7),
              "rejected": "No." + " no way" * (i % 4)} for i in range(12)]
    (data / "p.json").write_text(json.dumps(pairs))
    (data / "dataset_info.json").write_text(json.dumps({"p": {"file_name": "p.json", "ranking": True}}))
    common = dict(stage="dpo", dataset="p", max_steps=3, learning_rate=1e-2, per_device_train_batch_size=2)
    single = tmp_path / "one"
    train_with(base_config(tiny_model_dir, data, single, **common))
    double = tmp_path / "two"
    proc = _launch(base_config(tiny_model_dir, data, double, **common, sequence_parallel_size=2,
                               deepspeed=str(ROOT / "ds_configs/ds_z2_config.json")), tmp_path, "dpo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, want = _pair_history(double), _pair_history(single)
    assert len(got) == 9 and want[0] == pytest.approx(0.693147, rel=1e-5)
    assert got == pytest.approx(want, rel=1e-5, abs=2e-6)  # the margins are logged to 6 decimals


def _tagged_or_ranked(folder: Path, stage: str) -> Path:
    folder.mkdir()
    if stage == "kto":
        rows = [{"instruction": f"Question {i}: " + "do you agree? " * (i % 5), "output": ("Yes, I agree." if i % 2
                 else "No.") + " indeed" * (i % 7), "kto_tag": bool(i % 2)} for i in range(12)]
        info = {"columns": {"prompt": "instruction", "response": "output", "kto_tag": "kto_tag"}}
    else:
        rows = [{"instruction": f"Question {i}: " + "tell me more " * (i % 5), "chosen": "Yes." + " yes indeed" * (i % 7),
                 "rejected": "No." + " no way" * (i % 4)} for i in range(12)]
        info = {"ranking": True}
    (folder / "d.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", **info}}))
    return folder


@pytest.mark.slow  # two minutes each on the shared 2-core machine
@pytest.mark.distributed
@pytest.mark.parametrize("stage, figure", [("rm", "margin"), ("kto", "kl")])
def test_rm_and_kto_with_two_way_sequence_parallelism_match_one_process(stage, figure, tiny_model_dir, tmp_path):
    """rm scores each sequence at its last token and kto sums each sequence's log-probs (and its mismatched pair's,
    for the reference point): the wrapper gathers the whole row's token values or losses (WholeRows)."""
    data = _tagged_or_ranked(tmp_path / "data", stage)
    common = dict(stage=stage, dataset="d", max_steps=3, learning_rate=1e-2, per_device_train_batch_size=4)
    train_with(base_config(tiny_model_dir, data, tmp_path / "one", **common))
    proc = _launch(base_config(tiny_model_dir, data, tmp_path / "two", **common, sequence_parallel_size=2,
                               deepspeed=str(ROOT / "ds_configs/ds_z2_config.json")), tmp_path, stage)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def history(out):
        state = json.loads((out / "trainer_state.json").read_text())
        return [e[k] for e in state["log_history"] if "loss" in e for k in ("loss", "grad_norm", figure)]

    got, want = history(tmp_path / "two"), history(tmp_path / "one")
    assert len(got) == 9 and any(want[2::3])
    assert got == pytest.approx(want, rel=1e-5, abs=2e-6)


@pytest.mark.slow  # two launches of a minute each on the shared 2-core machine
@pytest.mark.distributed
def test_resuming_a_sequence_parallel_run_gives_the_same_next_losses(references, tiny_model_dir, tmp_path):
    """4 steps straight == resumed from the step-2 checkpoint (ZeRO-3 state, and the data order: the Trainer skips
    whole group batches, GroupBatches being the sampler it skips over)."""
    data, _ = references
    settings = dict(**COMMON, **LAYOUTS["padding_free"], sequence_parallel_size=2,
                    deepspeed=str(ROOT / "ds_configs/ds_z3_config.json"))
    settings.update(max_steps=4, save_steps=2, lr_scheduler_type="cosine", warmup_steps=1)
    straight = tmp_path / "straight"
    proc = _launch(base_config(tiny_model_dir, data, straight, **settings), tmp_path, "straight")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = tmp_path / "resumed"  # a fresh folder holding only the step-2 checkpoint, as a restarted job sees it
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    proc = _launch(base_config(tiny_model_dir, data, resumed, resume_from_checkpoint="true", **settings), tmp_path,
                   "resumed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _history(straight), _history(resumed)
    assert len(b) == 8 and b[4:] == pytest.approx(a[4:], rel=1e-5)  # steps 3 and 4: loss and gradient norm


def test_a_group_is_dealt_what_one_rank_of_plain_data_parallelism_is():
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard, SeedableRandomSampler
    from torch.utils.data import BatchSampler

    from trainer.engine.sequence_parallel import GroupBatches

    base = BatchSampler(SeedableRandomSampler(range(23), data_seed=3), 2, False)
    for rank in range(4):  # 4 processes, 2-way sequence parallelism = 2 data-parallel ranks
        loader = SimpleNamespace(batch_sampler=BatchSamplerShard(base, num_processes=4, process_index=rank))
        plain = BatchSamplerShard(base, num_processes=2, process_index=rank // 2)
        base.sampler.set_epoch(0)  # each pass draws from seed + epoch, then moves on to the next epoch
        grouped = list(GroupBatches(loader, 2).batch_sampler)
        base.sampler.set_epoch(0)
        assert grouped == list(plain)
        assert len(GroupBatches(loader, 2)) == len(plain) == 2 * len(loader.batch_sampler)


# ---- the cut ---------------------------------------------------------------------------------------------------

def _batch(lengths: list[int]) -> dict:
    from trainer.data.collators import Collator

    items, start = [], 1
    for group in lengths:
        ids = list(range(start, start + sum(group)))
        start += sum(group)
        items.append({"input_ids": ids, "labels": [i if i % 3 else -100 for i in ids], "lengths": group})
    return Collator(pad_token_id=0)(items)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_shards_rebuild_the_row_with_labels_shifted_before_the_cut(n):
    from trainer.engine.sequence_parallel import SHIFTED, shard
    from trainer.model.losses import IGNORE_INDEX, shift_targets

    batch = _batch([[5, 4], [7], [3, 2, 4]])  # 25 tokens: a pad of 25 % n
    total = batch["input_ids"].shape[1]
    shards = [shard(dict(batch), r, n) for r in range(n)]
    width = shards[0]["input_ids"].shape[1]
    assert width * n >= total > width * (n - 1) and all(s["input_ids"].shape[1] == width for s in shards)
    ids = torch.cat([s["input_ids"] for s in shards], 1)
    targets = torch.cat([s[SHIFTED] for s in shards], 1)
    assert torch.equal(ids[:, :total], batch["input_ids"])
    assert torch.equal(targets[:, :total], shift_targets(batch["labels"]))  # each boundary token trained once
    assert (targets[:, total:] == IGNORE_INDEX).all()
    positions = torch.cat([s["position_ids"] for s in shards], 1)
    assert torch.equal(positions[:, :total], batch["position_ids"])
    cu = shards[0]["cu_seq_lens_q"]  # the whole row's layout on every shard, the padding a segment of its own
    assert all(s["segment_lengths"] == tuple(cu.diff().tolist()) for s in shards)  # its host copy too
    assert all("target_count" not in s for s in shards)  # the row's count, not a shard's
    assert all(torch.equal(s["cu_seq_lens_q"], cu) for s in shards)
    assert cu[-1] == width * n and torch.equal(cu[:len(batch["cu_seq_lens_q"])], batch["cu_seq_lens_q"])
    for s in shards:  # per-item token counts of the shard, for the per-item statistics
        assert int(s["item_lengths"].sum()) == width
    summed = sum(s["item_lengths"] for s in shards)
    assert summed[:-1].tolist() == batch["item_lengths"][:-1].tolist()
    assert int(summed[-1]) == int(batch["item_lengths"][-1]) + width * n - total


def test_a_padded_batch_is_not_cut():
    from trainer.data.collators import Collator
    from trainer.engine.sequence_parallel import shard

    batch = Collator(pad_token_id=0, padding_free=False)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3],
                                                           "lengths": [3]}])
    with pytest.raises(ValueError, match="padding-free"):
        shard(batch, 0, 2)


# ---- what is refused ---------------------------------------------------------------------------------------------

def _config(tiny_model_dir, data_dir, tmp_path, **overrides):
    from trainer.run import build_config

    return build_config(base_config(tiny_model_dir, data_dir, tmp_path / "out", **overrides))


def test_without_deepspeed_it_is_refused_with_what_to_do(tiny_model_dir, data_dir, tmp_path):
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="sequence_parallel_size: 2 runs through DeepSpeed's Ulysses: set deepspeed"):
        _config(tiny_model_dir, data_dir, tmp_path, sequence_parallel_size=2)
    with pytest.raises(ConfigError, match="FSDP and plain DDP have no sequence parallelism"):
        _config(tiny_model_dir, data_dir, tmp_path, cp_size=2, fsdp="full_shard")


def test_a_world_it_does_not_divide_and_a_zero3_without_reduce_scatter_are_refused(tiny_model_dir, data_dir,
                                                                                      tmp_path, monkeypatch):
    from trainer.errors import ConfigError

    ds = str(ROOT / "ds_configs/ds_z2_config.json")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="does not divide the 3 processes"):
        _config(tiny_model_dir, data_dir, tmp_path, sequence_parallel_size=2, deepspeed=ds)
    z3 = json.loads((ROOT / "ds_configs/ds_z3_config.json").read_text())
    z3["zero_optimization"]["reduce_scatter"] = False
    (tmp_path / "z3.json").write_text(json.dumps(z3))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="needs zero_optimization.reduce_scatter: true"):
        _config(tiny_model_dir, data_dir, tmp_path, sequence_parallel_size=2, deepspeed=str(tmp_path / "z3.json"))


def test_the_alias_and_its_disagreement(tiny_model_dir, data_dir, tmp_path):
    from trainer.engine.options import EngineArguments
    from trainer.errors import ConfigError

    assert EngineArguments(cp_size=4).sequence_parallel_size == 4
    assert EngineArguments(sequence_parallel_size=4, cp_size=4).sequence_parallel_size == 4
    with pytest.raises(ConfigError, match="cp_size: 2 and sequence_parallel_size: 4 disagree"):
        EngineArguments(sequence_parallel_size=4, cp_size=2)
    with pytest.raises(ConfigError, match="must be at least 1"):
        EngineArguments(sequence_parallel_size=0)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_stages_whose_figures_span_the_shards_are_refused_by_name(stage):
    from types import SimpleNamespace

    from trainer.errors import ConfigError
    from trainer.stages import STAGES

    config = SimpleNamespace(engine=SimpleNamespace(sequence_parallel_size=2))
    with pytest.raises(ConfigError, match=f"supported for stages pt, sft, rm, dpo, orpo and kto; stage {stage} trains "
                                          "on answers it generates"):
        STAGES.lookup(stage)(config, None)
    for accepted in ("sft", "pt"):
        STAGES.lookup(accepted)(config, None)
    assert {STAGES.lookup(s).sequence_parallel for s in ("rm", "dpo", "orpo", "kto")} == {"rows"}


def test_head_counts_it_does_not_divide_are_refused_with_the_sizes_that_work(tiny_model_dir):
    from types import SimpleNamespace

    from transformers import AutoConfig

    from trainer.engine.sequence_parallel import attach
    from trainer.errors import ConfigError

    config = AutoConfig.from_pretrained(tiny_model_dir)  # 4 heads, 2 key/value heads
    config._attn_implementation = "zerotune_segments"
    with pytest.raises(ConfigError, match=r"must divide the model's 4 attention heads.*among \[1, 2, 4\]"):
        attach(None, SimpleNamespace(config=config), 3)
    config._attn_implementation = "sdpa"
    with pytest.raises(ConfigError, match="needs an attention that reads the batch's segment layout"):
        attach(None, SimpleNamespace(config=config), 2)


# ---- zerotune check ----------------------------------------------------------------------------------------------

def test_longest_cutoff_is_the_longest_row_whose_activations_fit_beside_the_states():
    from transformers import LlamaConfig

    from trainer.plan import GB, activation_gb, longest_cutoffs

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3)
    fits = longest_cutoffs(config, states_gb=2.0, free_gb=10.0, compute_bytes=2)
    for n, (plain, ckpt) in fits.items():
        assert activation_gb(config, plain, 2) / n <= 8.0 < activation_gb(config, plain + 256, 2) / n
        assert ckpt > plain  # checkpointing keeps one layer's input per layer, not its whole activations
        per_token = (30 * 576 * 2 + (10 * 576 + 4 * 1536) * 2 + 2 * 576 * 4) / GB  # inputs + one whole layer
        assert ckpt * per_token / n <= 8.0 < (ckpt + 256) * per_token / n
    assert abs(fits[2][0] - 2 * fits[1][0]) <= 512  # activations divide by N
    assert longest_cutoffs(config, states_gb=12.0, free_gb=10.0, compute_bytes=2)[8] == (0, 0)


def test_check_reports_the_data_parallel_degree_and_the_cutoffs_per_size(tiny_model_dir, data_dir, tmp_path,
                                                                       monkeypatch, capsys):
    from trainer.cli import check

    cfg = base_config(tiny_model_dir, data_dir, tmp_path / "out", sequence_parallel_size=2, per_device_train_batch_size=2,
                      deepspeed=str(ROOT / "ds_configs/ds_z3_config.json"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    assert check(str(tmp_path / "cfg.yaml"), []) == 0
    text = capsys.readouterr().out
    assert "data-parallel degree 4 / 2 = 2" in text
    assert "2 x 1 accumulation x 2 data-parallel groups = 4 examples a step" in text
    assert "(ZeRO-3 states" in text
    for n in (1, 2, 4, 8):
        assert f"sequence_parallel_size {n}:" in text
    assert "<- this run" in text.split("sequence_parallel_size 2:")[1].split("\n")[0]

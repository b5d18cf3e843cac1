"""The stage plugin contract and the engine around it.

- A stage owns its keys (parsed and validated like every other key, refused for another stage), its data kind,
  its collator and what one item of its loss is.
- The engine takes the loss divisor from the stage: a stage whose batches carry no `labels` key trains the same
  with accumulation 4 as in one batch (transformers' own count would be absent and the gradient 4x too large),
  and a model whose loss_type is not the causal-LM one trains the same as a Llama.
- Stage statistics logged per window are sums over the window divided by counts, not means of means.
- Padding-free by default: a step holds exactly the examples a padded (LLaMA-Factory) step holds, in the same
  order, with the same losses; LF's identity recipe makes LF's number of optimizer steps.
- Automatic decisions are agreed by every process.
"""

import json
import shutil
from dataclasses import dataclass, field

import pytest
import torch

from tiny import alpaca_rows, base_config, train_with, write_dataset_dir
from trainer.run import build_config
from trainer.data.collators import Collator
from trainer.errors import ConfigError
from trainer.stages import STAGES, StageOutput
from trainer.stages.sft import SFT


@dataclass
class ProbeOptions:
    probe_weight: float = 1.0
    probe_mode: str = field(default="sum", metadata={"choices": ("sum", "mean")})


class _TargetsCollator(Collator):
    """The sft batch with its labels under another name: transformers cannot count items from it."""

    def __call__(self, items):
        batch = super().__call__(items)
        batch["targets"] = batch.pop("labels")
        return batch


class Probe(SFT):
    """A stage with keys of its own, labels under another key, and a statistic of its own."""
    name = "probe"
    options = ProbeOptions

    def collator(self, pad_token_id, padding_free=True):
        return _TargetsCollator(pad_token_id, padding_free=padding_free)

    def count_items(self, batch):
        return super().count_items({"labels": batch["targets"]})

    def compute(self, wrapper, model, batch):
        batch = dict(batch, labels=batch.pop("targets"))
        out = super().compute(wrapper, model, batch)
        counts = out.stats["loss"][1]
        # Trained tokens per example: its value over a window or an eval set must be sum / count.
        return StageOutput(out.loss_sum * self.opts.probe_weight, out.items,
                           dict(out.stats, probe_tokens=(counts, torch.ones_like(counts))))


@pytest.fixture()
def probe_stage():
    STAGES["probe"] = Probe
    yield Probe
    STAGES.pop("probe")


@pytest.fixture()
def rows_dir(tmp_path):
    return write_dataset_dir(tmp_path / "data", alpaca_rows(16))


def _history(state, key):
    return [e[key] for e in state["log_history"] if key in e and "eval_loss" not in e]


def test_stage_keys_are_parsed_validated_and_ignored_for_other_stages(tiny_model_dir, rows_dir, tmp_path,
                                                                      probe_stage, caplog):
    base = base_config(tiny_model_dir, rows_dir, tmp_path / "o")
    cfg = build_config({**base, "stage": "probe", "probe_weight": "0.5", "probe_mode": "mean"})
    assert cfg.stage_options == ProbeOptions(probe_weight=0.5, probe_mode="mean")
    assert build_config({**base, "stage": "probe"}).stage_options == ProbeOptions()
    # Another stage's key (one YAML toggled between stages, as LLaMA-Factory users do): a warning, and kept as given.
    with caplog.at_level("WARNING"):
        cfg = build_config({**base, "probe_weight": 0.5})
    assert "Ignoring probe_weight: a key of stage probe, and this run's stage is sft" in caplog.text
    assert cfg.raw["probe_weight"] == 0.5 and cfg.stage_options is not None
    with pytest.raises(ConfigError, match=r"probe_wieght.*Did you mean: probe_weight"):
        build_config({**base, "stage": "probe", "probe_wieght": 0.5})
    with pytest.raises(ConfigError, match=r"probe_weight: 'heavy' is not a number"):
        build_config({**base, "stage": "probe", "probe_weight": "heavy"})
    with pytest.raises(ConfigError, match=r"probe_mode: 'max' is not allowed; choose one of: sum, mean"):
        build_config({**base, "stage": "probe", "probe_mode": "max"})
    with pytest.raises(ConfigError, match=r"stage: 'ppx' is not a stage. Did you mean: ppo\?"):
        build_config({**base, "stage": "ppx"})


def test_loss_divisor_comes_from_the_stage_for_batches_without_labels(tiny_model_dir, rows_dir, tmp_path,
                                                                      probe_stage):
    from safetensors.torch import load_file

    runs = {}
    for stage in ("sft", "probe"):
        for bs, ga in ((4, 1), (1, 4)):
            out = tmp_path / f"{stage}{bs}x{ga}"
            cfg = base_config(tiny_model_dir, rows_dir, out, stage=stage, finetuning_type="full", max_steps=3,
                              per_device_train_batch_size=bs, gradient_accumulation_steps=ga, forward_batch_size=bs,
                              learning_rate=1e-2)
            _, state = train_with(cfg)
            runs[(stage, bs)] = (_history(state, "loss"), _history(state, "grad_norm"),
                                 load_file(str(out / "model.safetensors")))
    ref_loss, ref_norm, ref_weights = runs[("sft", 4)]
    assert len(ref_loss) == 3 and ref_loss[-1] < ref_loss[0]
    for key, (loss, norm, weights) in runs.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5), key
        assert norm == pytest.approx(ref_norm, rel=1e-4), key
        for name in ref_weights:
            torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=1e-5, msg=name)


def test_stage_statistics_are_summed_over_the_logging_window(tiny_model_dir, rows_dir, tmp_path, probe_stage):
    """probe_tokens is the mean trained tokens per example over each window of 2 steps x 4 micro-batches: the
    sum of every micro-batch's tokens over the number of examples, never a mean of per-step means."""
    cfg = base_config(tiny_model_dir, rows_dir, tmp_path / "o", stage="probe", max_steps=4, logging_steps=2,
                      per_device_train_batch_size=1, gradient_accumulation_steps=4, forward_batch_size=1)
    seen = []
    original = _TargetsCollator.__call__

    def recording(self, items):
        seen.append(sum(sum(1 for t in it["labels"][1:] if t != -100) for it in items))
        return original(self, items)

    _TargetsCollator.__call__ = recording
    try:
        _, state = train_with(cfg)
    finally:
        _TargetsCollator.__call__ = original
    logged = _history(state, "probe_tokens")
    assert len(seen) == 16 and len(logged) == 2
    for window, value in zip((seen[:8], seen[8:]), logged):
        assert value == pytest.approx(sum(window) / len(window), rel=1e-6)


def test_eval_statistics_add_up_over_the_whole_eval_set(tiny_model_dir, rows_dir, tmp_path, probe_stage):
    results = {}
    for batch in (1, 3):
        cfg = base_config(tiny_model_dir, rows_dir, tmp_path / f"e{batch}", stage="probe", do_train=False,
                          do_eval=True, per_device_eval_batch_size=batch)
        results[batch] = train_with(cfg)[0]
    assert results[1]["eval_loss"] == pytest.approx(results[3]["eval_loss"], rel=1e-6)
    assert results[1]["eval_probe_tokens"] == pytest.approx(results[3]["eval_probe_tokens"], rel=1e-9)
    assert results[1]["eval_tokens"] == results[3]["eval_tokens"]


def test_a_model_with_another_loss_type_trains_like_a_llama(tiny_model_dir, tmp_path):
    other = tmp_path / "masked-loss-llama"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "loss_type": "ForMaskedLM"}))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "d.json").write_text(json.dumps([{"text": f"One two three {'four ' * i}five."} for i in range(12)]))
    (docs / "dataset_info.json").write_text(json.dumps({"docs": {"file_name": "d.json", "columns": {"prompt": "text"}}}))
    runs = []
    for model in (tiny_model_dir, other):
        cfg = base_config(model, docs, tmp_path / f"o{len(runs)}", stage="pt", dataset="docs", template=None,
                          packing=False, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          forward_batch_size=2, finetuning_type="full")
        runs.append(train_with(cfg)[1])
    assert _history(runs[0], "loss") == pytest.approx(_history(runs[1], "loss"), rel=1e-6)
    assert _history(runs[0], "grad_norm") == pytest.approx(_history(runs[1], "grad_norm"), rel=1e-5)


def test_padding_free_steps_hold_the_examples_of_padded_steps(tiny_model_dir, rows_dir, tmp_path):
    """Default layout vs the padded one: the same optimizer steps, the same examples in each, the same losses."""
    runs = {}
    original = Collator.__call__
    for layout, extra in (("padding-free", {}), ("padded", {"padding_free": False, "forward_batch_size": 2})):
        seen = []

        def recording(self, items):
            seen.extend(tuple(it["input_ids"]) for it in items)
            return original(self, items)

        Collator.__call__ = recording
        try:
            cfg = base_config(tiny_model_dir, rows_dir, tmp_path / layout, finetuning_type="full",
                              per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                              **extra)
            _, state = train_with(cfg)
        finally:
            Collator.__call__ = original
        runs[layout] = (state["global_step"], seen, _history(state, "loss"), _history(state, "grad_norm"))
    steps, examples, losses, norms = runs["padded"]
    assert steps == 4 and len(examples) == 16 and len(set(examples)) == 16  # 16 examples, 4 a step, each once
    assert runs["padding-free"][0] == steps and runs["padding-free"][1] == examples
    assert runs["padding-free"][2] == pytest.approx(losses, rel=1e-5)
    assert runs["padding-free"][3] == pytest.approx(norms, rel=1e-4)


def test_llama_factory_identity_recipe_gets_llama_factory_steps(tiny_model_dir, tmp_path, caplog):
    """LF: 60 examples, batch 1 x accumulation 8, 3 epochs = ceil(60 / 8) x 3 = 24 optimizer steps. Packing
    across batches (packing: true) makes fewer, fuller steps, as in LF."""
    data = write_dataset_dir(tmp_path / "id", alpaca_rows(60))
    cfg = base_config(tiny_model_dir, data, tmp_path / "o", per_device_train_batch_size=1,
                      gradient_accumulation_steps=8, num_train_epochs=3, logging_steps=100)
    with caplog.at_level("INFO", logger="trainer"):
        _, state = train_with(cfg)
    assert state["global_step"] == 24
    assert "padding-free" in caplog.text and "8 optimizer steps an epoch over 60 examples" in caplog.text
    _, packed = train_with({**cfg, "packing": True, "output_dir": str(tmp_path / "p")})
    assert packed["global_step"] < 24


def _agree_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer import plan
    from trainer.engine.agree import agreed_choice

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    plan.available_gb = lambda: 100.0 if rank == 0 else 0.05  # rank 1 is short of memory
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    args = SimpleNamespace(bf16=False, fp16=False, world_size=2)
    decision, _ = plan.decide_checkpointing(model, args, tokens_per_microbatch=4096)
    try:
        agreed_choice("the attention path", "sdpa" if rank == 0 else "eager")
        mismatch = ""
    except ConfigError as err:
        mismatch = str(err)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"decision": decision, "mismatch": mismatch}, f)
    dist.destroy_process_group()


def test_processes_agree_on_gradient_checkpointing_and_choices(tmp_path):
    import torch.multiprocessing as mp

    from trainer import plan

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_agree_worker, args=(init, str(tmp_path / "out")), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    assert results[0]["decision"] is True and results[1]["decision"] is True  # the short process decides for all
    assert all("process 0: 'sdpa', process 1: 'eager'" in r["mismatch"] for r in results)
    # Alone, the process with memory to spare would not checkpoint: agreement is what changed its decision.
    from transformers import LlamaConfig, LlamaForCausalLM
    from types import SimpleNamespace

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    saved = plan.available_gb
    plan.available_gb = lambda: 100.0
    try:
        alone, _ = plan.decide_checkpointing(model, SimpleNamespace(bf16=False, fp16=False, world_size=1), 4096)
    finally:
        plan.available_gb = saved
    assert alone is False

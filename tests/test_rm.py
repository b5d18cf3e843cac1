"""rm end to end: a sequence's score is the value head at its last token, the same in a padding-free batch of pairs
as in transformers' own AutoModelForSequenceClassification built from the saved files; training on an obvious
preference raises accuracy; value_head.safetensors is written (never into the model's weights), loads back for
evaluation, and survives a resume."""

import json
from pathlib import Path

import pytest
import torch

from tiny import base_config, run_example, train_with
from trainer.data.options import DataArguments
from trainer.data import processing
from trainer.data.collators import Collator
from trainer.data.packing import unpacked_dataset
from trainer.data.templates import get_template


def _rm(model_dir, data_dir, out, **kw):
    return base_config(model_dir, data_dir, out, **{"stage": "rm", "dataset": "pairs", **kw})


def _pair_items(pairs_dir, tokenizer, n):
    template = get_template("chatml", tokenizer)
    args = DataArguments(dataset_dir=str(pairs_dir), cutoff_len=256)
    data, _ = processing.tokenized_dataset(["pairs"], args, "pairwise", tokenizer, template, True)
    return [unpacked_dataset(data)[i] for i in range(n)]


def _sequences(items):
    for item in items:
        start = 0
        for n in item["lengths"]:
            yield item["input_ids"][start:start + n]
            start += n


def _stage_scores(model_dir, items, share_prefix, adapter=None):
    """Scores of every sequence of the items, through the rm stage on one padding-free batch."""
    from transformers import AutoModelForCausalLM

    from trainer.model import kernels, value_head
    from trainer.model.wrapper import ModelWrapper

    kernels.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=kernels.SEGMENTS)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    head = value_head.attach(model, [adapter or model_dir])
    wrapper = ModelWrapper(model)
    batch = Collator(0, share_prefix=share_prefix)(items)
    with torch.no_grad():
        values = wrapper.token_values(model, batch, head)
    return values[0, batch["cu_seq_lens_q"][1:].long() - 1]


def test_scores_equal_sequence_classification_from_the_saved_files(tiny_model_dir, pairs_dir, tiny_tokenizer,
                                                                   tmp_path):
    """A full rm run saves the causal LM without the head and value_head.safetensors beside it; transformers'
    AutoModelForSequenceClassification over those files (score = v_head.summary.weight, README "Reward models")
    gives every sequence the score the stage computes for it inside a padding-free batch of 6 pairs, with each
    pair's prompt computed once or twice."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "full"
    train_with(_rm(tiny_model_dir, pairs_dir, out, finetuning_type="full", max_steps=3, learning_rate=1e-3))
    head = load_file(out / "value_head.safetensors")
    assert sorted(head) == ["v_head.summary.bias", "v_head.summary.weight"]
    assert float(head["v_head.summary.bias"]) == 0.0  # the pairwise loss cannot move it
    assert not any("v_head" in k for k in load_file(out / "model.safetensors"))

    items = _pair_items(pairs_dir, tiny_tokenizer, 6)
    ours = {share: _stage_scores(out, items, share) for share in (True, False)}
    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1, dtype=torch.float32)
    classifier.config.pad_token_id = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        classifier.score.weight.copy_(head["v_head.summary.weight"])
        theirs = torch.stack([classifier(input_ids=torch.tensor([ids])).logits[0, 0] for ids in _sequences(items)])
    assert len(theirs) == 12 and theirs.std() > 0
    for share in (True, False):
        torch.testing.assert_close(ours[share], theirs, rtol=1e-5, atol=1e-5)


def test_lora_rm_learns_an_obvious_preference_and_loads_back(tiny_model_dir, pairs_dir, tmp_path):
    out = tmp_path / "lora"
    cfg = _rm(tiny_model_dir, pairs_dir, out, max_steps=20, learning_rate=2e-2, logging_steps=5,
              per_device_train_batch_size=4, val_size=4, eval_strategy="no", do_eval=True)
    results, state = train_with(cfg)
    logged = [e for e in state["log_history"] if "accuracy" in e and "eval_loss" not in e]
    assert logged[-1]["accuracy"] > 0.9 and logged[-1]["margin"] > logged[0]["margin"]
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert results["eval_accuracy"] > 0.5 and results["eval_margin"] > 0
    assert (out / "value_head.safetensors").is_file() and (out / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert not adapter_config.get("modules_to_save")  # a plain LoRA adapter: loads on the plain base model
    # Evaluating the saved reward model (do_train: false, the adapter and its value head) gives the same figures.
    again, _ = train_with(_rm(tiny_model_dir, pairs_dir, tmp_path / "eval", do_train=False, do_eval=True,
                              adapter_name_or_path=str(out), val_size=4, per_device_eval_batch_size=3))
    assert again["eval_accuracy"] == pytest.approx(results["eval_accuracy"])
    assert again["eval_margin"] == pytest.approx(results["eval_margin"], rel=1e-4)
    assert again["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-4)


def test_a_resumed_rm_run_restores_its_value_head(tiny_model_dir, pairs_dir, tmp_path):
    """Stopped after step 2 and resumed: the same losses and the same final head as one uninterrupted run."""
    common = dict(finetuning_type="full", max_steps=4, learning_rate=1e-2, per_device_train_batch_size=4,
                  save_steps=2)
    _, whole = train_with(_rm(tiny_model_dir, pairs_dir, tmp_path / "whole", **common))
    train_with(_rm(tiny_model_dir, pairs_dir, tmp_path / "parts", **{**common, "max_steps": 2}))
    _, resumed = train_with(_rm(tiny_model_dir, pairs_dir, tmp_path / "parts", resume_from_checkpoint=True,
                                **common))
    losses = lambda s: [e["loss"] for e in s["log_history"] if "loss" in e]  # noqa: E731
    assert losses(resumed)[-2:] == pytest.approx(losses(whole)[-2:], rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "value_head.safetensors")
    b = load_file(tmp_path / "parts" / "value_head.safetensors")
    torch.testing.assert_close(a, b)


def test_the_rm_example_runs_through_the_cli(tiny_model_dir, tmp_path):
    """examples/rm_lora.yaml on the demo pairs, on the tiny model for speed."""
    out = tmp_path / "rm"
    proc = run_example("rm_lora.yaml", tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "accuracy" in e]
    assert len(logged) == 3 and all(0 <= e["accuracy"] <= 1 for e in logged)
    assert (out / "value_head.safetensors").is_file() and (out / "adapter_model.safetensors").is_file()


def test_the_best_checkpoint_brings_its_value_head_back(tiny_model_dir, pairs_dir, tmp_path):
    """load_best_model_at_end restores the value head of the best checkpoint with its weights (the final save then
    writes that pair), not the last step's head beside the best step's model."""
    from safetensors.torch import load_file

    out = tmp_path / "best"
    _, state = train_with(_rm(tiny_model_dir, pairs_dir, out, finetuning_type="full", max_steps=6, learning_rate=5e-2,
                              per_device_train_batch_size=4, val_size=4, eval_strategy="steps", eval_steps=2,
                              save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_accuracy",
                              greater_is_better=True))
    best = state["best_model_checkpoint"]
    assert best and not best.endswith("checkpoint-6")  # lr 5e-2 overshoots: the best accuracy came before the end
    final, kept = load_file(out / "value_head.safetensors"), load_file(Path(best) / "value_head.safetensors")
    torch.testing.assert_close(final, kept)

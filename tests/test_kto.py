"""kto end to end: tagged data in LLaMA-Factory's layout (bad tags reported by row), mismatched pairs built from the
batch that really are mismatched, the loss against the paper's formula, step 0 at policy = reference, and
training on an obvious pattern widening the margin between desirable and undesirable rewards."""

import json
import math

import pytest
import torch

from tiny import base_config, run_example, train_with
from trainer.data.options import DataArguments
from trainer.data import processing
from trainer.data.collators import Collator, last_trained_span
from trainer.stages.kto_data import KtoPairs
from trainer.data.packing import unpacked_dataset
from trainer.data.templates import get_template


@pytest.fixture()
def tagged_dir(tmp_path):
    """Agreeing answers are desirable, refusals undesirable; alpaca and sharegpt layouts."""
    rows = []
    for i in range(16):
        rows.append({"instruction": f"Question {i}: do you agree?", "input": "",
                     "output": "Yes, I agree." + " Yes" * (i % 3), "kto_tag": True})
        rows.append({"instruction": f"Question {i}: do you agree?", "input": "",
                     "output": "No." + " no" * (i % 4), "kto_tag": False})
    share = [{"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": "Yes, I agree."}],
              "label": i % 2 == 0} for i in range(12)]
    share.append({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes"}], "label": "yes"})
    (tmp_path / "tagged.json").write_text(json.dumps(rows))
    (tmp_path / "chat.json").write_text(json.dumps(share))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "tagged": {"file_name": "tagged.json", "columns": {"prompt": "instruction", "query": "input",
                                                           "response": "output", "kto_tag": "kto_tag"}},
        "chat": {"file_name": "chat.json", "formatting": "sharegpt",
                 "columns": {"messages": "conversations", "kto_tag": "label"}}}))
    return tmp_path


def _kto(model_dir, data_dir, out, **kw):
    return base_config(model_dir, data_dir, out, **{"stage": "kto", "dataset": "tagged", **kw})


def test_tagged_rows_tokenize_with_their_tags_and_bad_tags_are_reported(tagged_dir, tiny_tokenizer):
    template = get_template("chatml", tiny_tokenizer)
    args = DataArguments(dataset_dir=str(tagged_dir), cutoff_len=256)
    data, report = processing.tokenized_dataset(["tagged", "chat"], args, "kto", tiny_tokenizer, template, True)
    assert report.examples == 44 and report.bad == 1
    assert any("row 13" in s and "kto_tag (column 'label') is 'yes'" in s for s in report.bad_samples)
    tags = data["kto_tag"]
    assert tags[:2] == [1, 0] and sum(tags) == 16 + 6
    item = unpacked_dataset(data)[0]
    start, end = last_trained_span(item["labels"])
    assert tiny_tokenizer.decode(item["input_ids"][start:end]) == "Yes, I agree.<|im_end|>"


def test_mismatched_pairs_come_from_the_batch_and_never_pair_an_example_with_itself(tagged_dir, tiny_tokenizer):
    template = get_template("chatml", tiny_tokenizer)
    args = DataArguments(dataset_dir=str(tagged_dir), cutoff_len=256)
    data, _ = processing.tokenized_dataset(["tagged"], args, "kto", tiny_tokenizer, template, True)
    items = [unpacked_dataset(data)[i] for i in range(5)]
    batch = KtoPairs(Collator(0))(items)
    ids, bounds = batch["input_ids"][0].tolist(), batch["cu_seq_lens_q"].tolist()
    seqs = [ids[a:b] for a, b in zip(bounds, bounds[1:])]
    assert len(seqs) == 10 and batch["kl_valid"].tolist() == [1.0] * 5
    answers = [it["input_ids"][slice(*last_trained_span(it["labels"]))] for it in items]
    prompts = [it["input_ids"][:last_trained_span(it["labels"])[0]] for it in items]
    partners = []
    for i in range(5):
        assert seqs[2 * i] == items[i]["input_ids"]  # the example itself
        mismatched = seqs[2 * i + 1]
        assert mismatched[:len(prompts[i])] == prompts[i]  # its own prompt...
        partner = [j for j in range(5) if mismatched[len(prompts[i]):] == answers[j]]
        assert partner and partner[0] != i  # ...with another example's answer
        partners.append(partner[0])
    assert partners == [1, 0, 3, 2, 3]
    assert batch["kto_tag"].tolist() == [bool(it["kto_tag"][0]) for it in items]
    assert KtoPairs(Collator(0))(items[:1])["kl_valid"].tolist() == [0.0]


def test_loss_against_the_formula():
    from trainer.stages.kto import kto_losses

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, generator=g, dtype=torch.float64) * 3
    desirable = torch.rand(64, generator=g) > 0.4
    kl, beta, wd, wu = 0.7, 0.3, 1.5, 0.8
    ours = kto_losses(delta, torch.tensor(kl, dtype=torch.float64), desirable, beta, wd, wu)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [wd * (1 - sig(beta * (d - kl))) if t else wu * (1 - sig(beta * (kl - d)))
                for d, t in zip(delta.tolist(), desirable.tolist())]
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64))


def test_step_zero_is_half_a_weight_per_example(tiny_model_dir, tagged_dir, tmp_path):
    """LoRA's B starts at zero: policy = reference, so every r = 0, z = 0 and each loss is w/2."""
    _, state = train_with(_kto(tiny_model_dir, tagged_dir, tmp_path / "run", max_steps=1,
                               per_device_train_batch_size=32, kto_chosen_weight=2.0, kto_rejected_weight=1.0))
    first = [e for e in state["log_history"] if "loss" in e][0]
    assert first["loss"] == pytest.approx((16 * 2.0 + 16 * 1.0) / 32 / 2, rel=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["count/desirable"] == 16 and first["count/undesirable"] == 16


def test_precomputed_reference_pairs_are_the_pairs_training_uses(tiny_model_dir, tagged_dir, tmp_path, caplog):
    """A full run's reference is its starting weights: with the reference log-probs of every example and of its
    mismatched pair (fixed ahead) computed in the pass before training, step 1 sees Δ = 0 and z = 0 exactly as if
    computed on the fly in the training batch; a different pairing would move z."""
    with caplog.at_level("INFO"):
        _, state = train_with(_kto(tiny_model_dir, tagged_dir, tmp_path / "run", finetuning_type="full", max_steps=3,
                                   per_device_train_batch_size=4, precompute_ref_log_probs=True, learning_rate=1e-2,
                                   per_device_eval_batch_size=3))
    assert "Reference log-probs of 32 train pairs computed before training" in caplog.text
    logged = [e for e in state["log_history"] if "loss" in e]
    assert logged[0]["loss"] == pytest.approx(0.5, rel=1e-5)
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert logged[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert logged[-1]["loss"] != pytest.approx(0.5, abs=1e-4)  # and then it trains


def test_training_on_an_obvious_pattern_widens_the_margin(tiny_model_dir, tagged_dir, tmp_path):
    out = tmp_path / "run"
    results, state = train_with(_kto(tiny_model_dir, tagged_dir, out, max_steps=16, learning_rate=2e-2,
                                     logging_steps=4, per_device_train_batch_size=8, val_size=8, do_eval=True))
    logged = [e for e in state["log_history"] if "rewards/margins" in e and "eval_loss" not in e]
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"] and logged[-1]["rewards/margins"] > 0.1
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert results["eval_rewards/margins"] > 0 and "eval_kl" in results and results["eval_count/desirable"] > 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))


def test_guard_rails(tiny_model_dir, tagged_dir, tmp_path):
    from trainer.run import build_config
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"per_device_train_batch_size: kto pairs each example's prompt"):
        build_config(_kto(tiny_model_dir, tagged_dir, tmp_path / "o", per_device_train_batch_size=1))
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size: kto pairs"):  # split into passes of 1
        build_config(_kto(tiny_model_dir, tagged_dir, tmp_path / "o", forward_batch_size="1"))
    with pytest.raises(ConfigError, match=r"padding_free: false lays one sequence a row; stage kto"):
        build_config(_kto(tiny_model_dir, tagged_dir, tmp_path / "o", padding_free=False))
    with pytest.raises(ConfigError, match=r"packing: kto keeps one example a row"):
        build_config(_kto(tiny_model_dir, tagged_dir, tmp_path / "o", packing=True))


def test_the_kto_example_runs_through_the_cli(tiny_model_dir, tmp_path):
    """examples/kto_lora.yaml on its demo set (examples/data/kto_demo.json), on the tiny model for speed."""
    out = tmp_path / "kto"
    proc = run_example("kto_lora.yaml", tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kto data: 16 desirable and 16 undesirable examples." in proc.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "kl" in e]
    assert len(logged) == 3 and logged[0]["loss"] == pytest.approx(0.5, rel=1e-4)
    assert (out / "adapter_model.safetensors").is_file()


def test_a_kind_absent_from_a_window_is_left_out_not_logged_as_zero():
    from trainer.stages.kto import KTO

    figures = KTO().summarize({"rewards/chosen": (0.0, 0.0), "rewards/rejected": (-3.0, 2.0), "loss": (1.0, 2.0),
                               "count/desirable": (0.0, None)})
    assert figures == {"rewards/rejected": -1.5, "loss": 0.5, "count/desirable": 0.0}  # and no rewards/margins

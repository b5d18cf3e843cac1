"""kto end to end: tagged data in LLaMA-Factory's layout (bad tags reported by row), long prompts shortened as in
LLaMA-Factory, mismatched pairs fixed ahead as dataset neighbours, the reference point over the whole optimizer step
(batch 1 x 8 trains as 8 x 1; z against an independent computation), the loss against the paper's formula, step 0
at policy = reference, and training on an obvious pattern widening the margin between desirable and undesirable
rewards."""

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
    assert tiny_tokenizer.decode(item["input_ids"][start:end]) == "Yes, I agree.<|im_end|>\n"


def _sequences(batch):
    ids, bounds = batch["input_ids"][0].tolist(), batch["cu_seq_lens_q"].tolist()
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


def test_mismatched_pairs_are_fixed_dataset_neighbours_whatever_the_batch(tagged_dir, tiny_tokenizer):
    """Each example's mismatched pair is its prompt with its dataset neighbour's answer (0 and 1 swap, 2 and 3, ...;
    an odd last one takes the one before), the same whichever examples share its batch: a batch of one has its
    pair too. The examples and their mismatched pairs come as two batches."""
    template = get_template("chatml", tiny_tokenizer)
    args = DataArguments(dataset_dir=str(tagged_dir), cutoff_len=256)
    data, _ = processing.tokenized_dataset(["tagged"], args, "kto", tiny_tokenizer, template, True)
    data = data.select(range(5))
    dataset = unpacked_dataset(data, partners=True)
    collate = KtoPairs(Collator(0), cutoff_len=256)
    items = [dataset[i] for i in range(5)]
    answers = [it["input_ids"][slice(*last_trained_span(it["labels"]))] for it in items]
    prompts = [it["input_ids"][:last_trained_span(it["labels"])[0]] for it in items]
    partner = [1, 0, 3, 2, 3]
    for order in ([0, 1, 2, 3, 4], [4, 2, 0], [3], [1]):
        batch = collate([items[i] for i in order])
        assert _sequences(batch) == [items[i]["input_ids"] for i in order]  # the examples themselves
        assert _sequences(batch["kl"]) == [prompts[i] + answers[partner[i]] for i in order]
        assert batch["kto_tag"].tolist() == [bool(items[i]["kto_tag"][0]) for i in order]
    assert all(prompts[i] != prompts[partner[i]] or answers[i] != answers[partner[i]] for i in range(5))
    lone = KtoPairs(Collator(0))([unpacked_dataset(data.select([0]), partners=True)[0]])
    assert (lone["kl"]["labels"] != -100).sum() == 0  # no partner: no trained token, left out of z


def test_a_stream_pairs_its_examples_as_neighbours_too():
    from trainer.data.packing import neighbour_partners

    examples = [{"input_ids": [10 * i, 10 * i + 1, 10 * i + 2], "labels": [-100, 10 * i + 1, 10 * i + 2],
                 "lengths": [3]} for i in range(3)]
    paired = list(neighbour_partners(examples))
    assert [p["partner_ids"] for p in paired] == [[11, 12], [1, 2], []]  # 0 and 1 swap; a lone last one has none
    assert [p["input_ids"] for p in paired] == [e["input_ids"] for e in examples]


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


def test_a_long_prompt_is_shortened_and_its_answer_kept_whole(tagged_dir, tiny_tokenizer):
    """As in LLaMA-Factory (infer_seqlen), a prompt longer than cutoff_len is shortened and a short answer kept whole:
    the example trains (counted as truncated) instead of being dropped with no answer left. Its mismatched pair
    shares cutoff_len the same way between its prompt and the partner's answer."""
    long_rows = [{"instruction": "Tell me. " + "Long question words here. " * 40, "input": "", "output": "Yes.",
                  "kto_tag": True},
                 {"instruction": "Short?", "input": "", "output": "No, " + "not at all, " * 30 + "no.",
                  "kto_tag": False}]
    (tagged_dir / "long.json").write_text(json.dumps(long_rows))
    info = json.loads((tagged_dir / "dataset_info.json").read_text())
    info["long"] = {**info["tagged"], "file_name": "long.json"}
    (tagged_dir / "dataset_info.json").write_text(json.dumps(info))
    template = get_template("chatml", tiny_tokenizer)
    full = template.encode_batch(tiny_tokenizer, [([{"role": "user", "content": long_rows[0]["instruction"]},
                                                    {"role": "assistant", "content": "Yes."}], "")])[0][0]
    cutoff = 64
    assert len(full) > 2 * cutoff  # the prompt alone is far over cutoff_len
    args = DataArguments(dataset_dir=str(tagged_dir), cutoff_len=cutoff)
    data, report = processing.tokenized_dataset(["long"], args, "kto", tiny_tokenizer, template, True)
    assert (report.examples, report.no_labels, report.truncated) == (2, 0, 2)
    item = unpacked_dataset(data, partners=True)[0]
    start, end = last_trained_span(item["labels"])
    assert tiny_tokenizer.decode(item["input_ids"][start:end]) == "Yes.<|im_end|>\n"  # the whole answer
    assert len(item["input_ids"]) == cutoff and item["input_ids"][:start] == full[:start]  # the prompt's start
    mismatched = _sequences(KtoPairs(Collator(0), cutoff_len=cutoff)([item])["kl"])[0]
    prompt, partner = item["input_ids"][:start], item["partner_ids"]
    keep_prompt, keep_answer = processing.llama_factory_budget(len(prompt), len(partner), cutoff)
    assert keep_prompt < len(prompt) and keep_answer < len(partner)  # a long prompt and a long answer: both shortened
    assert mismatched == prompt[:keep_prompt] + partner[:keep_answer] and len(mismatched) == cutoff


def _steps(state, *keys):
    return [tuple(e[k] for k in keys) for e in state["log_history"] if "loss" in e and "grad_norm" in e]


def _mostly_agreeing(folder, n: int):
    """n examples, three in four desirable ("Yes, I agree."): training raises the agreeing answer under every prompt,
    so the mismatched pairs' log-ratio, z, rises above 0 within a few steps."""
    folder.mkdir()
    rows = [{"instruction": f"Question {i}: do you agree?", "input": "", "kto_tag": i % 4 != 3,
             "output": "Yes, I agree." + " Yes" * (i % 3) if i % 4 != 3 else "No."} for i in range(n)]
    (folder / "t.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.json", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "kto_tag": "kto_tag"}}}))
    return folder


def test_batch_one_by_eight_trains_as_eight_by_one(tiny_model_dir, tmp_path):
    """LLaMA-Factory's kto recipe shape (per-device batch 1, accumulation 8) trains, exactly as batch 8 x 1 on the
    same data and seed: each example's mismatched pair is fixed ahead and z is the whole step's, so neither depends
    on how the step is split into micro-batches."""
    data = _mostly_agreeing(tmp_path / "data", 24)
    common = dict(stage="kto", dataset="t", max_steps=4, learning_rate=5e-2, seed=11)
    _, one = train_with(base_config(tiny_model_dir, data, tmp_path / "1x8", per_device_train_batch_size=1,
                                    gradient_accumulation_steps=8, **common))
    _, eight = train_with(base_config(tiny_model_dir, data, tmp_path / "8x1", per_device_train_batch_size=8,
                                      gradient_accumulation_steps=1, **common))
    keys = ("loss", "grad_norm", "kl", "rewards/margins")
    a, b = _steps(one, *keys), _steps(eight, *keys)
    assert len(a) == len(b) == 4
    for step_a, step_b in zip(a, b):
        assert step_a == pytest.approx(step_b, rel=1e-4, abs=1e-7)
    assert a[-1][2] > 1e-3 and a[-1][0] != pytest.approx(0.5, abs=1e-3)  # z moved and the loss with it


def test_kl_is_the_whole_steps_mean_mismatched_log_ratio(tiny_model_dir, tmp_path):
    """z of step 2, logged, against an independent computation: a step holding the whole data set (8 examples,
    batch 1 x accumulation 8, so the shuffle cannot change its examples), the adapter saved after step 1, and each
    example's prompt with its dataset neighbour's answer scored by plain transformers forwards with the adapter on
    and off; z = max(0, the mean log-ratio)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_dir = _mostly_agreeing(tmp_path / "data", 8)
    out = tmp_path / "run"
    _, state = train_with(base_config(tiny_model_dir, data_dir, out, stage="kto", dataset="t", max_steps=2,
                                      save_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=8,
                                      learning_rate=5e-2))
    logged = _steps(state, "kl", "count/desirable")
    assert logged[1][1] == 6  # step 2 holds every example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = get_template("chatml", tokenizer)
    args = DataArguments(dataset_dir=str(data_dir), cutoff_len=128)
    data, _ = processing.tokenized_dataset(["t"], args, "kto", tokenizer, template, True)
    examples = [unpacked_dataset(data)[i] for i in range(8)]
    spans = [last_trained_span(e["labels"]) for e in examples]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(out / "checkpoint-1")).eval()

    def answer_logp(ids, start):
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        return float(logps[start - 1:].sum())

    ratios = []
    with torch.no_grad():
        for i in range(8):
            j = i ^ 1
            prompt = examples[i]["input_ids"][:spans[i][0]]
            ids = prompt + examples[j]["input_ids"][spans[j][0]:spans[j][1]]
            policy = answer_logp(ids, len(prompt))
            with model.disable_adapter():
                reference = answer_logp(ids, len(prompt))
            ratios.append(policy - reference)
    expected = max(0.0, sum(ratios) / len(ratios))
    assert expected > 1e-3  # a reference point that moved, not the clamp
    assert logged[1][0] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert logged[0][0] == pytest.approx(0.0, abs=1e-7)  # step 1: policy = reference

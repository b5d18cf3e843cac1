"""The one data path at scale: batched tokenization equals the per-row reference, cached and streamed data give the
same examples, packing plans are valid, pt's val_size splits whole documents, and the scale benchmark runs."""

import json
import random
from pathlib import Path

import pytest

from trainer.data.options import DataArguments
from trainer.data import processing
from trainer.data.packing import best_fit_bins, pack_dataset, unpacked_dataset
from trainer.data.streaming import stream_examples
from trainer.data.templates import get_template

ROOT = Path(__file__).resolve().parents[1]


def _reference_encode(template, tokenizer, messages, system, train_on_prompt, mask_history):
    """The per-row path, LLaMA-Factory's way: each element of each message encoded on its own in a Python loop;
    replies (odd messages) trained, only the last with mask_history, everything with train_on_prompt."""
    from trainer.data.templates import BOS, EOS, THOUGHT

    per_message = template.messages_elements(messages, system, mask_history=mask_history)
    ids, trained = [], []
    for i, elements in enumerate(per_message):
        reply = i % 2 == 1 and (not mask_history or i == len(per_message) - 1)
        for e in elements:
            if e == BOS:
                piece = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            elif e == EOS:
                piece = [tokenizer.convert_tokens_to_ids(template.eos)]
            else:
                piece = tokenizer.encode(template.empty_thought if e == THOUGHT else e, add_special_tokens=False)
            ids += piece
            trained += [train_on_prompt or reply] * len(piece)
    return ids, trained


@pytest.mark.parametrize("name", ["chatml", "llama3", "default", "gemma"])
@pytest.mark.parametrize("train_on_prompt,mask_history", [(False, False), (True, False), (False, True)])
def test_batched_tokenization_equals_the_per_row_path(name, train_on_prompt, mask_history, tiny_tokenizer):
    from trainer.data import formats, registry

    template = get_template(name, tiny_tokenizer)
    conversations = []
    for dataset in ("alpaca_en_demo", "chat_demo", "identity"):
        spec = registry.get_spec(dataset, str(ROOT / "examples/data"))
        rows, _ = formats.to_canonical(spec, registry.load_rows(spec))
        conversations += [(r["messages"], r["system"]) for r in rows.select(range(min(60, len(rows))))]
    batched = template.encode_batch(tiny_tokenizer, conversations, train_on_prompt, mask_history)
    for (messages, system), (ids, trained) in zip(conversations, batched):
        ref_ids, ref_trained = _reference_encode(template, tiny_tokenizer, messages, system, train_on_prompt,
                                                 mask_history)
        assert ids == ref_ids and trained.tolist() == ref_trained


@pytest.fixture()
def messy_dir(tmp_path):
    """Good rows, bad rows and rows longer than cutoff_len, in one file."""
    rng = random.Random(3)
    rows = []
    for i in range(300):
        if i % 37 == 5:
            rows.append({"instruction": "", "output": "no prompt"})
        else:
            rows.append({"instruction": f"Q{i} " + "word " * rng.randint(1, 30), "output": "answer " * rng.randint(1, 60)})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"m": {"file_name": "m.jsonl"}}))
    return tmp_path


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_cached_and_streamed_data_give_the_same_examples(messy_dir, tiny_tokenizer, policy):
    template = get_template("chatml", tiny_tokenizer)
    args = DataArguments(dataset_dir=str(messy_dir), cutoff_len=96, cutoff_policy=policy, max_bad_rows=20)
    data, report = processing.tokenized_dataset(["m"], args, "supervised", tiny_tokenizer, template, True)
    cached = [unpacked_dataset(data)[i] for i in range(len(data))]
    streamed = list(stream_examples(["m"], args, "supervised", tiny_tokenizer, template))
    assert report.bad == 8 and (report.truncated if policy == "truncate" else report.dropped_long) > 20
    assert len(cached) == report.examples == len(streamed)
    assert cached == streamed


def test_packing_plan_places_every_example_once(tiny_tokenizer, messy_dir):
    template = get_template("chatml", tiny_tokenizer)
    args = DataArguments(dataset_dir=str(messy_dir), cutoff_len=64, max_bad_rows=20)
    data, _ = processing.tokenized_dataset(["m"], args, "supervised", tiny_tokenizer, template, True)
    packed, _ = pack_dataset(data, 64)
    seen = []
    for i in range(len(packed)):
        item = packed[i]
        assert len(item["input_ids"]) == sum(item["lengths"]) <= 64
        seen += [tuple(ids) for ids in _split(item["input_ids"], item["lengths"])]
    assert sorted(seen) == sorted(tuple(ids) for ids in data["input_ids"])


def _split(values, lengths):
    start = 0
    for n in lengths:
        yield values[start:start + n]
        start += n


def test_pt_val_size_holds_out_whole_documents(tiny_tokenizer, tmp_path):
    docs = [{"text": " ".join(f"w{j}" for j in range(5 + 40 * (i % 4)))} for i in range(40)]
    (tmp_path / "d.json").write_text(json.dumps(docs))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    args = DataArguments(dataset_dir=str(tmp_path), cutoff_len=32)
    data, _ = processing.tokenized_dataset(["d"], args, "pretrain", tiny_tokenizer, None, True)
    assert len(data) > 40  # long documents became several pieces
    train, held = processing.split_validation(data, 0.25, seed=1, by_document=True)
    assert len(set(held["_doc"])) == 10 and not set(train["_doc"]) & set(held["_doc"])
    assert len(train) + len(held) == len(data)


def test_scale_benchmark_runs_small(tmp_path, capsys):
    from benchmarks.data_scale import main

    assert main(["--rows", "3000", "--plan", "20000", "--tokenizer", "tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "data_scale.json").read_text())
    assert result["rows"] == 3000 and result["examples"] == 3000 and result["plan_examples"] == 20000
    assert result["plan_valid"] is True


def test_best_fit_plan_of_many_lengths_is_valid():
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(20000)]
    bins = best_fit_bins(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)

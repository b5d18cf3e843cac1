"""pt: documents end in EOS, long ones are split (not cut) into cutoff_len pieces, short ones packed whole;
streaming reads, tokenizes and packs on the fly."""

import itertools
import json

import pytest

from tiny import base_config, train_with
from trainer.data.options import DataArguments
from trainer.data.packing import pack_dataset
from trainer.data.processing import encode_pretrain, split_document, tokenized_dataset
from trainer.data.streaming import packed_stream, stream_examples


@pytest.fixture()
def corpus_dir(tmp_path):
    docs = [{"text": " ".join(["word"] * n)} for n in (3, 40, 7, 300, 12, 5, 90)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (folder / "dataset_info.json").write_text(json.dumps({"docs": {"file_name": "docs.jsonl", "columns": {"prompt": "text"}}}))
    return folder


def test_documents_split_not_cut(tiny_tokenizer):
    text = " ".join(["word"] * 100)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    [chunks] = encode_pretrain([{"messages": [{"content": text}]}], tiny_tokenizer, None, DataArguments(cutoff_len=32))
    assert [len(c["input_ids"]) for c in chunks[:-1]] == [32] * (len(chunks) - 1)
    assert sum((c["input_ids"] for c in chunks), []) == ids  # nothing lost, EOS last
    assert all(c["labels"] == c["input_ids"] for c in chunks)


def test_a_lone_last_token_borrows_one_from_the_piece_before():
    """A last piece of only EOS could train nothing (and was dropped as if truncated): it takes a token along."""
    ids = list(range(65))
    pieces = split_document(ids, 32)
    assert [len(p) for p in pieces] == [32, 31, 2] and sum(pieces, []) == ids
    assert [len(p) for p in split_document(list(range(64)), 32)] == [32, 32]


def test_pt_packs_and_trains(tiny_model_dir, corpus_dir, tiny_tokenizer, tmp_path):
    args = DataArguments(dataset_dir=str(corpus_dir), cutoff_len=64)
    data, report = tokenized_dataset(["docs"], args, "pretrain", tiny_tokenizer, None, True)
    assert max(data["length"]) <= 64 and report.examples > 7  # the long documents were split
    packed, efficiency = pack_dataset(data, 64)
    assert len(packed) < len(data) and 0 < efficiency <= 1
    cfg = base_config(tiny_model_dir, corpus_dir, tmp_path / "pt", stage="pt", dataset="docs", template=None,
                      cutoff_len=64, finetuning_type="full", max_steps=4, learning_rate=1e-2)
    _, state = train_with(cfg)
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_a_stream_that_wraps_keeps_every_step_whole(tiny_model_dir, corpus_dir, tmp_path):
    """A short stream read many times over 25 steps: every step holds the same number of passes (no step is
    cut at the stream's end or made of two ends), and no logged loss jumps (before: one step logged twice the
    loss of its neighbours)."""
    from trainer.data.collators import Collator

    calls = []
    original = Collator.__call__
    Collator.__call__ = lambda self, items: calls.append(len(items)) or original(self, items)
    try:
        cfg = base_config(tiny_model_dir, corpus_dir, tmp_path / "wrap", stage="pt", dataset="docs", template=None,
                          cutoff_len=64, streaming=True, max_steps=25, per_device_train_batch_size=2,
                          learning_rate=1e-4)
        _, state = train_with(cfg)
    finally:
        Collator.__call__ = original
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 25 and len(losses) == 25
    # auto on CPU: two one-row passes a step, never fewer (accelerate reads one batch ahead: 51)
    assert len(calls) in (50, 51) and set(calls) == {1}
    for before, here in zip(losses, losses[1:]):
        assert here < 1.5 * before, losses


def test_streaming_packs_on_the_fly_and_runs(tiny_model_dir, corpus_dir, tiny_tokenizer, tmp_path):
    args = DataArguments(dataset_dir=str(corpus_dir), cutoff_len=64, packing=True)
    offline, _ = tokenized_dataset(["docs"], args, "pretrain", tiny_tokenizer, None, True)
    one_pass = list(stream_examples(["docs"], args, "pretrain", tiny_tokenizer, None))
    assert [len(e["input_ids"]) for e in one_pass] == offline["length"]
    rows = list(itertools.islice(packed_stream(["docs"], args, "pretrain", tiny_tokenizer, None, pack=True), 20))
    assert all(len(r["input_ids"]) <= 64 and sum(r["lengths"]) == len(r["input_ids"]) for r in rows)
    assert len({len(r["lengths"]) for r in rows}) > 1  # several examples share rows
    cfg = base_config(tiny_model_dir, corpus_dir, tmp_path / "stream", stage="pt", dataset="docs", template=None,
                      cutoff_len=64, streaming=True, max_steps=3)
    _, state = train_with(cfg)
    assert state["global_step"] == 3
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="max_steps"):
        train_with({**cfg, "max_steps": -1, "output_dir": str(tmp_path / "s2")})

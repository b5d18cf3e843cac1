"""dataset_info.json, formats, bad rows, truncation, mixing, max_samples, val_size and the token cache."""

import json
import logging

import pytest

from trainer.data.options import DataArguments
from trainer.data import processing, registry
from trainer.data.formats import to_canonical
from trainer.data.templates import get_template
from trainer.errors import ConfigError


def _args(data_dir, **kw):
    return DataArguments(dataset_dir=str(data_dir), template="chatml", cutoff_len=kw.pop("cutoff_len", 256), **kw)


def _canonical(data_dir, name):
    spec = registry.get_spec(name, str(data_dir))
    return to_canonical(spec, registry.load_rows(spec))


def test_alpaca_with_history_and_system(tmp_path):
    rows = [{"q": "Second?", "ctx": "extra", "a": "Yes.", "sys": "S", "hist": [["First?", "No."]]}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json", "columns": {
        "prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "hist"}}}))
    data, bad = _canonical(tmp_path, "a")
    assert not bad
    assert data[0]["system"] == "S"
    assert data[0]["messages"] == [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "No."},
                                   {"role": "user", "content": "Second?\nextra"},
                                   {"role": "assistant", "content": "Yes."}]


def test_sharegpt_and_openai(tmp_path):
    share = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "u"},
                                {"from": "gpt", "value": "a"}]}]
    openai = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in share))
    (tmp_path / "o.json").write_text(json.dumps(openai))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "s": {"file_name": "s.jsonl", "formatting": "sharegpt"},
        "o": {"file_name": "o.json", "formatting": "openai"}}))
    s, _ = _canonical(tmp_path, "s")
    o, _ = _canonical(tmp_path, "o")
    assert s[0]["system"] == "S" and s[0]["messages"] == o[0]["messages"]


def test_bad_rows_are_counted_with_file_and_row(tmp_path, tiny_tokenizer, caplog):
    rows = [{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
            {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "u"}]},
            {"conversations": []},
            {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": ""}]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"c": {"file_name": "c.jsonl", "formatting": "sharegpt"}}))
    template = get_template("chatml", tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        data, report = processing.tokenized_dataset(["c"], _args(tmp_path, max_bad_rows=3), "supervised", tiny_tokenizer,
                                                    template, True)
    assert len(data) == 1 and report.read == 4 and report.bad == 3
    text = caplog.text
    assert "skipped 3 malformed rows" in text and "c.jsonl" in text
    assert "row 2: turn 0 is 'assistant'" in text and "row 3:" in text and "row 4: turn 1 has empty content" in text


def test_missing_name_file_and_column_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "i", "output": "o"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "a": {"file_name": "a.json"}, "gone": {"file_name": "missing.json"},
        "cols": {"file_name": "a.json", "columns": {"prompt": "question"}}}))
    with pytest.raises(ConfigError, match="'colz' is not in .*dataset_info.json.*Did you mean: cols"):
        registry.get_spec("colz", str(tmp_path))
    with pytest.raises(ConfigError, match="missing.json"):
        registry.get_spec("gone", str(tmp_path))
    with pytest.raises(ConfigError, match="column 'question' not found"):
        _canonical(tmp_path, "cols")
    with pytest.raises(ConfigError, match="no dataset_info.json"):
        registry.get_spec("a", str(tmp_path / "nowhere"))


def test_truncation_is_counted_and_labelless_examples_dropped(data_dir, tiny_tokenizer, caplog):
    template = get_template("chatml", tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        data, report = processing.tokenized_dataset(["alpaca"], _args(data_dir, cutoff_len=40), "supervised",
                                                    tiny_tokenizer, template, True)
    assert report.truncated > 0 and "truncated" in caplog.text
    assert max(data["length"]) <= 40
    assert report.examples + report.no_labels == report.read


def test_mixing_max_samples_and_val_size(data_dir, tiny_tokenizer):
    template = get_template("chatml", tiny_tokenizer)
    data, report = processing.tokenized_dataset(["alpaca", "chat"], _args(data_dir, max_samples=5), "supervised",
                                                tiny_tokenizer, template, True)
    assert len(data) == 10 and report.read == 10
    train, val = processing.split_validation(data, 0.2, seed=1)
    assert (len(train), len(val)) == (8, 2)
    train, val = processing.split_validation(data, 3, seed=1)
    assert (len(train), len(val)) == (7, 3)


def test_cache_is_reused_and_keyed_on_what_changes_it(data_dir, tiny_tokenizer, caplog):
    template = get_template("chatml", tiny_tokenizer)
    args = _args(data_dir)
    first, _ = processing.tokenized_dataset(["alpaca"], args, "supervised", tiny_tokenizer, template, False)
    with caplog.at_level(logging.INFO, logger="trainer"):
        again, _ = processing.tokenized_dataset(["alpaca"], args, "supervised", tiny_tokenizer, template, False)
    assert "Reusing tokenized data" in caplog.text and again["input_ids"] == first["input_ids"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):  # overwrite_cache rebuilds
        processing.tokenized_dataset(["alpaca"], args, "supervised", tiny_tokenizer, template, True)
        # another template, another cutoff and edited data all miss the cache
        processing.tokenized_dataset(["alpaca"], args, "supervised", tiny_tokenizer, get_template("llama3", tiny_tokenizer),
                                     False)
        processing.tokenized_dataset(["alpaca"], _args(data_dir, cutoff_len=64), "supervised", tiny_tokenizer, template,
                                     False)
        rows = json.loads((data_dir / "alpaca.json").read_text())
        rows[0]["output"] = "changed"
        (data_dir / "alpaca.json").write_text(json.dumps(rows))
        changed, _ = processing.tokenized_dataset(["alpaca"], args, "supervised", tiny_tokenizer, template, False)
    assert "Reusing tokenized data" not in caplog.text
    assert changed["input_ids"][0] != first["input_ids"][0]


def test_csv_and_parquet_files(tmp_path):
    import datasets

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"c": {"file_name": "a.csv"},
                                                            "p": {"file_name": "a.parquet"}}))
    for name in ("c", "p"):
        data, bad = _canonical(tmp_path, name)
        assert not bad and [m[1]["content"] for m in data["messages"]] == ["a0", "a1", "a2"]

"""Templates through the data path: sharegpt rows with tools, calls and observations, as sft and as multi-turn
preference pairs; a row whose tool JSON its format cannot write is a reported bad row; template: auto trains in a
run and its tokenized data is found in the cache again."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny import base_config, build_model, train_with
from trainer.data import processing
from trainer.data.options import DataArguments
from trainer.data.packing import unpacked_dataset
from trainer.data.templates import get_template

GOLDENS = Path(__file__).parent / "data" / "lf_goldens"
sys.path.insert(0, str(GOLDENS))
from conversations import TOOLS  # noqa: E402

CALL = json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}})


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GOLDENS / "tokenizer")


def _tool_rows(n: int, bad_at: int | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"tools": "[{not json" if i == bad_at else TOOLS, "conversations": [
            {"from": "human", "value": f"Add 1 and 2, case {i}"}, {"from": "function_call", "value": CALL},
            {"from": "observation", "value": "3"}, {"from": "gpt", "value": f"It is 3 ({i})."}]})
    return rows


def _dataset_dir(tmp_path: Path, rows: list[dict], ranking: bool = False) -> Path:
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    columns = {"messages": "conversations", "tools": "tools"}
    if ranking:
        columns.update(chosen="chosen", rejected="rejected")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"rows": {
        "file_name": "rows.json", "formatting": "sharegpt", "ranking": ranking, "columns": columns}}))
    return tmp_path


def _trained_text(tok, item) -> list[str]:
    ids, labels = np.asarray(item["input_ids"]), np.asarray(item["labels"])
    spans, run = [], []
    for i, lab in zip(ids, labels):
        if lab == i:
            run.append(int(i))
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans + ([tok.decode(run)] if run else [])


def test_tool_rows_train_the_call_and_the_answer_and_a_bad_row_is_reported(tok, tmp_path):
    data_dir = _dataset_dir(tmp_path, _tool_rows(6, bad_at=4))
    template = get_template("qwen", tok)
    args = DataArguments(dataset_dir=str(data_dir), cutoff_len=4096, max_bad_rows=1)
    data, report = processing.tokenized_dataset(["rows"], args, "supervised", tok, template, True)
    assert report.examples == 5 and report.bad == 1
    assert "row 5" in report.bad_samples[0] and "tools" in report.bad_samples[0].lower()
    item = unpacked_dataset(data)[0]
    text = tok.decode(item["input_ids"])
    assert "# Tools" in text and '"name": "get_weather"' in text  # the tool list in the system turn (qwen's format)
    assert _trained_text(tok, item) == ['<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
                                        '<|im_end|>\n', "It is 3 (0).<|im_end|>\n"]
    assert "<tool_response>\n3\n</tool_response>" in text  # the observation, untrained


def test_multi_turn_preference_pairs_with_tools(tok, tmp_path):
    rows = [{"tools": TOOLS, "conversations": r["conversations"][:3],
             "chosen": {"from": "gpt", "value": "It is 3."}, "rejected": {"from": "gpt", "value": "It is 4."}}
            for r in _tool_rows(4)]
    data_dir = _dataset_dir(tmp_path, rows, ranking=True)
    template = get_template("llama3", tok)
    data, report = processing.tokenized_dataset(["rows"], DataArguments(dataset_dir=str(data_dir), cutoff_len=4096),
                                                "pairwise", tok, template, True)
    assert report.examples == 4 and report.bad == 0
    item = unpacked_dataset(data)[0]
    assert _trained_text(tok, item) == ["It is 3.<|eot_id|>", "It is 4.<|eot_id|>"]  # only the answers
    first = tok.decode(item["input_ids"][:data["segments"][0][0]])
    assert "You have access to the following functions" in first and '{"name": "add", "parameters"' in first


def test_template_auto_trains_and_its_data_is_cached(tmp_path, monkeypatch):
    """A tiny model whose tokenizer carries SmolLM2's own chat_template, trained with template: auto; a second run
    finds the tokenized data in the cache (the template's key is stable across processes)."""
    from tiny import build_tokenizer, write_dataset_dir, alpaca_rows

    model = tmp_path / "m"
    tok = build_tokenizer(model, eos="<|im_end|>")
    tok.chat_template = (Path(__file__).parent / "data" / "chat_templates" / "smollm2.jinja").read_text()
    tok.save_pretrained(model)
    build_model(model, len(tok))
    monkeypatch.setenv("ZEROTUNE_CACHE", str(tmp_path / "cache"))
    data = write_dataset_dir(tmp_path / "d", alpaca_rows(8))
    for run in ("a", "b"):
        _, state = train_with(base_config(model, data, tmp_path / run, template="auto", max_steps=2))
        assert state["global_step"] == 2
    assert repr(get_template("auto", tok)) == repr(get_template("auto", tok))
    assert len(list((tmp_path / "cache").rglob("dataset_info.json"))) == 1  # one tokenized copy, found again

"""Every template against LLaMA-Factory 0.9.5's own token ids and labels (tests/data/lf_goldens: the conversations,
the tokenizer, and the script that ran LF to write templates.json.gz). Cases: single and multi-turn, system and
none, the default system, tools with parallel and single calls and observations, thoughts in the last reply and
in history, thinking on and off, mask_history, preference pairs (LF's encode_oneturn) and generation prompts.

One documented difference (README, Templates): with efficient_eos templates (glm4*, gemma2, gpt_oss) LF labels the
first token after a trained reply with eos although the token there is another (the next turn's header);
zerotune trains the token that is there. Those positions are rewritten below before comparing; nothing else is."""

import copy
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.data.options import DataArguments
from trainer.data.processing import IGNORE_INDEX
from trainer.data.templates import TEMPLATES, get_template

GOLDENS = Path(__file__).parent / "data" / "lf_goldens"
sys.path.insert(0, str(GOLDENS))
from conversations import CONVERSATIONS, PAIRS  # noqa: E402

with gzip.open(GOLDENS / "templates.json.gz", "rt", encoding="utf-8") as _f:
    CASES = json.load(_f)["templates"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GOLDENS / "tokenizer")


@pytest.fixture(autouse=True)
def frozen_date(monkeypatch):
    """llama3's tool prompt carries today's date; the goldens were written on 3 Dec 2026."""
    tool_formats = pytest.importorskip("trainer.data.tool_formats")
    monkeypatch.setattr(tool_formats, "today", lambda: "03 Dec 2026")


def _zerotune_labels(template, tokenizer, ids: list[int], lf_labels: list[int]) -> list[int]:
    """LF's labels with the efficient_eos difference applied (see the module docstring)."""
    if not template.efficient_eos:
        return lf_labels
    eos = tokenizer.convert_tokens_to_ids(template.eos)
    out = list(lf_labels)
    for p, (token, label) in enumerate(zip(ids, lf_labels)):
        if label == eos and token != eos:
            out[p] = token if p > 0 and lf_labels[p - 1] != IGNORE_INDEX else IGNORE_INDEX
    return out


def _labels(ids, trained):
    return np.where(trained, np.asarray(ids), IGNORE_INDEX).tolist()


def test_every_table_template_has_goldens():
    assert sorted(CASES) == sorted(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_matches_llama_factory(name, tokenizer):
    checked = 0
    for case in CASES[name]:
        args = DataArguments(enable_thinking=case["enable_thinking"], mask_history=case["mask_history"])
        template = get_template(name, tokenizer, args)
        where = f"{name} {case['kind']} {case['conversation']} thinking={case['enable_thinking']} " \
                f"mask_history={case['mask_history']}"
        if case["kind"] == "pair":
            pair = PAIRS[case["conversation"]]
            convs = [(copy.deepcopy(pair["prompt"]) + [answer], pair["system"], "") for answer in pair["answers"]]
            got = template.encode_batch(tokenizer, convs, oneturn=True)
            for (ids, trained), lf_ids, lf_labels in zip(got, case["input_ids"], case["labels"]):
                assert ids == lf_ids, where
                assert _labels(ids, trained) == _zerotune_labels(template, tokenizer, lf_ids, lf_labels), where
            checked += 1
            continue
        conv = CONVERSATIONS[case["conversation"]]
        messages, system, tools = copy.deepcopy(conv["messages"]), conv["system"], conv["tools"]
        if "error" in case:  # LF refuses the row (e.g. parallel calls in GLM-4's tool format): so do we
            with pytest.raises(ValueError):
                template.encode_batch(tokenizer, [(messages, system, tools)], mask_history=case["mask_history"])
            checked += 1
            continue
        if case["kind"] == "prompt":
            assert template.encode_prompt(tokenizer, messages[:-1], system, tools) == case["input_ids"], where
        else:
            [(ids, trained)] = template.encode_batch(tokenizer, [(messages, system, tools)],
                                                     mask_history=case["mask_history"])
            assert ids == case["input_ids"], where
            assert _labels(ids, trained) == _zerotune_labels(template, tokenizer, ids, case["labels"]), where
        checked += 1
    assert checked == len(CASES[name]) >= 15

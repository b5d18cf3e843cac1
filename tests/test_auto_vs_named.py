"""template: auto on the stored real chat templates (tests/data/chat_templates) against the named template of the
same family: the same ids, and the same trained tokens except what a named template's reply format writes after
the stop token (LF trains ChatML's and Gemma's newline; auto trains the reply and its stop token). Templates that
are not prefix-stable are refused, naming the template to use."""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.data.templates import get_template
from trainer.errors import ConfigError

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA / "lf_goldens"))
from conversations import CONVERSATIONS  # noqa: E402

SAME_FAMILY = [("qwen2_5", "qwen", "<|im_end|>"), ("llama4", "llama4", "<|eot|>"),
               ("gemma3", "gemma3", "<end_of_turn>"), ("phi4", "phi4", "<|im_end|>"),
               ("smollm2", "smollm2", "<|im_end|>")]


def _tokenizer(model: str | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DATA / "lf_goldens" / "tokenizer")
    tok.chat_template = (DATA / "chat_templates" / f"{model}.jinja").read_text() if model else None
    return tok


@pytest.mark.parametrize("model,name,stop", SAME_FAMILY, ids=[m for m, _, _ in SAME_FAMILY])
def test_auto_labels_equal_the_named_templates(model, name, stop):
    tok = _tokenizer(model)
    auto, named = get_template("auto", tok), get_template(name, tok)
    stop_id = tok.convert_tokens_to_ids(stop)
    assert stop_id in auto.stop_token_ids(tok)
    keys = ["system", "multi"] + (["single"] if model != "smollm2" else [])  # smollm2: LF's default system differs
    for mask_history in (False, True):
        convs = [(copy.deepcopy(CONVERSATIONS[k]["messages"]), CONVERSATIONS[k]["system"], "") for k in keys]
        for (a_ids, a_trained), (n_ids, n_trained) in zip(auto.encode_batch(tok, convs, mask_history=mask_history),
                                                          named.encode_batch(tok, convs, mask_history=mask_history)):
            assert a_ids == n_ids
            assert not (a_trained & ~n_trained).any()  # auto trains nothing the named template does not
            extra = np.flatnonzero(n_trained & ~a_trained)
            # ...and what it leaves out comes right after a trained stop token (the format's suffix)
            for p in extra:
                assert a_trained[: p].any() and (a_ids[p - 1] == stop_id or p - 1 in extra), (model, p)
            assert a_trained.sum() > 0


@pytest.mark.parametrize("model,suggested", [("qwen3", "qwen3"), ("mistral_v0_3", "mistral"),
                                             ("deepseek_r1", "deepseekr1")])
def test_auto_refuses_a_template_that_rewrites_earlier_turns(model, suggested):
    with pytest.raises(ConfigError, match=rf"not prefix-stable.*template: {suggested}\b"):
        get_template("auto", _tokenizer(model))


def test_auto_needs_a_chat_template():
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat_template"):
        get_template("auto", _tokenizer(None))

"""Export's chat_template: for every template, tokenizer.apply_chat_template with the exported Jinja renders what
training rendered (text, and ids where the tokenizer splits the joined text as LLaMA-Factory's piecewise encoding
does), for multi-turn conversations with and without a system prompt, reasoning replies with thinking on and off,
tool results, and generation prompts."""

import copy
import sys
from pathlib import Path

import pytest

from trainer.data.options import DataArguments
from trainer.data.templates import TEMPLATES, get_template

GOLDENS = Path(__file__).parent / "data" / "lf_goldens"
sys.path.insert(0, str(GOLDENS))
from conversations import CONVERSATIONS  # noqa: E402

# tools=/tool_calls are not rendered by the exported template (module docstring of trainer/data/template_jinja.py)
TEXT_ONLY = ["single", "system", "multi", "thinking", "thinking_history"]
# Their prompt side ends with a space: LF's piecewise encoding keeps it a token of its own, where tokenizing the
# rendered text merges it into the reply's first word (same text, other ids; zerotune follows LF: the goldens)
SPACE_BEFORE_REPLY = {"breeze", "ernie_nothink"}
OBSERVATION = dict(system="Tools on.", tools="", messages=[
    {"role": "user", "content": "Call it"}, {"role": "assistant", "content": "calling"},
    {"role": "observation", "content": "42"}, {"role": "assistant", "content": "It is 42."}])


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GOLDENS / "tokenizer")


def _hf(messages, system):
    roles = {"observation": "tool"}
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": roles.get(m["role"], m["role"]), "content": m["content"]} for m in messages]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_template_renders_what_training_encodes(name, thinking, tokenizer):
    template = get_template(name, tokenizer, DataArguments(enable_thinking=thinking))
    jinja = template.chat_template()
    for conv in [CONVERSATIONS[k] for k in TEXT_ONLY] + [OBSERVATION]:
        messages, system = copy.deepcopy(conv["messages"]), conv["system"]
        hf = _hf(messages, system)
        text = tokenizer.apply_chat_template(hf, chat_template=jinja, tokenize=False)
        assert text == template.render_text(messages, system), (name, text)
        prompt = tokenizer.apply_chat_template(hf[:-1], chat_template=jinja, tokenize=False,
                                               add_generation_prompt=True)
        assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == \
            template.encode_prompt(tokenizer, messages[:-1], system), (name, prompt)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if name not in SPACE_BEFORE_REPLY:
            assert ids == template.encode(tokenizer, messages, system)[0], name
    # apply_chat_template's enable_thinking overrides the run's, as with Qwen3's own template
    if template.reasoning:
        messages = CONVERSATIONS["single"]["messages"]
        other = get_template(name, tokenizer, DataArguments(enable_thinking=not thinking))
        assert tokenizer.apply_chat_template(_hf(messages[:1], ""), chat_template=jinja, tokenize=False,
                                             add_generation_prompt=True, enable_thinking=not thinking) == \
            tokenizer.decode(other.encode_prompt(tokenizer, messages[:1]))


def test_an_empty_system_message_falls_back_to_the_default_system(tokenizer):
    template = get_template("qwen", tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tokenizer.apply_chat_template([{"role": "system", "content": ""}] + messages,
                                         chat_template=template.chat_template(), tokenize=False)
    assert text == template.render_text(messages, "") and "You are Qwen" in text

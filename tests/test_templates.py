"""Templates: exact token ids against hand-written renderings of four model formats (LLaMA-Factory's semantics: a
reply's whole format is trained, e.g. ChatML's newline after <|im_end|>) and the demo tokenizer's own chat
template. tests/test_template_goldens.py checks every template against LLaMA-Factory's own ids and labels."""

import pytest

from trainer.data.options import DataArguments
from trainer.data.processing import IGNORE_INDEX, encode_supervised
from trainer.data.templates import get_template
from trainer.errors import ConfigError

SYSTEM = "Be brief."
CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How are you?"},
        {"role": "user", "content": "Fine {content} thanks"}, {"role": "assistant", "content": "Good to hear."}]

# (template, full reference text, the trained parts in order); the tiny tokenizer has no bos token
REFERENCE = {
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
               "<|im_start|>assistant\nHello! How are you?<|im_end|>\n<|im_start|>user\nFine {content} thanks"
               "<|im_end|>\n<|im_start|>assistant\nGood to hear.<|im_end|>\n",
               ["Hello! How are you?<|im_end|>\n", "Good to hear.<|im_end|>\n"]),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nHello! How are you?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
               "Fine {content} thanks<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nGood to hear."
               "<|eot_id|>",
               ["Hello! How are you?<|eot_id|>", "Good to hear.<|eot_id|>"]),
    "mistral": ("[INST] Be brief.\n\nHi there[/INST] Hello! How are you?<|endoftext|>[INST] Fine {content} thanks"
                "[/INST] Good to hear.<|endoftext|>",
                [" Hello! How are you?<|endoftext|>", " Good to hear.<|endoftext|>"]),
    "default": ("System: Be brief.<|endoftext|>\nHuman: Hi there<|endoftext|>\nAssistant:Hello! How are you?"
                "<|endoftext|>\nHuman: Fine {content} thanks<|endoftext|>\nAssistant:Good to hear.<|endoftext|>\n",
                ["Hello! How are you?<|endoftext|>\n", "Good to hear.<|endoftext|>\n"]),
}


def _trained_spans(ids, trained):
    spans, current = [], []
    for i, t in zip(ids, trained):
        if t:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_template_tokens_and_labels(name, tiny_tokenizer):
    text, trained_parts = REFERENCE[name]
    template = get_template(name, tiny_tokenizer)
    ids, trained = template.encode(tiny_tokenizer, CONV, SYSTEM)
    assert ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    spans = _trained_spans(ids, trained)
    assert [tiny_tokenizer.decode(s) for s in spans] == trained_parts


def test_qwen_has_default_system_and_chatml_has_none(tiny_tokenizer):
    chatml = get_template("chatml", tiny_tokenizer).render_text(CONV[:2])
    qwen = get_template("qwen", tiny_tokenizer).render_text(CONV[:2])
    assert chatml.startswith("<|im_start|>user\n")
    assert qwen.startswith("<|im_start|>system\nYou are Qwen")


def test_mask_history_and_train_on_prompt(tiny_tokenizer):
    template = get_template("chatml", tiny_tokenizer)
    ids, trained = template.encode(tiny_tokenizer, CONV, SYSTEM, mask_history=True)
    assert [tiny_tokenizer.decode(s) for s in _trained_spans(ids, trained)] == ["Good to hear.<|im_end|>\n"]
    ids, trained = template.encode(tiny_tokenizer, CONV, SYSTEM, train_on_prompt=True)
    assert all(trained)


def test_labels_follow_the_mask_and_truncation(tiny_tokenizer):
    template = get_template("chatml", tiny_tokenizer)
    row = {"messages": CONV, "system": SYSTEM}
    [[full]] = encode_supervised([row], tiny_tokenizer, template, DataArguments(cutoff_len=10_000))
    ids, trained = template.encode(tiny_tokenizer, CONV, SYSTEM)
    assert full["labels"] == [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    assert not full["_truncated"] and full["trained"] == sum(trained[1:])
    [[cut]] = encode_supervised([row], tiny_tokenizer, template, DataArguments(cutoff_len=12))
    assert cut["_truncated"] and len(cut["input_ids"]) == 12 and cut["_no_labels"]


def test_template_tokens_missing_from_tokenizer_is_a_clear_error(tmp_path):
    from tiny import build_tokenizer

    tok = build_tokenizer(tmp_path, special=["<|endoftext|>"])
    with pytest.raises(ConfigError) as err:
        get_template("llama3", tok)
    assert "llama3" in str(err.value) and "<|eot_id|>" in str(err.value)
    with pytest.raises(ConfigError) as err:
        get_template("lama3", tok)
    assert "llama3" in str(err.value)


def test_chatml_matches_the_demo_tokenizers_own_template(smollm_tokenizer):
    """Same ids as SmolLM2's apply_chat_template (which always renders a system turn), and the
    trained tokens are exactly the assistant replies with their <|im_end|> and the newline after it."""
    template = get_template("chatml", smollm_tokenizer)
    messages = [{"role": "system", "content": SYSTEM}] + CONV
    expected = smollm_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    ids, trained = template.encode(smollm_tokenizer, CONV, SYSTEM)
    assert ids == list(expected)
    spans = [smollm_tokenizer.decode(s) for s in _trained_spans(ids, trained)]
    assert spans == ["Hello! How are you?<|im_end|>\n", "Good to hear.<|im_end|>\n"]
    prompt = template.encode_prompt(smollm_tokenizer, CONV[:1], SYSTEM)
    expected_prompt = smollm_tokenizer.apply_chat_template(messages[:2], tokenize=True, return_dict=True,
                                                           add_generation_prompt=True)["input_ids"]
    assert prompt == list(expected_prompt)


def test_multimodal_templates_are_refused_by_feature(tiny_tokenizer):
    with pytest.raises(ConfigError, match=r"qwen2_vl.*multimodal template.*zerotune trains text models"):
        get_template("qwen2_vl", tiny_tokenizer)


def test_tool_format_overrides_the_templates_own(tiny_tokenizer):
    """LF's tool_format: the tool list and calls in another format, the call written as a plain reply."""
    tools = '[{"name": "add", "description": "Add", "parameters": {"type": "object", "properties": {}}}]'
    conv = [{"role": "user", "content": "Add"}, {"role": "function", "content": '{"name": "add", "arguments": {}}'}]
    own = get_template("chatml", tiny_tokenizer).render_text(conv, "", tools)
    mistral = get_template("chatml", tiny_tokenizer, DataArguments(tool_format="mistral")).render_text(conv, "", tools)
    assert "You have access to the following tools" in own and "[AVAILABLE_TOOLS]" not in own
    assert "[AVAILABLE_TOOLS]" in mistral and mistral.endswith('[{"name": "add", "arguments": {}}]<|im_end|>')
    with pytest.raises(ConfigError, match="tool_format: 'mistrall' is unknown"):
        get_template("chatml", tiny_tokenizer, DataArguments(tool_format="mistrall"))

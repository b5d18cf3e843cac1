"""Named templates against the models' own chat templates (tests/data/chat_templates, sources in SOURCES.md), on the
golden conversations: equal text and ids where LLaMA-Factory's format is the model's, and otherwise exactly the
documented difference (README, Templates), written out below as the edit that turns our rendering into theirs."""

import copy
import sys
from pathlib import Path

import pytest

from trainer.data.options import DataArguments
from trainer.data.templates import get_template

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA / "lf_goldens"))
from conversations import CONVERSATIONS  # noqa: E402

EMPTY_THINK = "<think>\n\n</think>\n\n"
DATE = "26 Jul 2024"
LLAMA_HEADER = f"Cutting Knowledge Date: December 2023\nToday Date: {DATE}\n\n"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DATA / "lf_goldens" / "tokenizer")  # bos <s>, eos </s>


def _theirs(tok, model: str, messages, system, **kwargs) -> str:
    hf = ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in messages]
    jinja = (DATA / "chat_templates" / f"{model}.jinja").read_text()
    return tok.apply_chat_template(hf, chat_template=jinja, tokenize=False, date_string=DATE, **kwargs)


def _conv(key):
    c = CONVERSATIONS[key]
    return copy.deepcopy(c["messages"]), c["system"]


# (model file, our template, conversations) whose renderings must be equal, text and ids, prompts too
EQUAL = [
    ("qwen3", "qwen3", ["single", "system"]),
    ("qwen2_5", "qwen", ["single", "system", "multi"]),
    ("llama4", "llama4", ["single", "system", "multi"]),
    ("gemma3", "gemma3", ["single", "system", "multi"]),
    ("phi4", "phi4", ["single", "system", "multi"]),
    ("smollm2", "smollm2", ["system", "multi"]),
    ("mistral_v0_3", "mistral", ["single"]),
]


@pytest.mark.parametrize("model,name,keys", EQUAL, ids=[e[0] for e in EQUAL])
def test_equal_to_the_models_own_template(model, name, keys, tok):
    template = get_template(name, tok)
    for key in keys:
        messages, system = _conv(key)
        theirs = _theirs(tok, model, messages, system)
        assert template.render_text(messages, system) == theirs, key
        assert template.encode(tok, messages, system)[0] == tok(theirs, add_special_tokens=False)["input_ids"], key
        prompt = _theirs(tok, model, messages[:-1], system, add_generation_prompt=True)
        assert template.encode_prompt(tok, messages[:-1], system) == tok(prompt, add_special_tokens=False)[
            "input_ids"], key


def test_qwen3_thinking_off_prompt_equals_its_own(tok):
    template = get_template("qwen3", tok, DataArguments(enable_thinking=False))
    messages, system = _conv("system")
    theirs = _theirs(tok, "qwen3", messages[:-1], system, add_generation_prompt=True, enable_thinking=False)
    assert tok.decode(template.encode_prompt(tok, messages[:-1], system)) == theirs
    assert theirs.endswith("<|im_start|>assistant\n" + EMPTY_THINK)


def _empty_blocks_only_in_the_last_reply(text: str, block: str) -> str:
    head, tail = text.rsplit(block, 1)
    return head.replace(block, "") + block + tail


def test_documented_differences(tok):
    """Each line: ours, edited by the documented difference, equals the model's own rendering."""
    eos = "</s>"
    multi, system_multi = _conv("multi")
    single, _ = _conv("single")
    one, system_one = _conv("system")
    # qwen3: LF trains the empty thought block in every reply of a multi-turn conversation; Qwen3's template keeps it
    # only in the replies after the last user turn
    ours = get_template("qwen3", tok).render_text(multi, system_multi)
    assert _empty_blocks_only_in_the_last_reply(ours, EMPTY_THINK) == _theirs(tok, "qwen3", multi, system_multi)
    # Llama 3.1: the model's template opens every system turn with a knowledge-cutoff and date header; LF's llama3
    # (and zerotune's) does not write it
    llama3 = get_template("llama3", tok)
    assert llama3.render_text(one, system_one).replace("<|end_header_id|>\n\n" + system_one,
                                                      "<|end_header_id|>\n\n" + LLAMA_HEADER + system_one) == \
        _theirs(tok, "llama3_1", one, system_one)
    # efficient_eos (gemma2, glm4): LF ends the conversation with eos, the models' templates do not
    assert get_template("gemma2", tok).render_text(multi, "") == _theirs(tok, "gemma2", multi, "") + eos
    assert get_template("glm4", tok).render_text(multi, system_multi) == _theirs(tok, "glm4", multi, system_multi) + eos
    # phi4_mini: the model's template ends a conversation with eos after the last <|end|>; LF's does not
    assert get_template("phi4_mini", tok).render_text(multi, system_multi) + eos == \
        _theirs(tok, "phi4_mini", multi, system_multi)
    # Mistral v0.3: the model writes the system prompt into the user turn that ends the conversation (a generation
    # prompt's), so a conversation ending with a reply loses it; LF writes it into the first user turn
    mistral = get_template("mistral", tok)
    assert mistral.render_text(multi, "") == _theirs(tok, "mistral_v0_3", multi, system_multi)
    moved = copy.deepcopy(multi[:-1])
    moved[-1]["content"] = system_multi + "\n\n" + moved[-1]["content"]
    assert mistral.encode_prompt(tok, moved) == tok(_theirs(tok, "mistral_v0_3", multi[:-1], system_multi,
                                                          add_generation_prompt=True), add_special_tokens=False)[
        "input_ids"]
    # smollm2: LF's default system prompt ends with a period, the model's does not
    assert get_template("smollm2", tok).render_text(single, "").replace("Hugging Face.", "Hugging Face") == \
        _theirs(tok, "smollm2", single, "")
    # GLM-4.5: the model writes an empty thought as "\n<think></think>\n" before the reply's newline; LF's glm4_moe
    # writes its thought words ("<think>\n\n</think>\n\n") right after <|assistant|> (glm4_7 is LF's closer one),
    # and ends the conversation with eos (efficient_eos)
    glm = get_template("glm4_moe", tok).render_text(multi, system_multi)
    assert glm.replace("<|assistant|>" + EMPTY_THINK + "\n", "<|assistant|>\n<think></think>\n")[:-len(eos)] == \
        _theirs(tok, "glm4_5", multi, system_multi)
    # DeepSeek-R1: the model's template writes no empty thought into replies, strips history thoughts, prefills
    # "<think>\n" in the generation prompt, and hard-codes its eos (the test tokenizer's is </s>)
    r1 = get_template("deepseekr1", tok)
    theirs = _theirs(tok, "deepseek_r1", multi, system_multi).replace("<｜end▁of▁sentence｜>", eos)
    assert r1.render_text(multi, system_multi).replace(EMPTY_THINK, "") == theirs
    prompt = _theirs(tok, "deepseek_r1", single[:-1], "", add_generation_prompt=True)
    assert tok.decode(r1.encode_prompt(tok, single[:-1])) + "<think>\n" == prompt
    # DeepSeek-V3.1 (the stored stand-in; V3's own file could not be found): as deepseek3 plus "<think></think>"
    # after every assistant header
    v3 = get_template("deepseek3", tok).render_text(multi, system_multi)
    assert v3.replace("<｜Assistant｜>", "<｜Assistant｜><think></think>") == \
        _theirs(tok, "deepseek_v3_1", multi, system_multi).replace("<｜end▁of▁sentence｜>", eos)

"""template: auto — labels read from the tokenizer's own Jinja chat_template, checked against an independent
reference: the trained tokens must be exactly the ids of each reply + its stop token (tokenized on their own),
the ids exactly what apply_chat_template gives; non-prefix-stable templates are refused."""

import json

import numpy as np
import pytest

from trainer.data.auto_template import AutoTemplate, show_example, suggest_template
from trainer.errors import ConfigError

from tiny import SPECIAL, build_tokenizer

# Qwen2.5 style: ChatML, a default system prompt, tools in the system turn, tool calls and tool responses.
CHATML = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Llama 3 style: the template writes bos itself; replies trimmed; <|eot_id|> ends every turn, nothing after it.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")

# Qwen3 style: only replies after the last user turn keep their <think> block; history ones lose it.
QWEN3 = """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Mistral v0.3 style: the system prompt goes into the LAST user turn, so it moves as the conversation grows.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in loop_messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if loop.index0 == ns.last_user and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}
    {%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}
{%- endfor %}
"""

# A template stable on plain conversations but not around tool results: it closes a tool turn only when
# something follows, so the prompt before the next reply differs from the same text inside the conversation.
TOOL_UNSTABLE = CHATML.replace("{%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}",
                               "{%- if not loop.last and (messages[loop.index0 + 1].role != \"tool\") %}")

# Phi-3 / Phi-4-mini style: <|end|> ends each turn, and a whole conversation (no generation prompt) ends with eos.
PHI = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
       "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

# GLM-4 style: nothing after a reply; the next turn's header ends it.
GLM = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
       "{% if add_generation_prompt %}<|assistant|>{% endif %}")

SYSTEM = "Be brief."
CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How are you?"},
        {"role": "user", "content": "Fine {content} thanks"}, {"role": "assistant", "content": "Good to hear."}]
REPLIES = ["Hello! How are you?", "Good to hear."]

TOOLS_LF = json.dumps([{"name": "get_weather", "description": "Weather of a city",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])
TOOL_CONV = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "function", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
             {"role": "observation", "content": '{"temp": 21}'},
             {"role": "assistant", "content": "It is 21 degrees in Paris."}]
# The same conversation written by hand in the form HF templates read (the independent reference).
TOOL_HF = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": "", "tool_calls": [
               {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
           {"role": "tool", "content": '{"temp": 21}'},
           {"role": "assistant", "content": "It is 21 degrees in Paris."}]
TOOLS_HF = [{"type": "function", "function": json.loads(TOOLS_LF)[0]}]


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto_tok")
    # <tool_call> & co. as special tokens: the stop token must still be <|im_end|>, not the first special one.
    build_tokenizer(folder, special=SPECIAL + ["<think>", "</think>", "<tool_call>", "</tool_call>", "[gMASK]", "<sop>"])
    return folder


@pytest.fixture
def make(tok_folder):
    from transformers import AutoTokenizer

    def tokenizer_with(template: str | None, bos: str | None = None):
        tok = AutoTokenizer.from_pretrained(tok_folder)
        tok.chat_template = template
        if bos:
            tok.bos_token = bos
        return tok
    return tokenizer_with


def runs(ids, trained):
    """The trained tokens as consecutive runs of ids."""
    out, current = [], []
    for i, t in zip(ids, trained):
        if t:
            current.append(i)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def reference_ids(tok, messages, system="", tools=None, generation=False):
    hf = ([{"role": "system", "content": system}] if system else []) + messages
    return tok.apply_chat_template(hf, tools=tools, add_generation_prompt=generation, tokenize=True,
                                   return_dict=False)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style,template,stop,bos", [("chatml", CHATML, "<|im_end|>", None),
                                                     ("llama3", LLAMA3, "<|eot_id|>", "<|begin_of_text|>")])
@pytest.mark.parametrize("system", [SYSTEM, ""])
def test_labels_are_exactly_the_replies_and_their_stop_token(make, style, template, stop, bos, system):
    tok = make(template, bos)
    t = AutoTemplate().resolve(tok)
    [(ids, trained)] = t.encode_batch(tok, [(CONV, system, "")])
    assert ids == reference_ids(tok, CONV, system)  # the model's own rendering, tokenized once
    assert runs(ids, trained) == [ids_of(tok, r + stop) for r in REPLIES]
    assert int(trained.sum()) == sum(len(ids_of(tok, r + stop)) for r in REPLIES)  # nothing else trained
    if bos:  # the template's own bos, once, untrained
        assert ids.count(tok.convert_tokens_to_ids(bos)) == 1 and ids[0] == tok.convert_tokens_to_ids(bos)
        assert not trained[0]
    if style == "chatml" and not system:
        assert tok.decode(ids).startswith("<|im_start|>system\nYou are Qwen")  # the template's default system
    # only the last reply with mask_history / oneturn; every token with train_on_prompt
    for flag in ("mask_history", "oneturn"):
        [(ids2, trained2)] = t.encode_batch(tok, [(CONV, system, "")], **{flag: True})
        assert ids2 == ids and runs(ids2, trained2) == [ids_of(tok, REPLIES[-1] + stop)]
    [(ids3, trained3)] = t.encode_batch(tok, [(CONV, system, "")], train_on_prompt=True)
    assert ids3 == ids and trained3.all()
    # the prompt for generation and the stop tokens
    assert t.encode_prompt(tok, CONV[:3], system) == reference_ids(tok, CONV[:3], system, generation=True)
    stops = t.stop_token_ids(tok)
    assert tok.convert_tokens_to_ids(stop) in stops and tok.eos_token_id in stops
    assert t.chat_template() == template and t.name == "auto" and t.default_system == ""


def test_eos_after_a_whole_conversation_is_set_aside(make):
    """Phi style: the eos written after the last turn only is no reply's text; <|end|> is the stop token."""
    tok = make(PHI)
    t = AutoTemplate().resolve(tok)
    [(ids, trained)] = t.encode_batch(tok, [(CONV, SYSTEM, "")])
    assert ids == reference_ids(tok, CONV, SYSTEM) and ids[-1] == tok.eos_token_id and not trained[-1]
    assert runs(ids, trained) == [ids_of(tok, r + "<|end|>") for r in REPLIES]
    assert t.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id]
    assert suggest_template(tok) == "phi"


def test_template_without_end_of_turn_token_is_refused(make):
    with pytest.raises(ConfigError, match="writes no special token after a reply.*template: glm4"):
        AutoTemplate().resolve(make(GLM))


def test_tools_function_and_observation_turns(make):
    tok = make(CHATML)
    t = AutoTemplate().resolve(tok)
    [(ids, trained)] = t.encode_batch(tok, [(TOOL_CONV, "", TOOLS_LF)])
    assert ids == reference_ids(tok, TOOL_HF, tools=TOOLS_HF)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert runs(ids, trained) == [ids_of(tok, call), ids_of(tok, "It is 21 degrees in Paris.<|im_end|>")]
    assert "<tools>\n" + json.dumps(TOOLS_HF[0]) in tok.decode(ids)  # LF's bare tool wrapped as HF expects
    # several calls in one function message, arguments given as JSON text
    two = json.dumps([{"name": "a", "arguments": '{"x": 1}'}, {"name": "b", "arguments": {}}])
    [(ids2, trained2)] = t.encode_batch(tok, [([TOOL_CONV[0], {"role": "function", "content": two}], "", "")])
    assert runs(ids2, trained2) == [ids_of(tok, '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'
                                                 '\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
                                                 '<|im_end|>')]
    assert t.encode_prompt(tok, TOOL_CONV[:3], "", TOOLS_LF) == reference_ids(tok, TOOL_HF[:3], tools=TOOLS_HF,
                                                                               generation=True)
    with pytest.raises(ValueError, match="not valid JSON.*get_weather Paris"):
        t.encode_batch(tok, [([TOOL_CONV[0], {"role": "function", "content": "get_weather Paris"}], "", "")])


def test_tool_result_printed_as_json_string_is_accepted(make):
    """Llama 3.1 prints a tool result with `tojson`; the escaped text is the row's text, not a dropped message."""
    tok = make(CHATML.replace("{{- message.content }}{{- '\\n</tool_response>' }}",
                              "{{- message.content | tojson }}{{- '\\n</tool_response>' }}"))
    t = AutoTemplate().resolve(tok)
    [(ids, trained)] = t.encode_batch(tok, [(TOOL_CONV, "", TOOLS_LF)])
    assert '"{\\"temp\\": 21}"' in tok.decode(ids) and len(runs(ids, trained)) == 2


def test_batch_equals_one_by_one(make):
    tok = make(CHATML)
    t = AutoTemplate().resolve(tok)
    convs = [(CONV, SYSTEM, ""), (TOOL_CONV, "", TOOLS_LF), (CONV[:2], "", ""), (TOOL_CONV, SYSTEM, TOOLS_LF)]
    batch = t.encode_batch(tok, convs)
    for conv, (ids, trained) in zip(convs, batch):
        [(one_ids, one_trained)] = t.encode_batch(tok, [conv])
        assert ids == one_ids and np.array_equal(trained, one_trained)


def test_qwen3_style_template_is_refused_naming_qwen3(make):
    tok = make(QWEN3)
    with pytest.raises(ConfigError) as e:
        AutoTemplate().resolve(tok)
    msg = str(e.value)
    assert "not prefix-stable" in msg and "template: qwen3" in msg
    assert "<think>" in msg  # the excerpt shows what was rewritten


def test_system_placed_by_last_turn_is_refused_naming_mistral(make):
    tok = make(MISTRAL, bos="<s>")
    tok.eos_token = "</s>"
    with pytest.raises(ConfigError, match="not prefix-stable.*template: mistral"):
        AutoTemplate().resolve(tok)


def test_row_that_is_not_prefix_stable_raises_value_error(make):
    tok = make(TOOL_UNSTABLE)
    t = AutoTemplate().resolve(tok)  # plain conversations are fine
    assert t.encode_batch(tok, [(CONV, "", "")])
    with pytest.raises(ValueError, match="reply 2 does not start where the generation prompt ends") as e:
        t.encode_batch(tok, [(CONV, "", ""), (TOOL_CONV, "", TOOLS_LF)])
    assert e.value.row == 1  # the conversation's index in the batch, for the caller to name the row
    with pytest.raises(ValueError, match="not valid JSON") as e:
        t.encode_batch(tok, [(CONV, "", ""), (CONV, "", ""), (CONV, "", "[{oops")])
    assert e.value.row == 2


def test_template_without_tool_support_is_not_trained_silently(make):
    """Llama-3 style ignores `tools` and renders a tool call as an empty reply: the row fails, with the reason."""
    tok = make(LLAMA3, bos="<|begin_of_text|>")
    t = AutoTemplate().resolve(tok)
    with pytest.raises(ValueError, match="leaves out the tool call 'get_weather' of reply 1"):
        t.encode_batch(tok, [(TOOL_CONV, "", "")])
    with pytest.raises(ValueError, match="leaves out the tool 'get_weather'"):
        t.encode_batch(tok, [(CONV, "", TOOLS_LF)])


def test_template_that_rewrites_replies_fails_the_row(make):
    """DeepSeek-R1 style: <think> dropped from every reply (prefix-stable, so resolve accepts it), yet a row with
    reasoning would be trained without it."""
    tok = make(CHATML.replace("message.content + '<|im_end|>'", "message.content.split('</think>')[-1] + '<|im_end|>'"))
    t = AutoTemplate().resolve(tok)
    assert t.encode_batch(tok, [(CONV, "", "")])
    think = [CONV[0], {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello"}]
    with pytest.raises(ValueError, match="rewrites"):
        t.encode_batch(tok, [(think, "", "")])


def test_no_chat_template_is_a_config_error(make):
    tok = make(None)
    with pytest.raises(ConfigError, match="template: auto needs a tokenizer with a chat_template; .* has none"):
        AutoTemplate().resolve(tok)


def test_suggest_template(make):
    assert suggest_template(make(QWEN3)) == "qwen3"
    assert suggest_template(make(CHATML)) == "qwen"  # "Qwen" in its default system prompt
    assert suggest_template(make(CHATML.replace("Qwen", "Nimbus"))) == "chatml"
    assert suggest_template(make(LLAMA3, bos="<|begin_of_text|>")) == "llama3"
    assert suggest_template(make(MISTRAL, bos="<s>")) == "mistral"


def test_show_example_marks_the_trained_spans(make):
    tok = make(CHATML)
    t = AutoTemplate().resolve(tok)
    text = show_example(t, tok, CONV, SYSTEM)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n⟦Hello! How are you?<|im_end|>⟧\n<|im_start|>user\nFine {content} thanks"
                    "<|im_end|>\n<|im_start|>assistant\n⟦Good to hear.<|im_end|>⟧\n")


def test_real_template_smollm2(smollm_tokenizer):
    """The demo model's own (real) chat_template: ChatML with a default system prompt."""
    tok = smollm_tokenizer
    t = AutoTemplate().resolve(tok)
    [(ids, trained)] = t.encode_batch(tok, [(CONV, "", "")])
    assert ids == reference_ids(tok, CONV)
    assert runs(ids, trained) == [ids_of(tok, r + "<|im_end|>") for r in REPLIES]
    assert t.encode_prompt(tok, CONV[:3], SYSTEM) == reference_ids(tok, CONV[:3], SYSTEM, generation=True)
    assert tok.convert_tokens_to_ids("<|im_end|>") in t.stop_token_ids(tok)
    assert t.chat_template() == tok.chat_template and suggest_template(tok) == "chatml"

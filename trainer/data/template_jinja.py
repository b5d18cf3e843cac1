"""A template as a Jinja chat_template, for export: tokenizer.apply_chat_template (and the servers that use it)
render what training rendered, text for text.

Covered: a leading system message (else the default system prompt), user, assistant and tool ("tool" or
"observation") messages, reasoning templates' thought rules (multi-turn training's: every reply without a thought
gets the empty block; a generation prompt's history drops its thoughts unless preserve_thinking, as LLaMA-Factory's
chat and Qwen3's own template do; `enable_thinking` may be passed to apply_chat_template as for Qwen3, default the
run's), and the generation prompt. Not covered: the `tools=` argument and assistant `tool_calls` (their text is the tool
format's; a server that renders tool calls needs the model's own template).
"""

from __future__ import annotations

import re

CONTENT = "{content}"
_SLOTS = re.compile(r"(\{bos\}|\{eos\}|\{content\})")


def _literal(text: str) -> str:
    """A Jinja string literal of text (Jinja unescapes literals the way Python's unicode-escape does)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r") + "'"


def _expression(t, fmt: str, variable: str) -> str:
    """A Jinja expression writing fmt with {content} from `variable` and the resolved bos/eos tokens."""
    parts, filled = [], False
    for piece in _SLOTS.split(fmt):
        if piece == CONTENT and not filled:
            parts.append(variable)
            filled = True
        elif piece == "{bos}":
            parts.append(_literal(t.bos or ""))
        elif piece == "{eos}":
            parts.append(_literal(t.eos or ""))
        elif piece:
            parts.append(_literal(piece))
    return " + ".join(parts) if parts else "''"


def _out(expression: str) -> str:
    return "{{- " + expression + " -}}"


def chat_template(t) -> str:
    """The resolved template `t` (a data/templates.Template; not imported: templates.py imports this module)
    as a chat_template string."""
    reasoning = t.thought_words is not None
    head = [
        f"{{%- set enable_thinking = enable_thinking if enable_thinking is defined else "
        f"{'true' if t.enable_thinking else 'false'} -%}}",
        f"{{%- set preserve_thinking = preserve_thinking if preserve_thinking is defined else "
        f"{'true' if t.preserve_thinking else 'false'} -%}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        f"{{%- set system = messages[0]['content'] or {_literal(t.default_system)} -%}}",
        "{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {_literal(t.default_system)} -%}}{{%- set loop_messages = messages -%}}",
        "{%- endif -%}",
    ]
    first = ["{%- if loop.first -%}", _out(_expression(t, t.prefix, "''"))]
    if not t.system_in_user:
        first += ["{%- if system -%}", _out(_expression(t, t.system, "system")), "{%- endif -%}"]
    first.append("{%- endif -%}")
    user = ["{%- if message['role'] == 'user' -%}"]
    if t.system_in_user:  # the system text (the format's first piece) in front of the first user turn
        system_piece = t.system.split("{bos}")[0].split("{eos}")[0]
        user += ["{%- if loop.first and system -%}",
                 f"{{%- set content = {_expression(t, system_piece, 'system')} + content -%}}", "{%- endif -%}"]
    user += [_out(_expression(t, t.user, "content")),
             "{%- elif message['role'] in ['tool', 'observation'] -%}",
             _out(_expression(t, t.observation or t.user, "content")), "{%- else -%}"]
    reply = []
    if reasoning:  # training's multi-turn rules; a generation prompt's history as LF's chat writes it (oneturn)
        open_, close = t.thought_words
        strip = ["{%- if " + _literal(open_) + " in content and " + _literal(close) + " in content -%}",
                 f"{{%- set content = (content.split({_literal(open_)})[0] + content.split({_literal(close)})[-1])"
                 ".lstrip('\\n') -%}", "{%- endif -%}"]
        reply += ["{%- if add_generation_prompt -%}",
                  *(["{%- if not preserve_thinking -%}", *strip, "{%- endif -%}"]),
                  "{%- else -%}",
                  "{%- if not enable_thinking -%}", *strip, "{%- endif -%}",
                  f"{{%- if {_literal(open_.strip())} not in content and {_literal(close.strip())} not in content -%}}",
                  _out(_literal(t.empty_thought)), "{%- endif -%}",
                  "{%- endif -%}"]
    reply.append(_out(_expression(t, t.assistant, "content")))
    if t.efficient_eos:
        reply += ["{%- if loop.last -%}", _out(_literal(t.eos or "")), "{%- endif -%}"]
    tail = ["{%- endif -%}", "{%- endfor -%}"]
    if reasoning:
        tail += ["{%- if add_generation_prompt and not enable_thinking -%}", _out(_literal(t.empty_thought)),
                 "{%- endif -%}"]
    body = ["{%- for message in loop_messages -%}", *first, "{%- set content = message['content'] -%}", *user,
            *reply, *tail]
    return "".join(head + body)

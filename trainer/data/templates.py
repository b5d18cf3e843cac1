"""Chat templates: canonical messages -> token ids + a per-token 'trained' mask.

A conversation is rendered to text once and tokenized in one call, so its ids are exactly what the
tokenizer gives for that text (the same as the model's own apply_chat_template when the rendering
matches). Which tokens carry labels is read from character offsets: a token is trained when it
starts inside an assistant span (the reply and its stop token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from trainer.errors import ConfigError

TEMPLATES: dict[str, "Template"] = {}

CONTENT = "{content}"
_SLOT = re.compile(r"\{(content|system)\}")


def _fill(fmt: str, **values: str) -> str:
    """Fill {content}/{system} in one pass, so braces inside user text are never treated as slots."""
    return _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), fmt)


@dataclass(frozen=True)
class Template:
    name: str
    user: str  # a user turn, ends where the assistant header starts
    assistant_prefix: str  # the generation prompt: never trained
    assistant: str  # the trained part: the reply and its stop token
    assistant_suffix: str = ""  # after the stop token (e.g. a newline): not trained
    system: str = ""  # empty: the system prompt is merged into the first user turn
    observation: str = ""  # tool results; defaults to the user format
    prefix: str = ""  # once at the start (BOS)
    default_system: str = ""
    system_in_user: str = "{system}\n\n{content}"
    stop_words: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()  # each must be one token of the tokenizer
    eos_placeholder: bool = False  # "{eos}" in the slots is the tokenizer's own eos token

    def resolve(self, tokenizer) -> "Template":
        """Check the tokenizer knows this template's tokens; fill {eos} from the tokenizer."""
        if self.eos_placeholder:
            if not tokenizer.eos_token:
                raise ConfigError(f"template {self.name!r} needs an eos token, and the tokenizer has none.")
            eos = tokenizer.eos_token
            fill = lambda s: s.replace("{eos}", eos)  # noqa: E731
            t = Template(**{**self.__dict__, "user": fill(self.user), "assistant": fill(self.assistant),
                            "stop_words": (eos,), "special_tokens": (eos,), "eos_placeholder": False})
        else:
            t = self
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in t.special_tokens if tok not in vocab]
        if missing:
            raise ConfigError(
                f"template {t.name!r} needs the tokens {missing}, which this tokenizer lacks. Pick the template "
                f"that matches the model (known: {', '.join(sorted(TEMPLATES))})."
            )
        return t

    def stop_token_ids(self, tokenizer) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(w) for w in self.stop_words]

    def render(self, messages: list[dict], system: str = "", add_generation_prompt: bool = False
               ) -> list[tuple[str, int]]:
        """Text pieces with the index of the assistant turn they belong to (-1: prompt side)."""
        system = system or self.default_system
        pieces: list[tuple[str, int]] = []
        if self.prefix:
            pieces.append((self.prefix, -1))
        if system and self.system:
            pieces.append((_fill(self.system, content=system), -1))
        turn = 0
        for i, msg in enumerate(messages):
            content = msg["content"]
            if msg["role"] in ("user", "observation"):
                if i == 0 and system and not self.system:
                    content = _fill(self.system_in_user, system=system, content=content)
                fmt = self.observation if msg["role"] == "observation" and self.observation else self.user
                pieces.append((_fill(fmt, content=content) + self.assistant_prefix, -1))
            else:
                pieces.append((_fill(self.assistant, content=content), turn))
                if self.assistant_suffix:
                    pieces.append((self.assistant_suffix, -1))
                turn += 1
        if add_generation_prompt and messages and messages[-1]["role"] in ("assistant", "function"):
            raise ValueError("add_generation_prompt needs a conversation that ends with a user turn")
        return pieces

    def render_text(self, messages: list[dict], system: str = "") -> str:
        return "".join(text for text, _ in self.render(messages, system))

    def encode(self, tokenizer, messages: list[dict], system: str = "", train_on_prompt: bool = False,
               mask_history: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it is trained (carries a label)."""
        [(ids, trained)] = self.encode_batch(tokenizer, [(messages, system)], train_on_prompt, mask_history)
        return ids, trained.tolist()

    def encode_batch(self, tokenizer, conversations: list[tuple[list[dict], str]], train_on_prompt: bool = False,
                     mask_history: bool = False) -> list[tuple[list[int], np.ndarray]]:
        """Many (messages, system) at once: one call of the tokenizer's batch encoder; per conversation its ids
        and a boolean array saying which tokens are trained (a token is trained when it starts inside an
        assistant span; a token with an empty span takes the character before it)."""
        texts, char_masks = [], []
        for messages, system in conversations:
            pieces = self.render(messages, system)
            n_turns = 1 + max((turn for _, turn in pieces), default=-1)
            flags = [train_on_prompt or (turn >= 0 and (not mask_history or turn == n_turns - 1)) for _, turn in pieces]
            texts.append("".join(text for text, _ in pieces))
            char_masks.append(np.repeat(np.array(flags, dtype=bool), [len(text) for text, _ in pieces]))
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets, chars in zip(enc["input_ids"], enc["offset_mapping"], char_masks):
            spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            pos = np.where(spans[:, 0] < spans[:, 1], spans[:, 0], np.maximum(spans[:, 0] - 1, 0))
            inside = pos < len(chars)
            trained = np.zeros(len(ids), dtype=bool)
            trained[inside] = chars[pos[inside]]
            out.append((ids, trained))
        return out

    def encode_prompt(self, tokenizer, messages: list[dict], system: str = "") -> list[int]:
        """Ids of a conversation ending with a user turn, followed by the assistant header (for generation)."""
        text = "".join(text for text, _ in self.render(messages, system, add_generation_prompt=True))
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def _literal(text: str) -> str:
    """A Jinja string literal of text (Jinja unescapes literals the way Python's unicode-escape does)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r") + "'"


def _expression(fmt: str, slots: dict[str, str]) -> str:
    """A Jinja expression that fills a format's {content}/{system} slots with the named variables."""
    parts, last = [], 0
    for m in _SLOT.finditer(fmt):
        if m.start() > last:
            parts.append(_literal(fmt[last:m.start()]))
        parts.append(slots[m.group(1)])
        last = m.end()
    if last < len(fmt):
        parts.append(_literal(fmt[last:]))
    return " + ".join(parts) if parts else "''"


def chat_template(t: Template) -> str:
    """The template as a Jinja chat_template: tokenizer.apply_chat_template (and the servers that use it) render
    exactly what `Template.render` renders. A leading system message is the system prompt (else default_system);
    a user turn is followed by the assistant header when an assistant turn follows or add_generation_prompt is
    set; "observation" and "tool" turns take the observation format."""
    user_like = "['user', 'observation', 'tool']"
    observation = t.observation or t.user
    return "".join([
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        f"{{%- set system = messages[0]['content'] or {_literal(t.default_system)} -%}}"
        "{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {_literal(t.default_system)} -%}}{{%- set loop_messages = messages -%}}",
        "{%- endif -%}",
        f"{{{{- {_literal(t.prefix)} -}}}}" if t.prefix else "",
        f"{{%- if system -%}}{{{{- {_expression(t.system, {'content': 'system'})} -}}}}{{%- endif -%}}"
        if t.system else "",
        "{%- for message in loop_messages -%}",
        f"{{%- if message['role'] in {user_like} -%}}",
        "{%- set content = message['content'] -%}",
        "" if t.system else (
            "{%- if loop.first and system -%}"
            f"{{%- set content = {_expression(t.system_in_user, {'system': 'system', 'content': 'content'})} -%}}"
            "{%- endif -%}"),
        "{%- if message['role'] == 'user' -%}",
        f"{{{{- {_expression(t.user, {'content': 'content'})} -}}}}",
        "{%- else -%}",
        f"{{{{- {_expression(observation, {'content': 'content'})} -}}}}",
        "{%- endif -%}",
        f"{{%- if not loop.last or add_generation_prompt -%}}{{{{- {_literal(t.assistant_prefix)} -}}}}{{%- endif -%}}",
        "{%- else -%}",
        f"{{{{- {_expression(t.assistant, {'content': 'message.content'})} -}}}}",
        f"{{{{- {_literal(t.assistant_suffix)} -}}}}" if t.assistant_suffix else "",
        "{%- endif -%}",
        "{%- endfor -%}",
    ])


def register(template: Template) -> Template:
    TEMPLATES[template.name] = template
    return template


def get_template(name: str | None, tokenizer) -> Template:
    if name is None:
        raise ConfigError(f"template is required for sft; choose one of: {', '.join(sorted(TEMPLATES))}.")
    if name not in TEMPLATES:
        import difflib

        close = difflib.get_close_matches(name, list(TEMPLATES), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"template: {name!r} is unknown.{hint} Known: {', '.join(sorted(TEMPLATES))}.")
    return TEMPLATES[name].resolve(tokenizer)


register(Template(
    name="default",
    system="System: {content}\n",
    user="Human: {content}\n",
    assistant_prefix="Assistant:",
    assistant=" {content}{eos}",
    assistant_suffix="\n",
    eos_placeholder=True,
))

_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    observation="<|im_start|>tool\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    assistant_suffix="\n",
    stop_words=("<|im_end|>",),
    special_tokens=("<|im_start|>", "<|im_end|>"),
)
register(Template(name="chatml", **_CHATML))
register(Template(name="qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                  **_CHATML))

register(Template(
    name="llama3",
    prefix="<|begin_of_text|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>",
    stop_words=("<|eot_id|>",),
    special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
))

register(Template(
    name="mistral",
    prefix="<s>",
    user="[INST] {content}[/INST]",
    assistant_prefix="",
    assistant="{content}</s>",
    stop_words=("</s>",),
    special_tokens=("<s>", "</s>"),
))

register(Template(
    name="gemma",
    prefix="<bos>",
    user="<start_of_turn>user\n{content}<end_of_turn>\n",
    assistant_prefix="<start_of_turn>model\n",
    assistant="{content}<end_of_turn>",
    assistant_suffix="\n",
    stop_words=("<end_of_turn>",),
    special_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>"),
))

register(Template(
    name="phi",
    system="<|system|>\n{content}<|end|>\n",
    user="<|user|>\n{content}<|end|>\n",
    assistant_prefix="<|assistant|>\n",
    assistant="{content}<|end|>",
    assistant_suffix="\n",
    stop_words=("<|end|>",),
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
))

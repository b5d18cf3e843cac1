"""Chat templates: canonical conversations -> token ids + a per-token 'trained' mask, LLaMA-Factory's way.

The formats are data (data/template_table.py, by LLaMA-Factory's names). A conversation is encoded as LLaMA-Factory
0.9.5 encodes it, so that an LF config trains on the same tokens: each turn is written with its format, every text
piece is tokenized on its own (one batched tokenizer call for a whole batch of conversations), and `{bos}`/`{eos}`
become the tokenizer's ids. A turn is a (prompt side, reply) pair; the reply's format is trained whole (content,
stop token and what the format puts after it, e.g. ChatML's newline), the prompt side never unless train_on_prompt.

Reasoning templates (thought_words) follow LLaMA-Factory's enable_thinking / preserve_thinking rules, see
`_thoughts`. Where zerotune differs from LF it is on purpose and README says so: with efficient_eos, LF labels the
first token after a reply with eos (a token that is not there); zerotune trains the token that is there (the next
turn's header, which is what ends a reply in those models' own format).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

import numpy as np

from trainer.data.template_table import MULTIMODAL_ONLY, TABLE
from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

CONTENT = "{content}"
_MARKER = re.compile(r"(\{bos\}|\{eos\})")
BOS, EOS, THOUGHT = "\x00bos", "\x00eos", "\x00thought"  # element markers; user text never holds a NUL-led marker
_PROMPT_ROLES, _REPLY_ROLES = ("user", "observation"), ("assistant", "function")


def _elements(fmt: str, content: str = "") -> list[str]:
    """A format filled with content, as LF's slot elements: text pieces and the BOS/EOS markers between them."""
    out = []
    for piece in _MARKER.split(fmt):
        if piece == "{bos}":
            out.append(BOS)
        elif piece == "{eos}":
            out.append(EOS)
        elif piece:
            out.append(piece.replace(CONTENT, content, 1))
    return out


@dataclass(frozen=True)
class Template:
    name: str
    prefix: str = ""
    system: str = CONTENT
    user: str = CONTENT
    assistant: str = "{content}{eos}"
    function: str | None = None
    observation: str | None = None
    tool_format: str = "default"
    tools_wrap: str | None = None
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False
    efficient_eos: bool = False
    thought_words: tuple[str, str] | None = None
    empty_thought: str | None = None
    tool_call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")
    system_in_user: bool = False
    multimodal_in_lf: bool = False
    # what a run chooses (data keys, LF's names and defaults)
    enable_thinking: bool = True
    preserve_thinking: bool = False
    # the tokenizer's, filled by resolve()
    bos: str | None = None
    eos: str | None = None

    @classmethod
    def from_table(cls, name: str, entry: dict) -> "Template":
        entry = dict(entry)
        entry.setdefault("assistant", CONTENT if entry.get("efficient_eos") else "{content}{eos}")
        thought = entry.get("thought_words")
        if thought and "empty_thought" not in entry:
            entry["empty_thought"] = thought[0] + thought[1]
        return cls(name=name, **entry)

    # ---- what a run resolves once -----------------------------------------------------------------------------
    def resolve(self, tokenizer, enable_thinking: bool = True, preserve_thinking: bool = False,
                tool_format: str | None = None, default_system: str | None = None) -> "Template":
        """The template for this tokenizer and run: its eos (the first stop word with replace_eos, as LF replaces
        the tokenizer's), every stop word one token of the vocabulary, and the run's thinking/tool/system choices."""
        eos = self.stop_words[0] if self.replace_eos else tokenizer.eos_token
        formats = [self.prefix, self.system, self.user, self.assistant, self.function or "", self.observation or ""]
        if eos is None and (self.efficient_eos or any("{eos}" in f for f in formats)):
            raise ConfigError(f"template {self.name!r} ends replies with the tokenizer's eos token, and this "
                              "tokenizer has none. Set eos_token in its tokenizer_config.json.")
        vocab = tokenizer.get_vocab()
        if self.stop_words and self.stop_words[0] not in vocab:
            raise ConfigError(
                f"template {self.name!r} ends replies with {self.stop_words[0]!r}, which this tokenizer lacks (not "
                f"one token of its vocabulary). Pick the template that matches the model (template: auto reads the "
                f"model's own), known: {', '.join(sorted(TEMPLATES))}.")
        # A further stop word the vocabulary lacks (Llama 3.0 has no <|eom_id|>) can never be generated: LF adds it
        # as a new, untrained token; zerotune leaves it out of the stops and says so.
        stops = tuple(w for w in self.stop_words if w in vocab)
        if stops != self.stop_words:
            logger.info("Template %s: this tokenizer has no %s; generation stops at %s.", self.name,
                        [w for w in self.stop_words if w not in vocab], list(stops) or [eos])
        changes = dict(bos=tokenizer.bos_token, eos=eos, stop_words=stops, enable_thinking=enable_thinking,
                       preserve_thinking=preserve_thinking)
        if tool_format is not None:  # LF's tool_format key: calls become plain replies in that format
            from trainer.data.tool_formats import TOOL_FORMATS

            if tool_format not in TOOL_FORMATS:
                raise ConfigError(f"tool_format: {tool_format!r} is unknown. Known: {', '.join(sorted(TOOL_FORMATS))}.")
            changes.update(tool_format=tool_format, tools_wrap=None,
                           function=CONTENT if self.efficient_eos else "{content}{eos}")
        if default_system is not None:
            changes["default_system"] = default_system
        return dataclasses.replace(self, **changes)

    def stop_token_ids(self, tokenizer) -> list[int]:
        """The template's stop words, then its eos (LF's get_stop_token_ids, in a fixed order)."""
        ids = [tokenizer.convert_tokens_to_ids(w) for w in self.stop_words]
        eos = tokenizer.convert_tokens_to_ids(self.eos) if self.eos is not None else None
        return ids + ([eos] if eos is not None and eos not in ids else [])

    def chat_template(self) -> str:
        """This template as a Jinja chat_template (what export writes)."""
        from trainer.data.template_jinja import chat_template

        return chat_template(self)

    @property
    def reasoning(self) -> bool:
        return self.thought_words is not None

    # ---- turns as elements ------------------------------------------------------------------------------------
    def _remove_thought(self, content: str) -> str:
        """LF's remove_thought: every thought block out, then leading newlines."""
        open_, close = self.thought_words
        return re.sub(f"{re.escape(open_)}(.*?){re.escape(close)}", "", content, flags=re.DOTALL).lstrip("\n")

    def _has_thought(self, content: str) -> bool:
        return self.thought_words[0].strip() in content or self.thought_words[1].strip() in content

    def _thoughts(self, messages: list[dict], oneturn: bool, mask_history: bool) -> tuple[list[dict], dict[int, str]]:
        """Reasoning templates, as LLaMA-Factory 0.9.5: which thoughts are kept, and which turns get the empty
        thought block (turn -> "prompt": after the prompt side, untrained; "reply": in front of the reply, trained).

        Every turn (multiturn) or the last one (oneturn: preference, kto, generation; multiturn with mask_history
        and not preserve_thinking) whose reply holds no thought gets the empty block: in the reply with
        enable_thinking (the model learns to open and close it), in the prompt without. enable_thinking false drops
        every thought of the replies (multiturn; oneturn: the last); preference/kto prompts drop the thoughts of
        history replies unless preserve_thinking, and so does multiturn with mask_history."""
        if not self.reasoning:
            return messages, {}
        messages = [dict(m) for m in messages]
        n = len(messages)
        history = range(1, n - 2, 2)
        if oneturn:
            drop = [] if self.preserve_thinking else list(history)
            if not self.enable_thinking:
                drop.append(n - 1)
            checked = [n // 2 - 1]
        else:
            drop = list(range(1, n, 2)) if not self.enable_thinking else []
            discard = mask_history and not self.preserve_thinking
            if discard:
                drop += list(history)
            checked = [n // 2 - 1] if discard else list(range(n // 2))
        for i in drop:
            messages[i]["content"] = self._remove_thought(messages[i]["content"])
        where = "reply" if self.enable_thinking else "prompt"
        return messages, {t: where for t in checked if not self._has_thought(messages[2 * t + 1]["content"])}

    def _tools_text(self, tools: str) -> str:
        if not tools:
            return ""
        if self.tools_wrap is not None:
            return _elements(self.tools_wrap, tools)[0]
        from trainer.data.tool_formats import TOOL_FORMATS, parse_tools

        parsed = parse_tools(tools, "the tools column")
        return TOOL_FORMATS[self.tool_format].tools_text(parsed) if parsed else ""

    def _call_text(self, content: str) -> str:
        from trainer.data.tool_formats import TOOL_FORMATS, function_message_text

        if self.system_in_user:  # LF's Llama2Template formats calls without looking for thoughts or call words
            return function_message_text(TOOL_FORMATS[self.tool_format], content, None, None)
        return function_message_text(TOOL_FORMATS[self.tool_format], content, self.thought_words,
                                     self.tool_call_words)

    def messages_elements(self, messages: list[dict], system: str = "", tools: str = "", oneturn: bool = False,
                          mask_history: bool = False) -> list[list[str]]:
        """Per message, its elements (text pieces, BOS/EOS/THOUGHT markers), as LF's _encode writes them."""
        if len(messages) % 2 or any(m["role"] not in (_PROMPT_ROLES if i % 2 == 0 else _REPLY_ROLES)
                                    for i, m in enumerate(messages)):
            raise ValueError("a conversation alternates user/observation and assistant/function turns, and ends "
                             "with a reply")
        messages, empty_thought = self._thoughts(messages, oneturn, mask_history)
        system = system or self.default_system
        out = []
        for i, msg in enumerate(messages):
            elements, content, system_text = [], msg["content"], ""
            if i == 0:
                elements += _elements(self.prefix)
                if system or tools:
                    filled = _elements(self.system, system + self._tools_text(tools))
                    if self.system_in_user:
                        system_text = filled[0]  # LF takes the format's first piece
                    else:
                        elements += filled
            role = msg["role"]
            if role == "user":
                elements += _elements(self.user, system_text + content)
            elif role == "observation":
                elements += _elements(self.observation or self.user, content)
            elif role == "assistant":
                elements += _elements(self.assistant, content)
            else:
                elements += _elements(self.function or self.assistant, self._call_text(content))
            out.append(elements)
        for turn, where in empty_thought.items():
            if where == "reply":
                out[2 * turn + 1].insert(0, THOUGHT)
            else:
                out[2 * turn].append(THOUGHT)
        if self.efficient_eos:
            out[-1].append(EOS)
        return out

    # ---- ids and labels -----------------------------------------------------------------------------------------
    def _ids(self, tokenizer, all_elements: list[list[list[str]]]) -> list[list[list[int]]]:
        """Elements -> ids, tokenizing every text piece of the batch in one call (LF encodes each piece alone)."""
        texts = sorted({e for conv in all_elements for msg in conv for e in msg if e not in (BOS, EOS, THOUGHT)})
        if self.reasoning:
            texts.append(self.empty_thought)
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        table = dict(zip(texts, encoded))
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        special = {BOS: bos, EOS: [tokenizer.convert_tokens_to_ids(self.eos)] if self.eos is not None else [],
                   THOUGHT: table.get(self.empty_thought, [])}
        return [[[i for e in msg for i in (special[e] if e in special else table[e])] for msg in conv]
                for conv in all_elements]

    def encode_batch(self, tokenizer, conversations: list[tuple], train_on_prompt: bool = False,
                     mask_history: bool = False, oneturn: bool = False) -> list[tuple[list[int], np.ndarray]]:
        """Many (messages, system[, tools]) at once -> per conversation its ids and which tokens are trained.
        Every reply is trained; mask_history or oneturn (preference and kto data: LF's encode_oneturn) train the
        last only; train_on_prompt trains every token."""
        if train_on_prompt and self.efficient_eos:
            raise ConfigError(f"template {self.name!r} cannot train_on_prompt (its replies carry no eos of their own; "
                              "LLaMA-Factory refuses the same).")
        elements = [self.messages_elements(c[0], c[1], c[2] if len(c) > 2 else "", oneturn, mask_history)
                    for c in conversations]
        out = []
        for per_message in self._ids(tokenizer, elements):
            ids, flags = [], []
            last = len(per_message) // 2 - 1
            for turn in range(last + 1):
                source, target = per_message[2 * turn], per_message[2 * turn + 1]
                trained = train_on_prompt or not ((mask_history or oneturn) and turn != last)
                ids += source + target
                flags.append(np.full(len(source), train_on_prompt, dtype=bool))
                if self.efficient_eos and turn > 0 and len(source) and flags[-2].any():
                    flags[-1][0] = True  # the token that ends the previous trained reply (see the module docstring)
                flags.append(np.full(len(target), trained, dtype=bool))
            out.append((ids, np.concatenate(flags) if flags else np.zeros(0, dtype=bool)))
        return out

    def encode(self, tokenizer, messages: list[dict], system: str = "", train_on_prompt: bool = False,
               mask_history: bool = False, tools: str = "") -> tuple[list[int], list[bool]]:
        [(ids, trained)] = self.encode_batch(tokenizer, [(messages, system, tools)], train_on_prompt, mask_history)
        return ids, trained.tolist()

    def encode_prompt(self, tokenizer, messages: list[dict], system: str = "", tools: str = "") -> list[int]:
        """Ids of a conversation ending with a user turn, up to where the reply starts (LF's chat: encode_oneturn
        with an empty reply; a reasoning template without thinking ends the prompt with the empty thought)."""
        if not messages or messages[-1]["role"] not in _PROMPT_ROLES:
            raise ValueError("a generation prompt needs a conversation that ends with a user turn")
        elements = self.messages_elements(messages + [{"role": "assistant", "content": ""}], system, tools, True)
        [per_message] = self._ids(tokenizer, [elements[:-1]])
        return [i for msg in per_message for i in msg]

    # ---- text --------------------------------------------------------------------------------------------------
    def _text(self, element: str) -> str:
        return {BOS: self.bos or "", EOS: self.eos or "", THOUGHT: self.empty_thought or ""}.get(element, element)

    def render(self, messages: list[dict], system: str = "", tools: str = "", oneturn: bool = False,
               mask_history: bool = False) -> list[tuple[str, int]]:
        """Text pieces with the index of the message they belong to (odd: a reply)."""
        return [(self._text(e), i) for i, msg in enumerate(self.messages_elements(messages, system, tools, oneturn,
                                                                                    mask_history)) for e in msg]

    def render_text(self, messages: list[dict], system: str = "", tools: str = "") -> str:
        return "".join(text for text, _ in self.render(messages, system, tools))


TEMPLATES: dict[str, Template] = {name: Template.from_table(name, entry) for name, entry in TABLE.items()}


def get_template(name: str | None, tokenizer, data_args=None) -> Template:
    """The named template resolved for this tokenizer and run (data_args: enable_thinking, preserve_thinking,
    tool_format, default_system; None: LF's defaults). `template: auto` reads the tokenizer's own chat_template."""
    if name is None:
        raise ConfigError(f"template is required; name one ({', '.join(sorted(TEMPLATES))}) or use template: auto "
                          "to train with the model's own chat_template.")
    options = {k: getattr(data_args, k) for k in ("enable_thinking", "preserve_thinking", "tool_format",
                                                  "default_system") if data_args is not None and hasattr(data_args, k)}
    if name == "auto":
        from trainer.data.auto_template import AutoTemplate

        ignored = [k for k in ("default_system", "tool_format") if options.get(k) is not None]
        if ignored:  # the model's chat_template decides these; a reasoning one is refused (not prefix-stable)
            logger.warning("template: auto renders with the model's own chat_template; %s not applied.",
                           " and ".join(ignored))
        return AutoTemplate().resolve(tokenizer)
    if name in MULTIMODAL_ONLY:
        raise ConfigError(f"template: {name!r} is a multimodal template (images, video or audio), and zerotune trains "
                          "text models. For a text model of that family use its text template (e.g. qwen3 for "
                          "qwen3_vl's language model) or template: auto.")
    if name not in TEMPLATES:
        import difflib

        close = difflib.get_close_matches(name, list(TEMPLATES), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"template: {name!r} is unknown.{hint} Known: auto, {', '.join(sorted(TEMPLATES))}.")
    return TEMPLATES[name].resolve(tokenizer, **options)

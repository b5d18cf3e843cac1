"""`template: auto`: train any model from its tokenizer's own Jinja chat_template, with no named template.

The ids are exactly what the model's apply_chat_template gives (the full conversation is rendered once and
tokenized once). Which tokens are trained is read from renderings of the conversation's prefixes: for reply k,
"everything before it + the generation prompt" must be a prefix of "everything up to and including it", which
must be a prefix of the whole conversation; the reply span is what lies between the first two. This only
works for a prefix-stable template, so one that rewrites earlier text when the conversation grows (Qwen3
dropping history <think> blocks, a system prompt placed by the last turn) is refused with the named template
to use instead; so is one that writes no special token after a reply (GLM-4: nothing would teach the model
to stop). Text a template writes only after a whole conversation (Phi-4-mini's closing eos) is set aside.
"""

from __future__ import annotations

import json
import re

import numpy as np

from trainer.errors import ConfigError

# Probe conversations for resolve(): plain, with a system prompt, and with <think> blocks in the replies (a
# template that strips reasoning from history only when it is present shows it only here).
_TURNS = [("Hi there, who are you?", "I am a helpful assistant."), ("What is two plus two?", "Two plus two is four.")]
_PLAIN = [m for u, a in _TURNS for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
_THINK = [m if m["role"] == "user" else {**m, "content": "<think>\nLet me answer.\n</think>\n\n" + m["content"]}
          for m in _PLAIN]
_PROBE_SYSTEM = "You are a careful assistant."

_EXCERPT = 30  # characters shown either side of the first difference


def _at_row(row: int, fn, *args):
    """fn(*args); a ValueError it raises is marked with the conversation's index in the batch (`.row`)."""
    try:
        return fn(*args)
    except ValueError as e:
        e.row = row
        raise


class NotPrefixStable(ValueError):
    """A longer rendering rewrote earlier text: labels read from prefixes would be wrong."""


def _first_difference(short: str, long: str, short_name: str, long_name: str) -> str:
    """Where two renderings part, as a short excerpt of each (for the refusal message)."""
    d = next((i for i, (a, b) in enumerate(zip(short, long)) if a != b), min(len(short), len(long)))
    lo = max(0, d - _EXCERPT)
    return (f"at character {d}, {short_name} has {short[lo:d + _EXCERPT]!r} where {long_name} has "
            f"{long[lo:d + _EXCERPT]!r}")


def _tool_calls(content: str) -> list[dict]:
    """A `function` message's JSON (one {"name", "arguments"} or a list of them) -> OpenAI-style tool_calls, the
    form HF chat templates read. Arguments given as JSON text are parsed, so templates `tojson` an object."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as e:
        raise ValueError(f"a function message is not valid JSON ({e}): {content[:200]!r}") from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        if not isinstance(call, dict) or "name" not in call:
            raise ValueError(f'a function message needs {{"name", "arguments"}} objects: {content[:200]!r}')
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass  # free text arguments: the template renders them as given
        out.append({"type": "function", "function": {"name": call["name"], "arguments": args}})
    return out


def _tools(text: str) -> list[dict] | None:
    """The row's tools JSON -> the `tools=` list. LLaMA-Factory rows list bare {"name", "description",
    "parameters"}; HF templates expect the OpenAI form {"type": "function", "function": {...}}, so bare ones
    are wrapped (Qwen2.5's template, for one, prints each tool as given)."""
    if not text:
        return None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the tools are not valid JSON ({e}): {text[:200]!r}") from None
    tools = tools if isinstance(tools, list) else [tools]
    return [t if not isinstance(t, dict) or "function" in t or "name" not in t else {"type": "function", "function": t}
            for t in tools]


def to_chat_messages(messages: list[dict], system: str = "") -> list[dict]:
    """Canonical messages -> the messages an HF chat_template reads."""
    out = [{"role": "system", "content": system}] if system else []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "observation":
            out.append({"role": "tool", "content": content})
        elif role == "function":
            out.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(content)})
        elif role in ("user", "assistant", "system"):
            out.append({"role": role, "content": content})
        else:
            raise ValueError(f"unknown message role {role!r}")
    return out


def _check_nothing_dropped(chat: list[dict], full: str, tools: list | None) -> None:
    """A template that ignores a role (tool results, a system prompt) or the tools would train on a conversation
    other than the row's: every message's text and every tool's name must be in the rendering."""
    for m in chat:
        content = m["content"].strip()
        # Llama 3.1 prints a tool result with `tojson`: its escaped form counts as present
        if content and content not in full and json.dumps(content, ensure_ascii=False)[1:-1] not in full:
            raise ValueError(f"the chat_template leaves out or rewrites the {m['role']} message {content[:80]!r}")
    for tool in tools or []:
        name = tool.get("function", tool).get("name") if isinstance(tool, dict) else None
        if isinstance(name, str) and name not in full:
            raise ValueError(f"the chat_template leaves out the tool {name!r}: it does not render tools; name a "
                             f"template that supports them")


def _special_strings(tokenizer) -> list[str]:
    """The tokenizer's special tokens as text (its special map plus added tokens marked special)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted((s for s in found if s), key=len, reverse=True)  # longest first: a regex prefers it


class AutoTemplate:
    """Duck-typed like a named template (name, default_system, resolve, encode_batch, encode_prompt,
    stop_token_ids, chat_template). Unresolved it knows nothing; resolve(tokenizer) returns a resolved copy."""

    name = "auto"
    default_system = ""  # the chat_template decides its own default

    def __init__(self, template: str | None = None, stops: tuple[str, ...] = (), tail: str = ""):
        self._template = template
        self._stops = stops  # end-of-turn token(s) as text, found by rendering the probe
        self._stop_re = re.compile("|".join(map(re.escape, stops))) if stops else None
        self._tail = tail  # what the template writes after a whole conversation only (Phi-4-mini's eos)

    def __repr__(self) -> str:
        """Stable across runs: the tokenized-data cache is keyed on it (an object address would never hit)."""
        import hashlib

        digest = hashlib.sha256((self._template or "").encode()).hexdigest()[:16]
        return f"AutoTemplate(chat_template={digest}, stops={self._stops!r}, tail={self._tail!r})"

    # ---- setup -----------------------------------------------------------------------------------------------
    def resolve(self, tokenizer) -> "AutoTemplate":
        template = tokenizer.chat_template
        model = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        if not isinstance(template, str) or not template.strip():
            guess = suggest_template(tokenizer)
            raise ConfigError(f"template: auto needs a tokenizer with a chat_template; {model} has none. Name a "
                              f"template: " + (f"template: {guess}" if guess else _known_templates()))
        bare = AutoTemplate(template)
        try:
            [text] = bare._render(tokenizer, [to_chat_messages(_PLAIN[:2])], None, False)
            [prompt, ended] = [bare._render(tokenizer, [to_chat_messages(_PLAIN[:1])], None, g)[0]
                                for g in (True, False)]
        except ValueError as e:
            raise ConfigError(f"template: auto: {model}'s chat_template fails on a plain user/assistant "
                              f"conversation ({e}). Name a template instead.") from None
        # The tail: what a rendering without the generation prompt has beyond the one with it (Phi-3/4-mini end
        # every conversation with eos). It is not part of a reply, and not there once the conversation goes on.
        common = next((i for i, (a, b) in enumerate(zip(ended, prompt)) if a != b), min(len(ended), len(prompt)))
        for token in _special_strings(tokenizer):  # "<|end|>" vs "<|assistant|>" part at "e"; the tail starts at "<|"
            start = ended.find(token, max(0, common - len(token) + 1), common + len(token) - 1)
            if 0 <= start < common:
                common = start
        tail = ended[common:]
        text = text[:-len(tail)] if tail and text.endswith(tail) else text
        if not text.startswith(prompt):
            self._refuse(tokenizer, model, f"the generation prompt is not where the reply starts: "
                                           f"{_first_difference(prompt, text, 'the generation prompt', 'the reply')}")
        # The stop token: the first special token after the probe reply's content.
        span, reply = text[len(prompt):], _PLAIN[1]["content"]
        after = span[span.find(reply) + len(reply):] if reply in span else span
        hits = [(after.find(s), s) for s in _special_strings(tokenizer) if s in after]
        if not hits:  # GLM-4: the next turn's header is what ends a reply; no token of the reply can teach it
            guess = suggest_template(tokenizer)
            raise ConfigError(
                f"template: auto can't teach {model} to end a reply: its chat_template writes no special token "
                f"after a reply (a reply renders as {span!r}), so the model would not learn to stop. Use a named "
                f"template instead: " + (f"template: {guess}." if guess else _known_templates()))
        stops = (min(hits, key=lambda h: (h[0], -len(h[1])))[1],)
        resolved = AutoTemplate(template, stops, tail)
        # Prefix stability on each probe. A template that rejects a system prompt (Gemma 2) is not refused
        # here: rows with a system prompt fail one by one, with the template's own message.
        for messages, system, required in ((_PLAIN, "", True), (_PLAIN, _PROBE_SYSTEM, False), (_THINK, "", False)):
            try:
                resolved._layout(tokenizer, [(messages, system, "")], train_on_prompt=False, last_only=False)
            except NotPrefixStable as e:
                self._refuse(tokenizer, model, str(e))
            except ValueError as e:
                if required:
                    raise ConfigError(f"template: auto: {model}'s chat_template fails on a plain user/assistant "
                                      f"conversation ({e}). Name a template instead.") from None
        return resolved

    @staticmethod
    def _refuse(tokenizer, model: str, why: str):
        guess = suggest_template(tokenizer)
        raise ConfigError(
            f"template: auto can't train {model}: its chat_template is not prefix-stable (rendering a longer "
            f"conversation rewrites earlier text, so the labels read from it would not match what the model sees): "
            f"{why}. Use a named template instead: "
            + (f"template: {guess}." if guess else _known_templates())
        )

    def chat_template(self) -> str:
        """For export: the tokenizer's own template, unchanged."""
        if self._template is None:
            raise RuntimeError("AutoTemplate.chat_template() needs resolve(tokenizer) first")
        return self._template

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = [tokenizer.convert_tokens_to_ids(s) for s in self._stops]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return list(dict.fromkeys(i for i in ids if i is not None))

    # ---- rendering -------------------------------------------------------------------------------------------
    def _render(self, tokenizer, chats: list[list[dict]], tools: list | None, generation: bool) -> list[str]:
        """Many conversations with the same tools in one apply_chat_template call; if it fails, one by one, so
        the error is that conversation's."""
        if not chats:
            return []
        kwargs = dict(tools=tools, chat_template=self._template, add_generation_prompt=generation, tokenize=False)
        try:
            return tokenizer.apply_chat_template(chats, **kwargs)
        except Exception as e:
            if len(chats) == 1:
                raise ValueError(f"the chat_template fails on this conversation: {e}") from None
            out = []
            for position, chat in enumerate(chats):
                try:
                    out.append(self._render(tokenizer, [chat], tools, generation)[0])
                except ValueError as e:
                    e.position = position  # which of the chats: _layout maps it back to its conversation
                    raise
            return out

    def _layout(self, tokenizer, conversations, train_on_prompt: bool, last_only: bool
                ) -> list[tuple[str, list[tuple[int, int]]]]:
        """Per conversation: its full rendering and the character spans that are trained. A ValueError about
        one conversation carries its index in the batch as `.row`."""
        plans, requests, owners = [], {}, {}  # requests[(tools text, generation)]: chats to render; owners: rows

        def ask(tools_text: str, generation: bool, chat: list[dict]) -> tuple:
            requests.setdefault((tools_text, generation), []).append(chat)
            owners.setdefault((tools_text, generation), []).append(row)
            return tools_text, generation, len(requests[tools_text, generation]) - 1

        for row, conv in enumerate(conversations):
            messages, system = conv[0], conv[1]
            tools_text = conv[2] if len(conv) > 2 else ""
            chat = _at_row(row, to_chat_messages, messages, system)
            replies = [] if train_on_prompt else [i for i, m in enumerate(chat) if m["role"] == "assistant"]
            numbered = list(enumerate(replies, 1))[-1:] if last_only else list(enumerate(replies, 1))
            # (reply number, its message index, the prompt before it, the text up to it); the last reply of a
            # conversation ending with it is the full rendering, so it is rendered once.
            turns = [(n, i, ask(tools_text, True, chat[:i]), ask(tools_text, False, chat[:i + 1]))
                     for n, i in numbered]
            full = turns[-1][3] if turns and turns[-1][1] == len(chat) - 1 else ask(tools_text, False, chat)
            plans.append((chat, turns, full, tools_text))

        rendered, parsed = {}, {}
        for key, chats in requests.items():
            tools_text = key[0]
            tools = parsed[tools_text] = parsed.get(tools_text) or _at_row(owners[key][0], _tools, tools_text)
            try:
                rendered[key] = self._render(tokenizer, chats, tools, key[1])
            except ValueError as e:
                e.row = owners[key][getattr(e, "position", 0)]
                raise

        def text(ref: tuple) -> str:
            return rendered[ref[0], ref[1]][ref[2]]

        return [_at_row(row, self._spans, plan, text, parsed, train_on_prompt) for row, plan in enumerate(plans)]

    def _spans(self, plan: tuple, text, parsed: dict, train_on_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """One conversation's full text and trained character spans, its prefixes checked."""
        chat, turns, full_ref, tools_text = plan
        full, spans, tail = text(full_ref), [], self._tail
        body = full[:-len(tail)] if tail and full.endswith(tail) else full  # the tail is set aside everywhere
        for k, i, prompt_ref, upto_ref in turns:
            prompt, upto = text(prompt_ref), text(upto_ref)
            upto = upto[:-len(tail)] if tail and upto.endswith(tail) else upto
            if not upto.startswith(prompt):
                raise NotPrefixStable(f"reply {k} does not start where the generation prompt ends: "
                                      f"{_first_difference(prompt, upto, 'the generation prompt', 'the reply')}")
            if not body.startswith(upto):
                raise NotPrefixStable(f"the text up to reply {k} changes once the conversation goes on: "
                                      + _first_difference(upto, body, "the conversation cut there",
                                                          "the whole conversation"))
            spans.append((len(prompt), len(prompt) + self._trained_length(upto[len(prompt):], chat[i], k)))
        _check_nothing_dropped(chat, full, parsed.get(tools_text))  # after the prefix checks: their reason first
        return full, [(0, len(full))] if train_on_prompt else spans

    def _trained_length(self, span: str, message: dict, k: int) -> int:
        """How much of a reply span is trained: the reply and its stop token, not the template's text after the
        stop token (a newline before the next turn). No stop token found: the whole span."""
        content = message["content"].strip()
        start = 0
        for call in message.get("tool_calls", []):  # a template without tool-call support renders an empty reply
            if call["function"]["name"] not in span:
                raise ValueError(f"the chat_template leaves out the tool call {call['function']['name']!r} of "
                                 f"reply {k} (it renders {span[:120]!r}); name a template that supports tools")
        if content:
            pos = span.find(content)
            if pos < 0:  # e.g. a template that drops <think> from every reply: training would lose that text
                raise ValueError(f"the chat_template rewrites reply {k}: its text {content[:60]!r} is not in "
                                 f"the rendering {span[:120]!r}")
            start = pos + len(content)
        hit = self._stop_re.search(span, start) if self._stop_re else None
        return hit.end() if hit else len(span)

    # ---- encoding ----------------------------------------------------------------------------------------------
    def encode_batch(self, tokenizer, conversations, train_on_prompt: bool = False, mask_history: bool = False,
                     oneturn: bool = False) -> list[tuple[list[int], np.ndarray]]:
        """(messages, system, tools) per conversation -> (ids, trained mask). One tokenizer call for the batch;
        a token is trained when its first character lies in a trained span (a token with an empty span, the
        character before it)."""
        if self._template is None:
            raise RuntimeError("AutoTemplate.encode_batch() needs resolve(tokenizer) first")
        layouts = self._layout(tokenizer, conversations, train_on_prompt, last_only=mask_history or oneturn)
        enc = tokenizer([full for full, _ in layouts], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for (full, spans), ids, offsets in zip(layouts, enc["input_ids"], enc["offset_mapping"]):
            chars = np.zeros(len(full) + 1, dtype=bool)
            for a, b in spans:
                chars[a:b] = True
            pos = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            start = np.where(pos[:, 0] < pos[:, 1], pos[:, 0], np.maximum(pos[:, 0] - 1, 0))
            out.append((ids, chars[np.minimum(start, len(full))]))
        return out

    def encode_prompt(self, tokenizer, messages: list[dict], system: str = "", tools: str = "") -> list[int]:
        """Ids of a conversation ending with a user turn, then the generation prompt."""
        if messages and messages[-1]["role"] in ("assistant", "function"):
            raise ValueError("encode_prompt needs a conversation that ends with a user turn")
        [text] = self._render(tokenizer, [to_chat_messages(messages, system)], _tools(tools), True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def _known_templates() -> str:
    from trainer.data.template_table import TABLE  # the names only (templates.py imports this module)

    return "one that matches the model (" + ", ".join(sorted(TABLE)) + ")."


# Markers in a rendering -> LLaMA-Factory's template name; first match wins, so specific ones come first.
_MARKERS = [
    (("<|im_sep|>",), "phi4"),
    (("<|im_start|>", "<think>"), "qwen3"),
    (("<|header_start|>",), "llama4"),
    (("<|start_header_id|>",), "llama3"),
    (("<｜User｜>", "<think>"), "deepseekr1"),
    (("<｜User｜>",), "deepseek3"),
    (("[gMASK]", "<think>"), "glm4_moe"),
    (("[gMASK]",), "glm4"),
    (("<|user|>", "<|end|>"), "phi"),
    (("<<SYS>>",), "llama2"),
    (("[INST]",), "mistral"),
]


def suggest_template(tokenizer) -> str | None:
    """A guess at the LLaMA-Factory template for this tokenizer, from its chat_template's rendering (or, with
    no chat_template, from its special tokens)."""
    text, system_ok = "", True
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        def render(chat, generation=True):
            return tokenizer.apply_chat_template(chat, chat_template=template, add_generation_prompt=generation,
                                                 tokenize=False)
        try:  # a reply last (Qwen3 shows its empty <think> block there), then a generation prompt
            text = render(_PLAIN[:2], False) + render(_PLAIN[:3])
        except Exception:
            text = template  # the markers are usually literal in the template
        try:
            render(to_chat_messages(_PLAIN[:1], _PROBE_SYSTEM))
        except Exception:
            system_ok = False
        if "<think>" in template:  # a reasoning template, even where this rendering shows no <think>
            text += " <think>"
    else:  # no chat_template: the tokenizer's added tokens still name the family
        text = " ".join(t.content for t in tokenizer.added_tokens_decoder.values())
    if "<start_of_turn>" in text:
        return "gemma3" if system_ok else "gemma"
    if "<|im_start|>" in text and "<|im_sep|>" not in text and "<think>" not in text:
        name = (getattr(tokenizer, "name_or_path", "") or "") + text
        return "qwen" if "qwen" in name.lower() else "chatml"
    for markers, name in _MARKERS:
        if all(m in text for m in markers):
            return name
    return None


def show_example(template: AutoTemplate, tokenizer, messages: list[dict], system: str = "", tools: str = "",
                 **flags) -> str:
    """One conversation as the model sees it, trained tokens wrapped in ⟦…⟧ (for `zerotune check`)."""
    [(ids, trained)] = template.encode_batch(tokenizer, [(messages, system, tools)], **flags)
    pieces, run = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[run]:
            piece = tokenizer.decode(ids[run:i], skip_special_tokens=False)
            pieces.append(f"⟦{piece}⟧" if trained[run] else piece)
            run = i
    return "".join(pieces)

"""alpaca / sharegpt / openai / text rows -> one canonical example.

Canonical columns: messages (list of {role, content}; roles user, assistant, observation, function),
system (str), tools (str), plus _row (1-based row in the source file) and _source (dataset name).
A row that cannot be converted is never dropped silently: convert() returns it with a reason, and
the caller counts and reports every one of them.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from trainer.data.registry import DatasetSpec
from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

USER, ASSISTANT, OBSERVATION, FUNCTION = "user", "assistant", "observation", "function"
PROMPT_SIDE, RESPONSE_SIDE = (USER, OBSERVATION), (ASSISTANT, FUNCTION)
CANONICAL_COLUMNS = ("messages", "system", "tools", "_row", "_source", "_error")

FORMATTERS: dict[str, Callable[[DatasetSpec], Callable[[dict], dict]]] = {}


def register(name: str):
    def wrap(fn):
        FORMATTERS[name] = fn
        return fn

    return wrap


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _result(messages: list[dict], system: str = "", tools: str = "", error: str = "") -> dict:
    return {"messages": messages, "system": system, "tools": tools, "_error": error}


@register("alpaca")
def alpaca(spec: DatasetSpec) -> Callable[[dict], dict]:
    prompt_col = spec.column("prompt", "instruction")
    query_col = spec.column("query", "input")
    response_col = spec.column("response", "output")
    history_col = spec.column("history", None)
    system_col = spec.column("system", None)
    tools_col = spec.column("tools", None)

    def convert(row: dict) -> dict:
        messages: list[dict] = []
        history = row.get(history_col) if history_col else None
        for i, pair in enumerate(history or []):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(_text(x).strip() for x in pair):
                return _result([], error=f"history[{i}] is not a non-empty [user, assistant] pair")
            messages += [{"role": USER, "content": _text(pair[0])}, {"role": ASSISTANT, "content": _text(pair[1])}]
        prompt = _text(row.get(prompt_col))
        query = _text(row.get(query_col)) if query_col else ""
        content = "\n".join(part for part in (prompt, query) if part)
        response = _text(row.get(response_col))
        if not content.strip():
            return _result([], error=f"empty prompt (columns {prompt_col!r}/{query_col!r})")
        if not response.strip():
            return _result([], error=f"empty response (column {response_col!r})")
        messages += [{"role": USER, "content": content}, {"role": ASSISTANT, "content": response}]
        system = _text(row.get(system_col)) if system_col else ""
        return _result(messages, system=system, tools=_text(row.get(tools_col)) if tools_col else "")

    return convert


def _conversation(spec: DatasetSpec, openai_style: bool) -> Callable[[dict], dict]:
    defaults = (
        dict(role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant",
             observation_tag="tool", function_tag="function_call", system_tag="system")
        if openai_style else
        dict(role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt",
             observation_tag="observation", function_tag="function_call", system_tag="system")
    )
    tags = {**defaults, **spec.tags}
    role_of = {tags["user_tag"]: USER, tags["assistant_tag"]: ASSISTANT, tags["observation_tag"]: OBSERVATION,
               tags["function_tag"]: FUNCTION}
    messages_col = spec.column("messages", "messages" if openai_style else "conversations")
    system_col = spec.column("system", None)
    tools_col = spec.column("tools", None)

    def convert(row: dict) -> dict:
        turns = row.get(messages_col)
        if not isinstance(turns, list) or not turns:
            return _result([], error=f"column {messages_col!r} is missing or empty")
        system = _text(row.get(system_col)) if system_col else ""
        first = turns[0] if isinstance(turns[0], dict) else {}
        if first.get(tags["role_tag"]) == tags["system_tag"]:
            system = _text(first.get(tags["content_tag"]))
            turns = turns[1:]
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                return _result([], error=f"turn {i} is not an object")
            role = role_of.get(turn.get(tags["role_tag"]))
            if role is None:
                return _result([], error=f"turn {i} has unknown role {turn.get(tags['role_tag'])!r}")
            expected = PROMPT_SIDE if i % 2 == 0 else RESPONSE_SIDE
            if role not in expected:
                return _result([], error=f"turn {i} is {role!r} but turns must alternate user/assistant")
            content = _text(turn.get(tags["content_tag"]))
            if not content.strip():
                return _result([], error=f"turn {i} has empty content")
            messages.append({"role": role, "content": content})
        if not messages or messages[-1]["role"] not in RESPONSE_SIDE:
            return _result([], error="conversation does not end with an assistant turn")
        tools = _text(row.get(tools_col)) if tools_col else ""
        return _result(messages, system=system, tools=tools)

    return convert


@register("sharegpt")
def sharegpt(spec: DatasetSpec) -> Callable[[dict], dict]:
    return _conversation(spec, openai_style=False)


@register("openai")
def openai(spec: DatasetSpec) -> Callable[[dict], dict]:
    return _conversation(spec, openai_style=True)


@register("text")
def text(spec: DatasetSpec) -> Callable[[dict], dict]:
    """Plain documents (pt stage): one user-less 'assistant' message holding the whole text."""
    text_col = spec.column("prompt", "text")

    def convert(row: dict) -> dict:
        value = _text(row.get(text_col))
        if not value.strip():
            return _result([], error=f"empty text (column {text_col!r})")
        return _result([{"role": ASSISTANT, "content": value}])

    return convert


def pairwise(spec: DatasetSpec) -> Callable[[dict], dict]:
    """A ranking row (LLaMA-Factory's `ranking: true`) -> the prompt conversation (ending with a user turn) in
    `messages`, and the two answers in `chosen` and `rejected`. alpaca: prompt/query/history/system columns and
    chosen/rejected strings; sharegpt/openai: the conversation and chosen/rejected as one assistant message each.
    The answer that wins is put where the SFT converter expects the reply, so both formats are validated alike."""
    base = FORMATTERS[spec.formatting](spec)
    chosen_col, rejected_col = spec.column("chosen", "chosen"), spec.column("rejected", "rejected")
    if spec.formatting == "alpaca":
        response_col = spec.column("response", "output")
    else:
        openai_style = spec.formatting == "openai"
        role_tag = spec.tags.get("role_tag", "role" if openai_style else "from")
        content_tag = spec.tags.get("content_tag", "content" if openai_style else "value")
        assistant_tag = spec.tags.get("assistant_tag", "assistant" if openai_style else "gpt")
        messages_col = spec.column("messages", "messages" if openai_style else "conversations")

    def answer(value, column: str) -> tuple[str, str]:
        """(text, error) of one answer: a string (alpaca) or one assistant message (sharegpt/openai)."""
        if spec.formatting != "alpaca":
            if not isinstance(value, dict) or value.get(role_tag) != assistant_tag:
                return "", f"column {column!r} is not one {assistant_tag!r} message"
            value = value.get(content_tag)
        text = _text(value)
        return text, "" if text.strip() else f"empty answer (column {column!r})"

    def convert(row: dict) -> dict:
        chosen, error = answer(row.get(chosen_col), chosen_col)
        rejected, other = answer(row.get(rejected_col), rejected_col)
        if error or other:
            return {**_result([], error=error or other), "chosen": "", "rejected": ""}
        if spec.formatting == "alpaca":
            out = base({**row, response_col: chosen})
        else:
            turns = row.get(messages_col)
            out = base({**row, messages_col: list(turns) + [row[chosen_col]] if isinstance(turns, list) else turns})
        out["chosen"], out["rejected"] = chosen, rejected
        if not out["_error"]:
            out["messages"] = out["messages"][:-1]  # the prompt: everything before the answer
        return out

    return convert


def to_canonical(spec: DatasetSpec, rows, num_proc: int | None = None):
    """Convert a raw datasets.Dataset; return (good rows, list of (row, reason) for bad rows)."""
    check_rows(spec, rows.column_names)
    convert = FORMATTERS[spec.formatting](spec)

    def apply(row: dict) -> dict:
        out = convert(row)
        out["_source"] = spec.name
        return out

    keep = [c for c in rows.column_names if c == "_row"]
    converted = rows.map(apply, remove_columns=[c for c in rows.column_names if c not in keep],
                         num_proc=num_proc, desc=f"Formatting {spec.name}")
    errors = [e for e in converted["_error"]]
    bad = [(row, err) for row, err in zip(converted["_row"], errors) if err]
    if bad:
        converted = converted.filter(lambda e: not e, input_columns="_error", num_proc=num_proc)
    return converted, bad


def check_rows(spec: DatasetSpec, columns: list[str], pairwise_kind: bool = False, response: bool = True) -> None:
    """Before any row is converted: the dataset is of a kind these rows can be, and its columns are there (the
    answer's too unless `response` is False: grpo's prompts may come without one)."""
    if spec.ranking and not pairwise_kind:
        raise ConfigError(f"dataset {spec.name!r} is ranking (pairwise) data, which the sft/pt stages cannot use.")
    if pairwise_kind and not spec.ranking:
        raise ConfigError(f"dataset {spec.name!r} is not pairwise: the preference stages need a dataset with "
                          "\"ranking\": true and chosen/rejected columns in dataset_info.json.")
    if pairwise_kind:
        for role in ("chosen", "rejected"):
            if spec.column(role, role) not in columns:
                raise ConfigError(f"dataset {spec.name!r} ({spec.path}): column {spec.column(role, role)!r} not "
                                  f"found; the file has columns {[c for c in columns if c != '_row']}. Map "
                                  f"\"{role}\" under columns in dataset_info.json.")
    needed_response = response and not pairwise_kind
    _check_columns(spec, columns, spec.formatting, needed_response)


def _check_columns(spec: DatasetSpec, columns: list[str], formatting: str, response: bool = True) -> None:
    if formatting == "alpaca":
        needed = [spec.column("prompt", "instruction")] + ([spec.column("response", "output")] if response else [])
        optional = ("query", "history", "system", "tools")
    elif formatting == "text":
        needed, optional = [spec.column("prompt", "text")], ()
    else:
        needed = [spec.column("messages", "messages" if formatting == "openai" else "conversations")]
        optional = ("system", "tools")
    # Optional roles are checked only when dataset_info.json maps them explicitly.
    needed += [spec.columns[role] for role in optional if spec.columns.get(role)]
    for col in needed:
        if col not in columns:
            raise ConfigError(
                f"dataset {spec.name!r} ({spec.path}): column {col!r} not found; the file has columns "
                f"{[c for c in columns if c != '_row']}. Map columns in dataset_info.json (\"columns\": {{...}})."
            )

"""grpo's own data (the data kind "prompts", registered here for data/ to tokenize): each row's prompt, as the template
writes it up to the generation of the answer, and the row's other columns for the reward functions.

TRL's GRPO datasets are prompts with whatever columns the reward functions check against ("solution", "answer",
...), and TRL hands every column but the prompt to each reward function as a keyword argument. Here a row is any
dataset_info.json entry (alpaca, sharegpt, openai): its prompt is everything before its last answer, and the answer
may be missing altogether (an alpaca row without output, a conversation ending with a user turn). The columns that
make the prompt (alpaca: instruction, input, history, system, tools; sharegpt / openai: the conversation, system,
tools) are the prompt; every other column of the row travels with it, unchanged, in `reward_columns` (JSON), together
with the prompt as TRL hands it to reward functions (a conversational dataset's messages, system first; a plain
dataset's prompt text, alpaca's instruction and input as the user turn holds them) and where the row came from.

A prompt longer than cutoff_len keeps its last cutoff_len tokens (the end is where the answer starts; TRL cut
prompts from the left too) and is counted as truncated.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np

from trainer.data import formats
from trainer.data.kinds import DATA_KINDS, DataKind
from trainer.data.processing import IGNORE_INDEX, prompt_and_answer
from trainer.errors import ConfigError

KIND = "prompts"
COLUMN = "reward_columns"
PLACEHOLDER = "..."  # the answer written for a prompt-only row, so the template writes the prompt up to the answer


def conversational(formatting: str) -> bool:
    """TRL's notion: a dataset of messages hands its reward functions messages; a plain one, strings."""
    return formatting in ("sharegpt", "openai")


def prompt_columns(spec) -> set[str]:
    roles = ("prompt", "query", "history", "system", "tools") if spec.formatting == "alpaca" else \
        ("messages", "system", "tools")
    defaults = {"prompt": "instruction", "query": "input",
                "messages": "messages" if spec.formatting == "openai" else "conversations"}
    return {c for c in (spec.column(role, defaults.get(role)) for role in roles) if c}


def convert_prompts(spec) -> Callable[[dict], dict]:
    """A row -> its canonical conversation (a placeholder answer where the row has none) and `reward_columns`."""
    base = formats.FORMATTERS[spec.formatting](spec)
    taken = prompt_columns(spec) | {"_row"}
    if spec.formatting == "alpaca":
        response_col = spec.column("response", "output")
    else:
        openai_style = spec.formatting == "openai"
        role_tag = spec.tags.get("role_tag", "role" if openai_style else "from")
        content_tag = spec.tags.get("content_tag", "content" if openai_style else "value")
        assistant_tag = spec.tags.get("assistant_tag", "assistant" if openai_style else "gpt")
        messages_col = spec.column("messages", "messages" if openai_style else "conversations")

    def with_answer(row: dict) -> dict:
        if spec.formatting == "alpaca":
            answer = row.get(response_col)
            return row if isinstance(answer, str) and answer.strip() else {**row, response_col: PLACEHOLDER}
        turns = row.get(messages_col)
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and \
                turns[-1].get(role_tag) != assistant_tag:
            return {**row, messages_col: turns + [{role_tag: assistant_tag, content_tag: PLACEHOLDER}]}
        return row

    def convert(row: dict) -> dict:
        out = base(with_answer(row))
        if out["_error"]:
            out[COLUMN] = ""
            return out
        if conversational(spec.formatting):
            prompt = ([{"role": "system", "content": out["system"]}] if out["system"] else []) + \
                     [dict(m) for m in out["messages"][:-1]]
        else:  # TRL's plain prompt: the dataset's own text (alpaca: instruction and input, as the user turn holds them)
            prompt = out["messages"][-2]["content"]
        out[COLUMN] = json.dumps({"columns": {k: v for k, v in row.items() if k not in taken}, "prompt": prompt,
                                  "source": f"{spec.name} row {row.get('_row')}"}, ensure_ascii=False, default=str)
        return out

    return convert


def check_prompt_rows(spec, columns: list[str]) -> None:
    if spec.ranking:
        raise ConfigError(f"dataset {spec.name!r} is ranking (pairwise) data; stage grpo samples its own answers to "
                          "prompts (give a dataset of prompts, with or without answers).")
    formats.check_rows(spec, columns, response=False)


def encode_prompts(examples: list[dict], tokenizer, template, data_args) -> list[list[dict]]:
    """Conversations -> each one's prompt (every token before its last answer, as the template writes it), with no
    labels: nothing of a row is trained, the stage trains on the answers it samples."""
    encoded = template.encode_batch(tokenizer, [(e["messages"], e["system"], e.get("tools") or "") for e in examples],
                                    oneturn=True)
    out = []
    for e, (ids, trained) in zip(examples, encoded):
        prompt, _, _ = prompt_and_answer(ids, np.asarray(trained, dtype=bool))
        kept = prompt[-data_args.cutoff_len:]
        out.append([{"input_ids": kept, "labels": [IGNORE_INDEX] * len(kept), "trained": 0,
                     "_truncated": len(kept) < len(prompt), "_no_labels": not kept, COLUMN: e[COLUMN]}])
    return out


DATA_KINDS.register(KIND)(DataKind(KIND, encode_prompts, convert=convert_prompts, columns={COLUMN: ("string", "")},
                                   check=check_prompt_rows))

"""Write tool_formats.json: LLaMA-Factory 0.9.5's own tool-call texts, the goldens for tests/test_tool_formats.py.

Run once, by hand, with a Python that has LLaMA-Factory installed (the tests themselves do not need it):

    python -m venv /work/lfenv && /work/lfenv/bin/pip install llamafactory==0.9.5
    /work/lfenv/bin/python tests/data/lf_goldens/make_tool_goldens.py

Each case records its inputs and LF's output (or the exception LF raised), so the test replays it without LF.
LF's llama3 tool prompt holds today's date; it is frozen here to FROZEN_DATE and the test patches ours to match.
"""

import json
import sys
from datetime import datetime
from pathlib import Path

import llamafactory
from llamafactory.data import tool_utils
from llamafactory.data.formatter import FunctionFormatter, ToolFormatter

FORMATS = ["default", "qwen", "qwen3_5", "llama3", "mistral", "glm4", "glm4_moe", "gemma4",
           "minimax1", "minimax2", "seed_oss", "lfm2"]
FROZEN = datetime(2024, 7, 26, 12, 0, 0)


class _FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return FROZEN


tool_utils.datetime = _FrozenDatetime  # LF's tool_utils did `from datetime import datetime`
FROZEN_DATE = FROZEN.strftime("%d %b %Y")

WEATHER = {
    "name": "get_weather",
    "description": "Météo actuelle d'une ville — 天气",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name, e.g. Zürich"},
            "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
BOOK = {  # OpenAI-style wrapper, nested object and array parameters, a response schema (gemma4 shows it)
    "type": "function",
    "function": {
        "name": "book_trip",
        "description": "Book a trip for travellers",
        "parameters": {
            "type": "object",
            "properties": {
                "travellers": {"type": "array", "description": "Who travels", "items": {"type": "string"}},
                "dates": {
                    "type": "object",
                    "description": "Start and end",
                    "properties": {"start": {"type": "string"}, "end": {"type": "string"}},
                    "required": ["start"],
                },
                "budget": {"type": "number"},
                "refundable": {"type": "boolean", "description": "Refundable fare only"},
            },
            "required": ["travellers", "dates"],
        },
        "response": {"type": "object", "description": "The booking"},
    },
}
PING = {"name": "ping", "description": "Check the line"}  # no parameters at all
FLAT_TYPED = {"type": "function", "name": "ping", "description": "Flat tool marked as a function",
              "parameters": {"type": "object", "properties": {}}}

TOOLS_CASES = {
    "one_tool": [WEATHER],
    "two_tools": [WEATHER, BOOK],
    "empty": [],
    "no_parameters": [PING],
    "flat_typed": [FLAT_TYPED],
}

CALL_WEATHER = ("get_weather", json.dumps({"city": "Zürich", "unit": "celsius"}, ensure_ascii=False))
CALL_BOOK = ("book_trip", json.dumps(
    {"travellers": ["Ana", "Bo"], "dates": {"start": "2024-08-01", "end": None}, "budget": 1200.5,
     "refundable": True, "note": "window \"seat\"\nplease"}, ensure_ascii=False))
CALLS_CASES = {
    "one_call": [CALL_WEATHER],
    "two_calls": [CALL_WEATHER, CALL_BOOK],
}

OBJ = {"name": "get_weather", "arguments": {"city": "巴黎", "unit": "celsius"}}
OBJ2 = {"name": "book_trip", "arguments": {"travellers": ["Ana"], "dates": {"start": "2024-08-01"}, "budget": 3,
                                           "refundable": False}}
THINK = ("<think>\n", "\n</think>\n\n")
TOOL_CALL = ("<tool_call>", "</tool_call>")
LFM2_CALL = ("<|tool_call_start|>", "<|tool_call_end|>")
j = lambda x: json.dumps(x, ensure_ascii=False)  # noqa: E731
MESSAGE_CASES = {
    "object": (j(OBJ), THINK, TOOL_CALL),
    "object_no_words": (j(OBJ), None, None),
    "list": (j([OBJ, OBJ2]), THINK, TOOL_CALL),
    "list_one": (j([OBJ]), THINK, TOOL_CALL),
    "thought": ("<think>\nThe user wants the weather.\n</think>\n\n" + j(OBJ), THINK, TOOL_CALL),
    "text_and_block": ("Let me look that up.\n<tool_call>" + j(OBJ) + "</tool_call>", THINK, TOOL_CALL),
    "text_after_block": ("Checking. <tool_call>\n" + j(OBJ) + "\n</tool_call> Done.", THINK, TOOL_CALL),
    "thought_and_block": ("<think>\nNeed data.\n</think>\n\n<tool_call>\n" + j(OBJ) + "\n</tool_call>",
                          THINK, TOOL_CALL),
    "two_blocks": ("<tool_call>" + j(OBJ) + "</tool_call>\n<tool_call>" + j(OBJ2) + "</tool_call>",
                   THINK, TOOL_CALL),
    "lfm2_words": ("Sure.<|tool_call_start|>" + j([OBJ, OBJ2]) + "<|tool_call_end|>", THINK, LFM2_CALL),
    "string_arguments": (j({"name": "get_weather", "arguments": j(OBJ["arguments"])}), THINK, TOOL_CALL),
    "missing_arguments": (j({"name": "get_weather"}), THINK, TOOL_CALL),
    "bad_json": ('{"name": "get_weather", "arguments": {"city": }', THINK, TOOL_CALL),
}


def _run(fn):
    try:
        return {"expected": fn()}
    except Exception as e:  # LF's own refusal is part of the golden
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> None:
    cases = []
    for fmt in FORMATS:
        utils = tool_utils.get_tool_utils(fmt)
        tool_formatter = ToolFormatter(tool_format=fmt)
        for case, tools in TOOLS_CASES.items():
            result = _run(lambda: tool_formatter.apply(content=json.dumps(tools, ensure_ascii=False))[0])
            cases.append({"format": fmt, "kind": "tools_text", "case": case, "tools": tools, **result})
        for case, calls in CALLS_CASES.items():
            result = _run(lambda: utils.function_formatter([tool_utils.FunctionCall(*c) for c in calls]))
            cases.append({"format": fmt, "kind": "calls_text", "case": case, "calls": calls, **result})
        function_formatter = FunctionFormatter(slots=["{{content}}"], tool_format=fmt)
        for case, (content, thought_words, tool_call_words) in MESSAGE_CASES.items():
            result = _run(lambda: function_formatter.apply(
                content=content, thought_words=thought_words, tool_call_words=tool_call_words)[0])
            cases.append({"format": fmt, "kind": "function_message_text", "case": case, "content": content,
                          "thought_words": thought_words, "tool_call_words": tool_call_words, **result})

    out = {"llamafactory": llamafactory.__version__, "python": sys.version.split()[0], "date": FROZEN_DATE,
           "cases": cases}
    path = Path(__file__).with_name("tool_formats.json")
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()

"""Tool-call formats against LLaMA-Factory 0.9.5's own output (goldens in tests/data/lf_goldens/tool_formats.json,
made by tests/data/lf_goldens/make_tool_goldens.py; LF is not needed here).

Each golden case holds its inputs and LF's text, or the exception LF raised: where LF refused, we must refuse too
(with a ValueError); where it wrote text, we must write the same text exactly."""

import json
import re
from datetime import datetime
from pathlib import Path

import pytest

from trainer.data import tool_formats
from trainer.data.tool_formats import TOOL_FORMATS, ToolFormat, function_message_text, parse_tools

GOLDENS = json.loads((Path(__file__).parent / "data/lf_goldens/tool_formats.json").read_text(encoding="utf-8"))
CASES = GOLDENS["cases"]
LF_FORMATS = ["default", "qwen", "qwen3_5", "llama3", "mistral", "glm4", "glm4_moe", "gemma4",
              "minimax1", "minimax2", "seed_oss", "lfm2"]


@pytest.fixture(autouse=True)
def frozen_today(monkeypatch):
    monkeypatch.setattr(tool_formats, "today", lambda: GOLDENS["date"])


def _words(value):
    return tuple(value) if value is not None else None


def _render(case) -> str:
    fmt = TOOL_FORMATS[case["format"]]
    if case["kind"] == "tools_text":
        return fmt.tools_text(case["tools"])
    if case["kind"] == "calls_text":
        return fmt.calls_text([tuple(c) for c in case["calls"]])
    return function_message_text(fmt, case["content"], _words(case["thought_words"]), _words(case["tool_call_words"]))


def _case_id(case) -> str:
    return f"{case['format']}-{case['kind']}-{case['case']}"


def test_goldens_cover_every_format_and_case():
    assert GOLDENS["llamafactory"] == "0.9.5"
    assert sorted(TOOL_FORMATS) == sorted(LF_FORMATS)
    assert {c["format"] for c in CASES} == set(LF_FORMATS)
    wanted = {("tools_text", "one_tool"), ("tools_text", "two_tools"), ("calls_text", "one_call"),
              ("calls_text", "two_calls"), ("function_message_text", "object"), ("function_message_text", "list"),
              ("function_message_text", "thought"), ("function_message_text", "text_and_block"),
              ("function_message_text", "lfm2_words")}
    for name in LF_FORMATS:
        assert wanted <= {(c["kind"], c["case"]) for c in CASES if c["format"] == name}
    # the inputs the brief asks for are really in the goldens: nesting, non-ASCII, a required list, thoughts
    two_tools = next(c["tools"] for c in CASES if c["case"] == "two_tools")
    assert any("required" in json.dumps(t) and "天气" in json.dumps(t, ensure_ascii=False) for t in two_tools)
    thought = next(c for c in CASES if c["case"] == "thought")
    assert thought["content"].startswith("<think>\n") and thought["thought_words"] == ["<think>\n", "\n</think>\n\n"]


@pytest.mark.parametrize("case", [c for c in CASES if "expected" in c], ids=_case_id)
def test_same_text_as_llamafactory(case):
    assert _render(case) == case["expected"]


@pytest.mark.parametrize("case", [c for c in CASES if "error" in c], ids=_case_id)
def test_refused_where_llamafactory_refuses(case):
    with pytest.raises(ValueError) as info:
        _render(case)
    if "GLM-4 does not support parallel functions" in case["error"]:
        assert "GLM-4 does not support parallel functions" in str(info.value)


def test_bad_json_in_function_message_names_the_content():
    content = '{"name": "get_weather", "arguments": {"city": }'
    for fmt in TOOL_FORMATS.values():
        with pytest.raises(ValueError, match="invalid JSON format in function message") as info:
            function_message_text(fmt, content, ("<think>\n", "\n</think>\n\n"), ("<tool_call>", "</tool_call>"))
        assert repr(content) in str(info.value)
    long = "not json " * 100
    with pytest.raises(ValueError) as info:
        function_message_text(TOOL_FORMATS["qwen"], long, None, None)
    assert "not json not json" in str(info.value) and len(str(info.value)) < 400  # quoted, but kept short


def test_parse_tools():
    tools = [{"name": "f", "description": "ü", "parameters": {"type": "object", "properties": {}}}]
    assert parse_tools(json.dumps(tools), "row 3") == tools
    assert parse_tools("", "row 3") == [] and parse_tools("[]", "row 3") == []
    with pytest.raises(ValueError, match=r"row 7: invalid JSON format in tool description .*'\[\{\"name\": '"):
        parse_tools('[{"name": ', "row 7")
    with pytest.raises(ValueError, match="row 8: the tool description must be a JSON list"):
        parse_tools('{"name": "f"}', "row 8")


def test_tools_text_empty_is_empty_for_every_format():
    for fmt in TOOL_FORMATS.values():
        assert isinstance(fmt, ToolFormat) and fmt.tools_text([]) == ""


def test_today_is_llamafactorys_date_and_llama3_reads_it(monkeypatch):
    monkeypatch.undo()  # the real today()
    assert tool_formats.today() == datetime.now().strftime("%d %b %Y")
    assert re.fullmatch(r"\d\d \w+ \d{4}", tool_formats.today())
    monkeypatch.setattr(tool_formats, "today", lambda: "01 Jan 2030")
    tool = {"name": "f", "parameters": {"type": "object", "properties": {}}}
    assert "Today Date: 01 Jan 2030\n" in TOOL_FORMATS["llama3"].tools_text([tool])


def test_braces_in_tool_text_are_not_placeholders():
    tool = {"name": "f", "description": "uses {tool_text} and {date} literally",
            "parameters": {"type": "object", "properties": {}}}
    for name in ("default", "qwen", "llama3", "glm4", "minimax1"):
        assert "uses {tool_text} and {date} literally" in TOOL_FORMATS[name].tools_text([tool])

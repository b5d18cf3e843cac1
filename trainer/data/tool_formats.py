"""Tool-call formats: how a tool list and a model's tool calls are written into the prompt text.

A model fine-tuned on tool use learns one exact text layout: how the available tools are described in the
system turn, and how its own calls look. LLaMA-Factory (0.9.5) defines one layout per model family under a
short name (its `tool_format`); these are those layouts, written for zerotune so that a dataset trained here
renders character for character as it does there. The prompt strings below are data the models were trained
on and are reproduced verbatim, odd spacing and all; the goldens in tests/data/lf_goldens/tool_formats.json
were produced by LLaMA-Factory itself.

Three entry points, used by the chat templates:

- ``TOOL_FORMATS[name].tools_text(tools)``: the tool list as it goes into the system turn ([] -> "").
- ``TOOL_FORMATS[name].calls_text(calls)``: (name, JSON arguments) pairs -> the assistant's call text.
- ``function_message_text(fmt, content, thought_words, tool_call_words)``: a dataset's function_call message
  (JSON, maybe with a thought block or text around a tool-call block) -> the text that replaces its content.

Where LLaMA-Factory fails on malformed input (a missing key, arguments that are not an object) we raise a
ValueError that says what is wrong instead; on every input LLaMA-Factory accepts, we write what it writes.

The llama3 format names today's date ("Today Date: 26 Jul 2024"), as LLaMA-Factory does with
``datetime.now().strftime("%d %b %Y")`` (the month name follows the process locale). It is read through the
module-level ``today()`` so tests can monkeypatch it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable


def today() -> str:
    """The date in the llama3 tool prompt: day, abbreviated month, year ("26 Jul 2024"), local time."""
    return datetime.now().strftime("%d %b %Y")


# --- the prompts (data: the exact text each model family was trained with) ---------------------------------
# Placeholders {tool_text}, {tool_names} and {date} are filled in one pass by _fill; other braces are literal.

DEFAULT_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n'
    "```\n"
)

GLM4_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)
GLM4_TOOL_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"

GLM4_MOE_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, output the function name and arguments within the following XML format:"
    "\n<tool_call>{function-name}"
    "\n<arg_key>{arg-key-1}</arg_key>"
    "\n<arg_value>{arg-value-1}</arg_value>"
    "\n<arg_key>{arg-key-2}</arg_key>"
    "\n<arg_value>{arg-value-2}</arg_value>"
    "\n...\n</tool_call>\n"
)

LLAMA3_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
    "Do not use variables.\n\n{tool_text}"
)

MINIMAX1_PROMPT = (
    "You are provided with these tools:\n<tools>\n{tool_text}</tools>\n\n"
    "If you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide tool-name and "
    "json-object of arguments, following the format below:\n<tool_calls>\n"
    '{"name": <tool-name-1>, "arguments": <args-json-object-1>}\n...\n</tool_calls>'
)

MINIMAX2_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more tools to assist with the user query.\n"
    "Here are the tools available in JSONSchema format:\n\n<tools>\n{tool_text}</tools>\n\n"
    "When making tool calls, use XML format to invoke tools and pass parameters:\n"
    '\n<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n'
    '<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>'
)

QWEN_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)

QWEN3_5_PROMPT = (
    "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>{tool_text}"
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: "
    "an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language "
    "BEFORE the function call, but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>"
)

SEED_PROMPT = (  # sic: the leading "system\n" and "user query.Tool List" are as LLaMA-Factory writes them
    "system\nYou are Doubao, a helpful AI assistant. You may call one or more functions to assist with the user query."
    "Tool List:\nYou are authorized to use the following tools (described in JSON Schema format). Before performing "
    "any task, you must decide how to call them based on the descriptions and parameters of these tools.{tool_text}\n"
    "工具调用请遵循如下格式:\n<seed:tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>value_1"
    "</parameter>\n<parameter=example_parameter_2>This is the value for the second parameter\nthat can span\nmultiple "
    "lines</parameter>\n</function>\n</seed:tool_call>\n"
)

LFM2_PROMPT = "List of tools: <|tool_list_start|>{tool_text}<|tool_list_end|>"

_PLACEHOLDER = re.compile(r"\{(tool_text|tool_names|date)\}")


def _fill(prompt: str, **values: str) -> str:
    """Fill the placeholders in one pass, so braces in tool descriptions are never read as placeholders."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], prompt)


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


# --- tools: the shapes a tool may come in ------------------------------------------------------------------
# A tool is either the function itself ({"name", "description", "parameters"}) or OpenAI's wrapper
# {"type": "function", "function": {...}}. Each format wants one of the two shapes.


def _wrapped(tool: dict) -> dict:
    """The OpenAI wrapper shape (qwen, llama3, mistral, glm4_moe)."""
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _unwrapped(tool: dict) -> dict:
    """The bare function (gemma4, qwen3_5, lfm2); a {"type": "function"} tool with no "function" stays as is."""
    return tool.get("function", tool) if tool.get("type") == "function" else tool


def _unwrapped_or_empty(tool: dict) -> Any:
    """The bare function (default, glm4, minimax1, minimax2). A {"type": "function"} tool with no "function"
    becomes "" here, as in LLaMA-Factory: minimax writes it as the JSON string "", default and glm4 refuse it."""
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _function(tool: dict, fmt: str, shape: Callable[[dict], Any] = _unwrapped_or_empty) -> dict:
    """The bare function for a format that reads its fields; refuses a tool it cannot read."""
    function = shape(tool)
    if not isinstance(function, dict) or "name" not in function:
        raise ValueError(f"the {fmt} tool format needs each tool to be a function with a name, got {_short(tool)}")
    return function


def _default_param_line(name: str, param: dict, required: list) -> str:
    """  - city (string, required): City name, should be one of [a, b], where each item should be string"""
    line = f"  - {name} ({param.get('type', '')}{', required' if name in required else ''}): "
    line += str(param.get("description", ""))
    if param.get("enum"):
        line += f", should be one of [{', '.join(map(str, param['enum']))}]"
    if param.get("items"):
        line += f", where each item should be {param['items'].get('type', '')}"
    return line + "\n"


def _default_tools(tools: list[dict]) -> str:
    blocks, names = [], []
    for tool in tools:
        function = _function(tool, "default")
        params = function.get("parameters")
        if not isinstance(params, dict) or not isinstance(params.get("properties"), dict):
            raise ValueError(f"the default tool format needs parameters.properties in tool {function['name']!r}")
        required = params.get("required", [])
        args = "".join(_default_param_line(n, p, required) for n, p in params["properties"].items())
        blocks.append(f"> Tool Name: {function['name']}\nTool Description: {function.get('description', '')}\n"
                      f"Tool Args:\n{args}\n")
        names.append(str(function["name"]))
    return _fill(DEFAULT_PROMPT, tool_text="".join(blocks), tool_names=", ".join(names))


def _glm4_tools(tools: list[dict]) -> str:
    text = ""
    for tool in tools:
        function = _function(tool, "glm4")
        text += f"\n\n## {function['name']}\n\n{_dumps(function, indent=4)}{GLM4_TOOL_SUFFIX}"
    return _fill(GLM4_PROMPT, tool_text=text)


def _llama3_tools(tools: list[dict]) -> str:
    text = "".join(_dumps(_wrapped(t), indent=4) + "\n\n" for t in tools)
    return _fill(LLAMA3_PROMPT, date=today(), tool_text=text)


def _lines_tools(prompt: str, shape: Callable[[dict], Any]) -> Callable[[list[dict]], str]:
    """Formats that list each tool's JSON on its own line after a newline (qwen, qwen3_5, glm4_moe)."""
    return lambda tools: _fill(prompt, tool_text="".join("\n" + _dumps(shape(t)) for t in tools))


def _minimax1_tools(tools: list[dict]) -> str:
    return _fill(MINIMAX1_PROMPT, tool_text="".join(_dumps(_unwrapped_or_empty(t)) + "\n" for t in tools))


def _minimax2_tools(tools: list[dict]) -> str:
    text = "".join(f"<tool>{_dumps(_unwrapped_or_empty(t))}</tool>\n" for t in tools)
    return _fill(MINIMAX2_PROMPT, tool_text=text)


def _mistral_tools(tools: list[dict]) -> str:
    return "[AVAILABLE_TOOLS] " + _dumps([_wrapped(t) for t in tools]) + "[/AVAILABLE_TOOLS]"


def _seed_tools(tools: list[dict]) -> str:
    return _fill(SEED_PROMPT, tool_text="\n" + _dumps(tools))  # the list exactly as given, shapes mixed


def _lfm2_tools(tools: list[dict]) -> str:
    return _fill(LFM2_PROMPT, tool_text=_dumps([_unwrapped(t) for t in tools]))


def _gemma4_quoted(text: Any) -> str:
    return f'<|"|>{text}<|"|>'


def _gemma4_tools(tools: list[dict]) -> str:
    """declaration:name{description:<|"|>...<|"|>,parameters:{properties:{...},required:[...],type:<|"|>OBJECT<|"|>}}
    one line per tool; each property shows only its description and upper-cased type."""
    lines = []
    for tool in tools:
        function = _function(tool, "gemma4", _unwrapped)
        line = f"declaration:{function['name']}{{description:{_gemma4_quoted(function.get('description', ''))}"
        params = function.get("parameters")
        if params:
            parts = []
            if params.get("properties"):
                parts.append(f"properties:{{{_gemma4_properties(params['properties'])}}}")
            if params.get("required"):
                parts.append(f"required:[{','.join(_gemma4_quoted(r) for r in params['required'])}]")
            if params.get("type"):
                parts.append(f"type:{_gemma4_quoted(str(params['type']).upper())}")
            line += f",parameters:{{{','.join(parts)}}}"
        response = function.get("response")
        if response:
            parts = []
            if response.get("description"):
                parts.append(f"description:{_gemma4_quoted(response['description'])}")
            if str(response.get("type", "")).upper() == "OBJECT":  # other response types are left out
                parts.append(f"type:{_gemma4_quoted('OBJECT')}")
            line += f",response:{{{','.join(parts)}}}"
        lines.append(line + "}")
    return "\n".join(lines)


def _gemma4_properties(properties: dict) -> str:
    items = []
    for name, schema in properties.items():
        parts = []
        if schema.get("description"):
            parts.append(f"description:{_gemma4_quoted(schema['description'])}")
        if schema.get("type"):
            parts.append(f"type:{_gemma4_quoted(str(schema['type']).upper())}")
        items.append(f"{name}:{{{','.join(parts)}}}")
    return ",".join(items)


# --- calls: (name, arguments as a JSON string) -> the assistant's text ------------------------------------


def _arguments(name: str, arguments: str, fmt: str) -> dict:
    """The arguments as an object, for formats that write one line or tag per argument."""
    value = json.loads(arguments)
    if not isinstance(value, dict):
        raise ValueError(f"the {fmt} tool format needs the arguments of {name!r} to be a JSON object, "
                         f"got {_short(arguments)}")
    return value


def _value_text(value: Any) -> str:
    """An argument value in the XML-ish formats: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else _dumps(value)


def _default_calls(calls: list[tuple[str, str]]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)


def _glm4_calls(calls: list[tuple[str, str]]) -> str:
    if len(calls) != 1:
        raise ValueError("GLM-4 does not support parallel functions." if calls else "GLM-4 needs one function call.")
    name, arguments = calls[0]
    return f"{name}\n{arguments}"


def _llama3_calls(calls: list[tuple[str, str]]) -> str:
    objects = [{"name": name, "parameters": json.loads(arguments)} for name, arguments in calls]
    return _dumps(objects[0] if len(objects) == 1 else objects)


def _mistral_calls(calls: list[tuple[str, str]]) -> str:
    return _dumps([{"name": name, "arguments": json.loads(arguments)} for name, arguments in calls])


def _qwen_calls(calls: list[tuple[str, str]]) -> str:
    return "\n".join(f"<tool_call>\n{_dumps({'name': n, 'arguments': json.loads(a)})}\n</tool_call>" for n, a in calls)


def _qwen3_5_calls(calls: list[tuple[str, str]]) -> str:
    texts = []
    for name, arguments in calls:
        params = "".join(f"\n<parameter={k}>\n{_value_text(v)}\n</parameter>"
                         for k, v in _arguments(name, arguments, "qwen3_5").items())
        texts.append(f"<tool_call>\n<function={name}>{params}\n</function>\n</tool_call>")
    return "\n".join(texts)


def _glm4_moe_calls(calls: list[tuple[str, str]]) -> str:
    """Each call starts with a newline and has no closing </tool_call> (as in LLaMA-Factory)."""
    texts = []
    for name, arguments in calls:
        pairs = "".join(f"\n<arg_key>{k}</arg_key>\n<arg_value>{_value_text(v)}</arg_value>"
                        for k, v in _arguments(name, arguments, "glm4_moe").items())
        texts.append(f"\n<tool_call>{name}{pairs}")
    return "\n".join(texts)


def _minimax1_calls(calls: list[tuple[str, str]]) -> str:
    lines = [_dumps({"name": name, "arguments": json.loads(arguments)}) for name, arguments in calls]
    return "<tool_calls>\n" + "\n".join(lines) + "\n</tool_calls>"


def _minimax2_calls(calls: list[tuple[str, str]]) -> str:
    """<invoke> blocks only; the <minimax:tool_call> wrapper the prompt shows is not written (as in LLaMA-Factory)."""
    texts = []
    for name, arguments in calls:
        params = "".join(f'\n<parameter name="{k}">{_value_text(v)}</parameter>'
                         for k, v in _arguments(name, arguments, "minimax2").items())
        texts.append(f'<invoke name="{name}">{params}\n</invoke>')
    return "\n".join(texts)


def _seed_calls(calls: list[tuple[str, str]]) -> str:
    """Note "<function=NAME" has no closing ">" (as in LLaMA-Factory, unlike its own prompt's example)."""
    texts = []
    for name, arguments in calls:
        params = "".join(f"\n<parameter={k}>{_value_text(v)}</parameter>"
                         for k, v in _arguments(name, arguments, "seed_oss").items())
        texts.append(f"\n<seed:tool_call>\n<function={name}{params}\n</function>\n</seed:tool_call>")
    return "\n".join(texts)


def _lfm2_calls(calls: list[tuple[str, str]]) -> str:
    """Python call syntax: name(key="text", other=<JSON>); strings go between quotes unescaped."""
    texts = []
    for name, arguments in calls:
        kwargs = [f'{k}="{v}"' if isinstance(v, str) else f"{k}={_dumps(v)}"
                  for k, v in _arguments(name, arguments, "lfm2").items()]
        texts.append(f"{name}({', '.join(kwargs)})")
    return f"<|tool_call_start|>[{', '.join(texts)}]<|tool_call_end|>"


def _gemma4_value(value: Any) -> str:
    """Gemma-4's argument syntax: strings quoted with <|"|>, objects with sorted bare keys, JSON literals."""
    if isinstance(value, str):
        return _gemma4_quoted(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_gemma4_value(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_gemma4_value(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value)


def _gemma4_calls(calls: list[tuple[str, str]]) -> str:
    """<|tool_call>call:name{key:value,...}<tool_call|> per call, no separator. Arguments that are not JSON go in
    as they are; a JSON string goes in unquoted."""
    texts = []
    for name, arguments in calls:
        try:
            value = json.loads(arguments)
        except (TypeError, json.JSONDecodeError):
            value = arguments
        if isinstance(value, dict):
            body = _gemma4_value(value)[1:-1]
        elif isinstance(value, str):
            body = value
        else:
            body = _gemma4_value(value)
        texts.append(f"<|tool_call>call:{name}{{{body}}}<tool_call|>")
    return "".join(texts)


# --- the registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolFormat:
    """One tool-call layout, by its LLaMA-Factory name."""

    name: str
    render_tools: Callable[[list[dict]], str] = field(repr=False, compare=False)
    render_calls: Callable[[list[tuple[str, str]]], str] = field(repr=False, compare=False)

    def tools_text(self, tools: list[dict]) -> str:
        """The tool list as it goes into the system turn; no tools, no text."""
        return self.render_tools(list(tools)) if tools else ""

    def calls_text(self, calls: list[tuple[str, str]]) -> str:
        """(name, arguments as a JSON string) pairs -> the assistant's call text."""
        return self.render_calls([(name, arguments) for name, arguments in calls])


TOOL_FORMATS: dict[str, ToolFormat] = {
    f.name: f
    for f in (
        ToolFormat("default", _default_tools, _default_calls),  # also the gpt_oss templates
        ToolFormat("qwen", _lines_tools(QWEN_PROMPT, _wrapped), _qwen_calls),
        ToolFormat("qwen3_5", _lines_tools(QWEN3_5_PROMPT, _unwrapped), _qwen3_5_calls),
        ToolFormat("llama3", _llama3_tools, _llama3_calls),
        ToolFormat("mistral", _mistral_tools, _mistral_calls),
        ToolFormat("glm4", _glm4_tools, _glm4_calls),
        ToolFormat("glm4_moe", _lines_tools(GLM4_MOE_PROMPT, _wrapped), _glm4_moe_calls),
        ToolFormat("gemma4", _gemma4_tools, _gemma4_calls),
        ToolFormat("minimax1", _minimax1_tools, _minimax1_calls),
        ToolFormat("minimax2", _minimax2_tools, _minimax2_calls),
        ToolFormat("seed_oss", _seed_tools, _seed_calls),
        ToolFormat("lfm2", _lfm2_tools, _lfm2_calls),
    )
}


# --- dataset text -> the above -----------------------------------------------------------------------------


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else _dumps(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_tools(text: str, where: str) -> list[dict]:
    """The `tools` column's JSON text -> the list of tools ("" -> []). `where` names the row in errors."""
    if not text:
        return []
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON format in tool description ({e.msg} at char {e.pos}): "
                         f"{_short(text)}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"{where}: the tool description must be a JSON list of tool objects, got {_short(text)}")
    return tools


def _parse_calls(json_text: str, content: str) -> list[tuple[str, str]]:
    """One call object or a list of them, each {"name", "arguments"} -> (name, arguments re-dumped as JSON)."""
    try:
        calls = json.loads(json_text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON format in function message ({e.msg}): {_short(content)}") from None
    if not isinstance(calls, list):
        calls = [calls]
    if not all(isinstance(c, dict) and "name" in c and "arguments" in c for c in calls):
        raise ValueError(f'each call in a function message needs "name" and "arguments": {_short(content)}')
    return [(c["name"], _dumps(c["arguments"])) for c in calls]


def _first_block(content: str, words: tuple[str, str] | None) -> re.Match | None:
    """The first (shortest) span words[0] ... words[1] in content, or None."""
    if not words or len(words) != 2:
        return None
    return re.search(f"{re.escape(words[0])}(.*?){re.escape(words[1])}", content, re.DOTALL)


def function_message_text(fmt: ToolFormat, content: str, thought_words: tuple[str, str] | None,
                          tool_call_words: tuple[str, str] | None) -> str:
    """A function_call message's content -> the text the template puts in its place (LLaMA-Factory's
    FunctionFormatter). Two cases, as there:

    - a tool_call_words block is found: only the JSON inside the first block is parsed; everything else in the
      message (text before or after, further blocks, verbatim) is put in front of the formatted calls;
    - otherwise the message is JSON, possibly with a thought block (thought_words) in it: the block is taken out,
      the rest parsed, and the block put back in front of the formatted calls.

    Bad JSON, or a call without name/arguments: ValueError quoting the content.
    """
    block = _first_block(content, tool_call_words)
    if block is not None:
        prefix = content.replace(block.group(0), "")
        calls = _parse_calls(block.group(1), content)
    else:
        thought = _first_block(content, thought_words)
        prefix = thought.group(0) if thought else ""
        calls = _parse_calls(content.replace(prefix, "") if thought else content, content)
    try:
        return prefix + fmt.calls_text(calls)
    except ValueError as e:
        raise ValueError(f"{e} (function message: {_short(content)})") from None

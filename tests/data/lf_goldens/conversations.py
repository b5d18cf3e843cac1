"""The fixed conversations of the template goldens (read by make_template_goldens.py and the tests)."""

import json

TOOLS = json.dumps([
    {"name": "get_weather", "description": "Weather of a city — current conditions",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                     "unit": {"type": "string", "enum": ["c", "f"]}},
                    "required": ["city"]}},
    {"name": "add", "description": "Add two numbers",
     "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                    "required": ["a", "b"]}},
], ensure_ascii=False)


def _turns(*pairs):
    out = []
    for role, content in pairs:
        out.append({"role": role, "content": content})
    return out


CONVERSATIONS = {
    "single": dict(system="", tools="", messages=_turns(("user", "Hello there"), ("assistant", "Hi! How are you?"))),
    "system": dict(system="Be brief.", tools="",
                   messages=_turns(("user", "Name a colour."), ("assistant", "Blue."))),
    "multi": dict(system="You answer in one line.\nAlways.", tools="", messages=_turns(
        ("user", "First {content} 'quoted' \\ back"), ("assistant", "One."),
        ("user", "Second\nline"), ("assistant", "Two, then."), ("user", "Third?"), ("assistant", "Three."))),
    "tools": dict(system="You can call tools.", tools=TOOLS, messages=_turns(
        ("user", "Weather in Paris, and 2+3?"),
        ("function", json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                 {"name": "add", "arguments": {"a": 2, "b": 3}}])),
        ("observation", '{"temp": 21, "sky": "clear"}\n5'),
        ("assistant", "It is 21 and clear in Paris; 2+3 is 5."))),
    "tool_one": dict(system="", tools=TOOLS, messages=_turns(
        ("user", "Add 1 and 2"), ("function", json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}})),
        ("observation", "3"), ("assistant", "It is 3."))),
    "thinking": dict(system="", tools="", messages=_turns(
        ("user", "What is 2+2?"), ("assistant", "<think>\nTwo and two make four.\n</think>\n\n4."),
        ("user", "And 3+3?"), ("assistant", "<think>\nThree and three.\n</think>\n\n6."))),
    "thinking_history": dict(system="Think first.", tools="", messages=_turns(
        ("user", "What is 2+2?"), ("assistant", "<think>\nTwo and two make four.\n</think>\n\n4."),
        ("user", "And without thinking?"), ("assistant", "6."))),
}

PAIRS = {
    "pair": dict(system="Be kind.", prompt=_turns(("user", "Say hi")),
                 answers=_turns(("assistant", "Hi there!"), ("assistant", "Go away."))),
    "pair_multi": dict(system="", prompt=_turns(("user", "2+2?"), ("assistant", "<think>\nsum\n</think>\n\n4"),
                                               ("user", "3+3?")),
                       answers=_turns(("assistant", "<think>\ndouble\n</think>\n\n6"), ("assistant", "7"))),
}

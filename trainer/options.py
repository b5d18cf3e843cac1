"""Option types: how a YAML or command-line value becomes the declared type of its key, and the small helpers every
group's options share (did-you-mean, reading a YAML file, a key=value override). The floor every other module stands
on: it imports nothing of zerotune but its errors."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import ConfigError

TRUE = {"true", "yes", "on", "1"}
FALSE = {"false", "no", "off", "0"}


def _describe(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(key: str, value: Any, tp: Any, choices: tuple | None = None) -> Any:
    """Coerce a YAML or command-line value to the field's type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() == "null" and type(None) in args):
            if type(None) in args:
                return None
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:  # e.g. SchedulerType | str: the string must still be one of the enum's values
            return coerce(key, value, enums[0], choices)
        errors = []
        # Try the most specific types first so "5" becomes 5 for int|str, not "5".
        order = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
        for arg in order:
            try:
                return coerce(key, value, arg, choices)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a valid {_describe(tp)} ({'; '.join(errors)})")
    if tp is Any or tp is object:
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        item_tp = (typing.get_args(tp) or (Any,))[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(key, v, item_tp) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not a mapping (dict expected)")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        raw = value.value if isinstance(value, enum.Enum) else value
        if isinstance(raw, bool) and {"no", "yes"} & set(allowed):
            raw = "yes" if raw else "no"  # YAML 1.1 reads a bare `no` as false
        if isinstance(raw, str):
            raw = raw.strip()
        if raw not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
        return raw
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
            return value.strip().lower() in TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: {value!r} is not a boolean (use true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a number (float expected, e.g. 1.0e-4)")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: {value!r} is not a string")
        value = str(value)
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(choices)}")
        return value
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML so lists and numbers keep their type."""
    if "=" not in item:
        raise ConfigError(f"Override {item!r} must look like key=value (e.g. learning_rate=1e-5).")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value pairs.")
    return data


def fields_of(cls) -> dict[str, tuple[Any, dataclasses.Field]]:
    """A dataclass's init fields: name -> (resolved type, field)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints.get(f.name, Any), f) for f in dataclasses.fields(cls) if f.init}


def coerce_field(key: str, value: Any, tp: Any, f: dataclasses.Field) -> Any:
    return coerce(key, value, tp, f.metadata.get("choices"))


def did_you_mean(name: str, valid, n: int = 3) -> str:
    """' Did you mean: a, b?' for the closest valid names, or ''."""
    close = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def split_list(value: str | list | None) -> list[str]:
    """A comma list as LLaMA-Factory writes them (`adapter_name_or_path: a,b`, `dataset: x, y`), or a YAML list."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in items if str(v).strip()]

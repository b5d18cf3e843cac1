"""Registries of plugins (stages, data kinds): plain dicts filled by a decorator, so a reader finds every option in
one place, and a lookup of an unknown name fails naming the key, the closest names and every known one."""

from __future__ import annotations

from typing import Callable, TypeVar

from trainer.errors import ConfigError
from trainer.options import did_you_mean

T = TypeVar("T")


class Registry(dict):
    def __init__(self, key: str, known: str, hints: dict[str, str] | None = None):
        """key: the YAML key that names an entry ("stage"); known: how the error introduces the known names
        ("This version trains"); hints: a sentence for names that are not entries but that users write."""
        super().__init__()
        self.key, self.known, self.hints = key, known, dict(hints or {})

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self:
                raise ValueError(f"{self.key} {name!r} is registered twice")
            self[name] = entry
            return entry

        return add

    def lookup(self, name: str):
        if name in self:
            return self[name]
        hint = f" {self.hints[name]}" if name in self.hints else did_you_mean(name, sorted(self))
        raise ConfigError(f"{self.key}: {name!r} is not a {self.key}.{hint} {self.known}: {', '.join(sorted(self))}.")

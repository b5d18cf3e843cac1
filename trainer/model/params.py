"""The one parameter count: whole sizes, also of parameters that ZeRO-3 has partitioned (they hold none locally, and
ds_numel keeps their full size)."""

from __future__ import annotations

from typing import Iterable


def numel(p) -> int:
    return getattr(p, "ds_numel", None) or p.numel()


def parameter_count(params: Iterable) -> int:
    return sum(numel(p) for p in params)


def human_count(n: int) -> str:
    """134.5M, 7.2B, 44.3K: a count at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)

"""The one parameter count: whole sizes, also of parameters that ZeRO-3 has partitioned (they hold none locally, and
ds_numel keeps their full size)."""

from __future__ import annotations

from typing import Iterable


def numel(p) -> int:
    return getattr(p, "ds_numel", None) or p.numel()


def parameter_count(params: Iterable) -> int:
    return sum(numel(p) for p in params)

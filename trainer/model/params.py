"""The one parameter count: whole sizes, also of parameters that ZeRO-3 has partitioned (they hold none locally, and
ds_numel keeps their full size) or that bitsandbytes has packed into 4 bits (their quant_state keeps the weight's
shape), and the bytes a parameter really takes."""

from __future__ import annotations

from typing import Iterable


QUANTIZED_PARAMETERS = ("Params4bit", "Int8Params")  # bitsandbytes' packed 4-bit and int8 weights


def is_quantized(p) -> bool:
    """A bitsandbytes weight: its storage dtype is no activation dtype (a 4-bit weight may be stored packed in bf16)."""
    return type(p).__name__ in QUANTIZED_PARAMETERS


def numel(p) -> int:
    """How many weights the parameter stands for. A bitsandbytes 4-bit weight is stored packed, two to a byte in
    a buffer of the quant storage dtype ([n / 2] uint8, [n / 4] bf16), so its own numel() is not the count."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None:
        return int(shape.numel())
    return getattr(p, "ds_numel", None) or p.numel()


def _state_bytes(state) -> int:
    """The bytes of a 4-bit weight's quantization constants: its per-block absmax (uint8 under double quantization,
    then with the absmax of those blocks and their code) and its code table."""
    if state is None:
        return 0
    tensors = [getattr(state, "absmax", None), getattr(state, "code", None), getattr(state, "offset", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [getattr(nested, "absmax", None), getattr(nested, "code", None)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None and hasattr(t, "element_size"))


def stored_bytes(p) -> int:
    """The bytes the parameter takes in memory, whole (not one ZeRO-3 partition): its storage, plus a 4-bit weight's
    quantization constants or an 8-bit weight's per-row scales (SCB)."""
    stored = (getattr(p, "ds_numel", None) or p.numel()) * p.element_size()
    scales = getattr(p, "SCB", None)
    extra = scales.numel() * scales.element_size() if scales is not None else 0
    return stored + extra + _state_bytes(getattr(p, "quant_state", None))


def parameter_count(params: Iterable) -> int:
    return sum(numel(p) for p in params)


def human_count(n: int) -> str:
    """134.5M, 7.2B, 44.3K: a count at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)

"""What this machine computes in: the one map from the run's precision keys to a torch dtype, and whether a CPU has
native bf16."""

from __future__ import annotations

from pathlib import Path


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 (AVX512-BF16 or AMX): there autocast is faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def half_dtype(training_args):
    """The 16-bit dtype the run computes in (bf16, or fp16), or None for fp32."""
    import torch

    if getattr(training_args, "bf16", False):
        return torch.bfloat16
    if getattr(training_args, "fp16", False):
        return torch.float16
    return None

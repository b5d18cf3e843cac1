"""Keep freed host memory for reuse when training on the CPU (glibc's malloc, Linux).

A training step allocates and frees the same large activation and gradient buffers every step. glibc serves
blocks above its mmap threshold (at most 32 MiB by default) with fresh mmap()s and returns freed heap tops
above its trim threshold to the kernel, so every step pays page faults and the kernel's zeroing of those
pages again: on a 2-core AVX512-BF16 EPYC a LoRA sft step of SmolLM2-135M ran 19% faster and a full
fine-tune 12% faster with both thresholds at 1 GiB, for 0.1 GB more peak RSS; with trimming off the profiled
LoRA step lost another 8% of its op time (benchmarks/RESULTS.md, "Throughput round 2"). PyTorch's CPU tuning
guides reach the same end by preloading jemalloc or tcmalloc; this needs no preload. GPUs are untouched (CUDA's
caching allocator already reuses memory), and a user who chose an allocator (LD_PRELOAD) or glibc's own settings
(MALLOC_*_ environment variables, GLIBC_TUNABLES) keeps the choice.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_ABOVE = 1 << 30  # blocks up to 1 GiB come from the heap
NEVER_TRIM = -1  # mallopt(3): -1 turns trimming off (a 1 GiB threshold still trimmed the heap after each step)


def user_chose() -> str | None:
    """The user's own allocator or glibc setting, if any (then nothing here changes)."""
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    chosen = [k for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ]
    if "GLIBC_TUNABLES" in os.environ and "glibc.malloc" in os.environ["GLIBC_TUNABLES"]:
        chosen.append("GLIBC_TUNABLES")
    return ", ".join(chosen) or None


def keep_freed_memory(on_cpu: bool, quantized: bool = False) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True where they were raised."""
    if not on_cpu or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if quantized:
        # A quantized base is a choice of memory over speed: kept blocks of its per-layer dequantized weights cost
        # ~1.1 GB for ~5% speed on a 1.5B QLoRA (benchmarks/RESULTS.md, "QLoRA memory").
        logger.info("CPU training on a quantized base: the host allocator keeps glibc's defaults (freed memory is "
                    "returned; keeping it would be ~5%% faster for ~1 GB more on a 1.5B model).")
        return False
    chosen = user_chose()
    if chosen:
        logger.info("Host allocator left as set (%s).", chosen)
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        raised = libc.mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    except (OSError, AttributeError):
        raised = False
    if raised:
        logger.info("CPU training: freed host memory is kept for the next step (glibc: heap blocks up to 1 GiB, "
                    "no trim).")
    return raised

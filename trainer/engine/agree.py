"""Decisions every process must take alike.

Automatic choices read the local machine (free memory, installed kernels, the device). Processes that
choose differently deadlock or diverge: under ZeRO-3 and FSDP the recompute of a checkpointed layer
gathers its weights again, so one process checkpointing while another does not leaves the two waiting on
different collectives. So a number is agreed as the most cautious value over all processes, and a
choice must be the same everywhere or the run stops saying which process differs.
"""

from __future__ import annotations

import torch

from trainer.errors import ConfigError


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agreed_min(value: float) -> float:
    """The smallest of every process's value (one process: the value itself)."""
    if _group_size() == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def agreed_choice(name: str, value):
    """value, after checking that every process chose the same; a clear error naming the processes otherwise."""
    if _group_size() == 1:
        return value
    import torch.distributed as dist

    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        seen = ", ".join(f"process {i}: {v!r}" for i, v in enumerate(values))
        raise ConfigError(f"The processes chose differently for {name} ({seen}). Set it explicitly in the YAML, or "
                          "give every node the same software and devices.")
    return value

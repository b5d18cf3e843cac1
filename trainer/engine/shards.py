"""A pass over a dataset split across the processes, outside the training loop (reference log-probs, predict).

Under ZeRO-3 and FSDP every forward gathers weights collectively, so every process must run the same number of
forwards: the chunks are dealt round-robin and a process with fewer runs its last chunk again, its repeated
results thrown away. Each process returns {index: result} for its own chunks; `gathered` unites them everywhere.
"""

from __future__ import annotations

import math
from typing import Iterator


def my_rounds(total: int, size: int, world: int, rank: int) -> Iterator[tuple[list[int], bool]]:
    """(indices of one chunk, whether its results count) for each round of this process."""
    chunks = [list(range(s, min(s + size, total))) for s in range(0, total, size)]
    if not chunks:
        return
    mine = chunks[rank::world]
    for r in range(math.ceil(len(chunks) / world)):
        yield (mine[r], True) if r < len(mine) else (chunks[-1], False)


def gathered(rows: dict, world: int) -> dict:
    """Every process's {index: result}, united on every process."""
    if world <= 1:
        return rows
    import torch.distributed as dist

    shared: list = [None] * world
    dist.all_gather_object(shared, rows)
    return {i: v for part in shared for i, v in part.items()}

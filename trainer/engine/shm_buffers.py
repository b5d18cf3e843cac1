"""DeepSpeed's CPU all-reduce (its shm comm op, DeepSpeed 0.19.8) creates one POSIX shared-memory file a rank,
/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (66 MB), and never unlinks it: every
CPU run left 66 MB a rank in /dev/shm, memory held until the machine restarts (a test suite's worth filled 10 GB
here). A rank maps every other rank's file before deepspeed.init_distributed returns, so once all ranks have passed
a barrier the names are no longer needed: each rank unlinks its own, and the mappings live until the process ends."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def buffer_path(rank: int) -> str:
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{rank}")


def release_allreduce_buffer() -> None:
    """Unlink this rank's all-reduce buffer name once every rank has mapped it. Every rank must call it (a barrier)."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return  # the shm op serves CPU processes only
    dist.barrier()
    path = buffer_path(dist.get_rank())
    try:
        os.unlink(path)
    except FileNotFoundError:
        return  # not the shm all-reduce (ranks on several hosts, or another DeepSpeed)
    logger.info("DeepSpeed's CPU all-reduce buffer: its /dev/shm name removed once every rank mapped it "
                "(DeepSpeed leaves it behind: 66 MB a rank after each run).")

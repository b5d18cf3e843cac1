"""The order in which an online stage (ppo) visits its prompts: buffer by buffer, each buffer ppo_epochs times.

A buffer is the prompts of ppo_buffer_size optimizer steps on every process (processes x per-device batch x
accumulation x ppo_buffer_size). The stage samples responses for a buffer once, then trains on them ppo_epochs
times: the sampler yields the buffer's prompts once per PPO epoch, the first time in the order drawn, then each
time reshuffled, but only among the micro-batches of one process (accelerate hands process p every world-th
micro-batch), so every process sees again exactly the prompts it sampled responses for. A last, partial buffer
is filled from the start of the epoch's order, as accelerate's even batches would be.

The items are (epoch, buffer, slot, index) keys rather than bare indices: the stage finds its rollouts by them
(the slot, the prompt's place in the buffer's first pass, tells apart a prompt drawn twice to fill a buffer), and a
resumed run (which skips the batches already trained without reading them) lands on the right buffer. The epoch is
read from `epoch_of` when the iteration starts (the stage derives it from the Trainer's step): after a resume
accelerate wraps the batch sampler in a way that no set_epoch reaches.
"""

from __future__ import annotations

import math

import torch


class RolloutSampler(torch.utils.data.Sampler):
    def __init__(self, size: int, batch_size: int, accumulation: int, world: int, buffer_steps: int, repeats: int,
                 seed: int, epoch_of=None):
        self.size, self.batch_size, self.world, self.repeats, self.seed = size, batch_size, world, repeats, seed
        self.epoch_of = epoch_of
        self.micro_batches = accumulation * buffer_steps  # a process's micro-batches a buffer
        self.buffer_len = world * batch_size * self.micro_batches
        self.buffers = math.ceil(size / self.buffer_len)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.buffers * self.buffer_len * self.repeats

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        drawn = torch.randperm(self.size, generator=g).tolist()
        need = self.buffers * self.buffer_len
        while len(drawn) < need:
            drawn += drawn[:need - len(drawn)]
        return drawn

    def _slots(self, rank: int) -> list[int]:
        """Positions inside a buffer that process `rank` receives, in the order it receives them."""
        b = self.batch_size
        return [j * b + k for j in range(rank, self.world * self.micro_batches, self.world) for k in range(b)]

    def share(self, epoch: int, buffer: int, rank: int) -> list[tuple[int, int]]:
        """The (slot, dataset index) pairs process `rank` gets in one buffer, in first-pass order."""
        chunk = self.order(epoch)[buffer * self.buffer_len:(buffer + 1) * self.buffer_len]
        return [(s, chunk[s]) for s in self._slots(rank)]

    def __iter__(self):
        epoch = self.epoch_of() if self.epoch_of is not None else self.epoch
        order = self.order(epoch)
        for buffer in range(self.buffers):
            chunk = order[buffer * self.buffer_len:(buffer + 1) * self.buffer_len]
            for repeat in range(self.repeats):
                placed = list(range(len(chunk)))  # which first-pass slot each position holds
                if repeat:
                    g = torch.Generator().manual_seed(hash((self.seed, epoch, buffer, repeat)) % (2 ** 31))
                    for rank in range(self.world):
                        slots = self._slots(rank)
                        mixed = torch.randperm(len(slots), generator=g).tolist()
                        for slot, pick in zip(slots, mixed):
                            placed[slot] = slots[pick]
                for slot in placed:
                    yield (epoch, buffer, slot, chunk[slot])


class GroupSampler(RolloutSampler):
    """grpo's order: the items are completions, `group` of each prompt (TRL's batch sizes count completions, and
    so does per_device_train_batch_size here). A buffer (one generation) holds world x batch x micro_batches
    completions. Each process's share is whole groups, laid out prompt by prompt: process p holds completions
    [p n, (p + 1) n) of the buffer, n = batch x micro_batches, and completion q answers the buffer's prompt q // group.
    A process's micro-batches take its completions in that order on every pass (num_iterations), so the completions
    of one prompt sit together in a micro-batch (where their prompt can be computed once) and advantages need only
    the process's own rewards. Each buffer's prompts are a fresh random draw, so an optimizer step's completions are
    a random set of prompts' groups even without shuffling completions (TRL shuffles them; only the grouping
    differs, never which completions a generation holds)."""

    def __init__(self, size: int, batch_size: int, accumulation: int, world: int, buffer_steps: int, repeats: int,
                 seed: int, group: int, epoch_of=None):
        super().__init__(size, batch_size, accumulation, world, buffer_steps, repeats, seed, epoch_of)
        self.group = group
        self.per_process = batch_size * self.micro_batches
        if self.per_process % group:
            raise ValueError(f"{self.per_process} completions a process a generation do not hold whole groups of "
                             f"{group}")
        self.prompts = self.buffer_len // group  # prompts a buffer (a generation), on every process together
        self.buffers = math.ceil(size / self.prompts)

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        drawn = torch.randperm(self.size, generator=g).tolist()
        need = self.buffers * self.prompts
        while len(drawn) < need:
            drawn += drawn[:need - len(drawn)]
        return drawn

    def share(self, epoch: int, buffer: int, rank: int) -> list[tuple[int, int]]:
        """The (completion slot, prompt index) pairs process `rank` trains in one buffer, in the order it trains them;
        each prompt's `group` slots are consecutive."""
        chunk = self.order(epoch)[buffer * self.prompts:(buffer + 1) * self.prompts]
        start = rank * self.per_process
        return [(q, chunk[q // self.group]) for q in range(start, start + self.per_process)]

    def __iter__(self):
        epoch = self.epoch_of() if self.epoch_of is not None else self.epoch
        for buffer in range(self.buffers):
            shares = [self.share(epoch, buffer, rank) for rank in range(self.world)]
            placed: list = [None] * self.buffer_len
            for rank in range(self.world):  # accelerate hands process p every world-th micro-batch
                for position, pair in zip(self._slots(rank), shares[rank]):
                    placed[position] = pair
            for _ in range(self.repeats):
                for slot, index in placed:
                    yield (epoch, buffer, slot, index)

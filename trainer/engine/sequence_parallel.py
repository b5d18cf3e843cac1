"""Sequence parallelism (`sequence_parallel_size: N`, alias `cp_size`) through DeepSpeed's Ulysses (Arctic Long
Sequence Training): each row of a micro-batch is cut into N contiguous shards, one per process of a sequence-parallel
group; DeepSpeed's UlyssesSPAttentionHF trades the shards for attention heads (all-to-all) around the core attention,
which then sees the whole row of its heads with the row's segment layout (cu_seq_lens), so examples packed into one
row never see each other.

What zerotune does itself, and why:
- transformers' Trainer and accelerate run the DeepSpeed side (ParallelismConfig(sp_backend="deepspeed"): the
  attention registration, the mpu handed to deepspeed.initialize, DP degree = processes / N in DeepSpeed's batch and
  gradient averaging). Their data adapter (UlyssesSPDataLoaderAdapter) cuts every tensor of a batch along dim 1, which
  zerotune's 1-D segment layout (cu_seq_lens, item_lengths) does not survive, and hands each process its shard before
  the engine counts the batch's items: `GroupBatches` replaces it and yields whole batches (the same on every process
  of a group), which the engine counts exactly as without SP and then cuts with `shard` right before the forward.
- `shard` pads a row to a multiple of N with a segment of its own (never trained, never attended), shifts the labels
  BEFORE the cut (the token at a shard boundary is trained once, by the shard holding its prediction), and keeps the
  global cu_seq_lens, which DeepSpeed passes through to the core attention untouched.
"""

from __future__ import annotations

import logging

import torch

from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

# Attention implementations whose core keeps the examples of a packed row apart from the batch's cu_seq_lens after
# DeepSpeed's all-to-all (DeepSpeed drops the attention mask; sdpa would attend across examples).
SEGMENT_AWARE = ("zerotune_segments", "flash_attention_2", "flash_attention_3")
SHIFTED = "shift_labels"  # the batch key of labels already shifted to the position that predicts them


def configure(values: dict, n: int) -> None:
    """TrainingArguments values for sequence parallelism of degree n > 1: DeepSpeed required, one row a pass (DeepSpeed's
    attention is built for a fixed number of rows, and a padding-free batch is one row), and accelerate's
    ParallelismConfig that hands DeepSpeed its mpu."""
    import os

    from trainer.engine.options import deepspeed_dict

    if not values.get("deepspeed"):
        raise ConfigError(f"sequence_parallel_size: {n} runs through DeepSpeed's Ulysses: set deepspeed (e.g. "
                          "ds_configs/ds_z2_config.json or ds_z3_config.json) and launch N x data-parallel processes "
                          "(deepspeed --num_gpus K launch/train.py ...). FSDP and plain DDP have no sequence "
                          "parallelism in zerotune.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % n:
        raise ConfigError(f"sequence_parallel_size: {n} does not divide the {world} processes of this run; launch a "
                          f"multiple of {n} processes (data-parallel degree = processes / {n}).")
    ds = deepspeed_dict(values["deepspeed"])
    if ds.get("zero_optimization", {}).get("stage") == 3 and ds["zero_optimization"].get("reduce_scatter") is False:
        raise ConfigError(f"sequence_parallel_size: {n} with ZeRO-3 needs zero_optimization.reduce_scatter: true (the "
                          "default) in the DeepSpeed config: without it DeepSpeed 0.19 averages some gradient buckets "
                          "over all processes and others over the data-parallel ones (gradient_divisor).")
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if micro not in ("auto", 1):
        raise ConfigError(f"sequence_parallel_size: {n} runs one row a pass; set train_micro_batch_size_per_gpu to "
                          f"\"auto\" (or 1) in the DeepSpeed config (it says {micro}).")
    per = int(values.get("per_device_train_batch_size", 8))
    if per > 1:  # the same optimizer step: the engine normalises by the items of the whole accumulated batch
        values["per_device_train_batch_size"] = 1
        values["gradient_accumulation_steps"] = int(values.get("gradient_accumulation_steps", 1)) * per
        logger.info("sequence_parallel_size: %d runs one row a pass: per_device_train_batch_size %d becomes 1 x "
                    "gradient_accumulation_steps x %d (the same examples and gradient each optimizer step).", n, per,
                    per)
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    # sdpa only passes accelerate's name check; the real core attention is set once the model is loaded (attach).
    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa",
                                              sp_disable_in_eval=True)
    # accelerate sizes DeepSpeed's train_batch_size by the data-parallel degree it is given here.
    values["parallelism_config"] = ParallelismConfig(sp_size=n, sp_backend="deepspeed", sp_handler=handler,
                                                     dp_replicate_size=world // n)


def gradient_divisor(deepspeed, processes: int, n: int) -> int:
    """What DeepSpeed divides the sum of all processes' gradients by. Under sequence parallelism ZeRO-0/1/2 divide by
    the data-parallel degree (processes / n); DeepSpeed 0.19.8's ZeRO-3 reduce-scatter (reduce_scatter_coalesced,
    the path reduce_scatter: true takes for every bucket) pre-divides by all the processes, ignoring n, so the engine
    scales its loss by that instead (measured: SGD steps and grad_norm equal to one process only then)."""
    from trainer.engine.options import zero_stage

    return processes if n == 1 or zero_stage(deepspeed) == 3 else processes // n


def size_of(args) -> int:
    """The sequence-parallel degree TrainingArguments were built with (1: off)."""
    pc = getattr(args, "parallelism_config", None)
    return int(pc.sp_size) if pc is not None and pc.sp_backend == "deepspeed" and pc.sp_size > 1 else 1


def attach(accelerator, model, n: int) -> None:
    """Before accelerate registers DeepSpeed's attention: the model's own core attention (which must read the
    segment layout) and its head counts checked, and zerotune's batch adapter in place of DeepSpeed's."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in SEGMENT_AWARE:
        raise ConfigError(f"sequence_parallel_size: {n} needs an attention that reads the batch's segment layout "
                          f"after DeepSpeed's all-to-all ({', '.join(SEGMENT_AWARE)}); this model runs {impl!r} "
                          "(flash_attn: sdpa/eager, or a sliding-window / soft-capped model). Use flash_attn: auto.")
    text = model.config.get_text_config()
    heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if heads % n or (kv % n and n % kv):
        raise ConfigError(f"sequence_parallel_size: {n} must divide the model's {heads} attention heads, and its {kv} "
                          f"key/value heads must divide by it or into it; pick a sequence_parallel_size among "
                          f"{[d for d in range(1, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0)]}.")
    # accelerate allowlists sdpa/flash names, while DeepSpeed takes any registered attention: the check was passed
    # with sdpa (configure), the real name goes here, before accelerate.prepare reads it.
    accelerator.parallelism_config.sp_handler.sp_attn_implementation = impl
    accelerator.deepspeed_ulysses_dl_adapter = lambda dl, model: GroupBatches(dl, n)
    logger.info("Sequence parallelism: DeepSpeed Ulysses over %d processes a group, %s as the core attention over "
                "each whole row; data-parallel degree %d.", n, impl, accelerator.num_processes // n)


def group() -> tuple[object, int, int]:
    """(process group, rank in it, size) of this process's sequence-parallel group (DeepSpeed's)."""
    from deepspeed.utils import groups

    return (groups._get_sequence_parallel_group(), groups._get_sequence_parallel_rank(),
            groups._get_sequence_parallel_world_size())


class GroupBatches:
    """The train loader of a sequence-parallel group: every process of the group holds each whole batch, dealt as
    accelerate deals a plain data-parallel run of processes / N ranks (the group is one such rank: DeepSpeed's groups
    are consecutive ranks). So N-way sequence parallelism over P processes walks the data exactly as P / N processes
    of plain data parallelism do (one process when P = N), with no communication: each process deals its group's
    batches from the same seeded sampler. It hands the Trainer that batch sampler (batch_sampler), so transformers'
    resume (accelerate.skip_first_batches) skips whole group batches and keeps the grouping."""

    def __init__(self, loader, n: int):
        import copy

        shard_sampler = loader.batch_sampler  # accelerate's BatchSamplerShard of this process
        if not hasattr(shard_sampler, "process_index"):
            raise ConfigError("sequence parallelism needs a map-style dataset dealt by accelerate's batch sampler "
                              "(streaming: true is not supported with sequence_parallel_size > 1).")
        group_sampler = copy.copy(shard_sampler)
        group_sampler.num_processes = shard_sampler.num_processes // n
        group_sampler.process_index = shard_sampler.process_index // n
        self.loader, self.batch_sampler = loader, group_sampler

    def __len__(self):
        return len(self.batch_sampler)

    def __getattr__(self, name):  # dataset, collate_fn, num_workers, set_epoch ... as the wrapped loader has them
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        from torch.utils.data import DataLoader

        loader = self.loader
        return iter(DataLoader(loader.dataset, batch_sampler=self.batch_sampler, collate_fn=loader.collate_fn,
                               num_workers=loader.num_workers, pin_memory=loader.pin_memory))


def shard(batch: dict, rank: int, n: int) -> dict:
    """A padding-free batch (one row) -> this rank's contiguous 1/n of it, with the labels shifted first (SHIFTED),
    the row padded to a multiple of n by a segment of its own, and the global segment layout kept."""
    from trainer.model.losses import IGNORE_INDEX, shift_targets

    if "attention_mask" in batch or batch["input_ids"].shape[0] != 1:
        raise ValueError("sequence parallelism shards padding-free rows (one row a batch, with cu_seq_lens)")
    ids, positions = batch["input_ids"], batch["position_ids"]
    targets = shift_targets(batch["labels"])
    total = ids.shape[1]
    pad = -total % n
    # target_count (the collator's host count of the row's labels) does not hold for a shard: the loss head counts.
    out = {k: v for k, v in batch.items() if k not in ("labels", "input_ids", "position_ids", "target_count")}
    if pad:
        ids = torch.cat([ids, ids[:, -1:].expand(1, pad)], 1)
        positions = torch.cat([positions, torch.arange(pad, device=positions.device).unsqueeze(0)], 1)
        targets = torch.cat([targets, targets.new_full((1, pad), IGNORE_INDEX)], 1)
        cu = batch["cu_seq_lens_q"]
        cu = torch.cat([cu, cu.new_tensor([total + pad])])
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(int(batch["max_length_q"]), pad),
                   max_length_k=max(int(batch["max_length_k"]), pad))
        if "segment_lengths" in batch:  # the same layout as host integers (zerotune_segments reads these first)
            out["segment_lengths"] = (*batch["segment_lengths"], pad)
        if "shared_prefix" in batch:
            out["shared_prefix"] = torch.cat([batch["shared_prefix"], batch["shared_prefix"].new_zeros(1)])
    width = (total + pad) // n
    lo, hi = rank * width, (rank + 1) * width
    out.update(input_ids=ids[:, lo:hi], position_ids=positions[:, lo:hi], **{SHIFTED: targets[:, lo:hi]})
    if "item_lengths" in batch:  # each item's tokens inside [lo, hi); the padding counts to the last item
        lengths = batch["item_lengths"].clone()
        lengths[-1] += pad
        ends = lengths.cumsum(0)
        out["item_lengths"] = ends.clamp(lo, hi) - (ends - lengths).clamp(lo, hi)
    return out


class WholeRows:
    """For stages whose loss reads per-sequence sums (dpo, orpo: a sequence may span shards): the wrapper runs the model
    on this process's shard and gathers the per-token losses of the whole row back (a few bytes a token), so the stage
    computes exactly what it would without sequence parallelism, the same on every process of the group; the engine
    then counts each group's loss once (divides it by N). The gather's backward sums the group's gradients, which the
    division makes the gradient of the loss counted once."""

    def __init__(self, n: int):
        self.n = n

    def cut(self, batch: dict) -> dict:
        return shard(batch, group()[1], self.n)

    def whole(self, values: torch.Tensor, total: int) -> torch.Tensor:
        """This process's [1, T/N] per-token values -> the row's [1, T], in autograd."""
        process_group, rank, n = group()
        return _GatherRow.apply(values, process_group, rank, n)[:, :total]


class _GatherRow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, process_group, rank, n):
        import torch.distributed as dist

        parts = [torch.empty_like(values) for _ in range(n)]
        dist.all_gather(parts, values.contiguous(), group=process_group)
        ctx.process_group, ctx.rank, ctx.width = process_group, rank, values.shape[1]
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.process_group)  # every process's loss reads every shard (all_reduce: gloo too)
        return grad[:, ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width], None, None, None

"""The frozen models beside the policy: a reference (dpo, kto, ppo) or a reward model (ppo), loaded by the one loader
and placed like the policy.

A frozen copy of the starting weights (starting_copy) is a deep copy in one process or under ZeRO-0/2, and loaded
again and partitioned by ZeRO-3 or sharded by FSDP over several processes; a separate model (ref_model,
reward_model) is loaded with its adapters merged (load_frozen) and placed the same way (shard_like_policy).
"""

from __future__ import annotations

import logging

import torch

from trainer.engine.hardware import half_dtype
from trainer.engine.options import shards_weights

logger = logging.getLogger(__name__)


def sharded_module(module) -> bool:
    """Placed by FSDP or DeepSpeed: its weights are gathered by their hooks, never moved by hand."""
    from trainer.engine.fsdp import is_sharded

    return is_sharded(module) or hasattr(module, "zero_optimization_partition_weights")


def frozen_dtype(config):
    """A frozen model's weights: the compute dtype of the run (16-bit under bf16/fp16), else fp32."""
    return half_dtype(config.training)


def load_frozen(config, path: str, adapters: list[str], like, dtype, key: str, what: str):
    """A frozen causal LM from `path` (adapters merged) with the policy's attention, in `dtype`: a reference or
    a reward model. Under ZeRO-3 the load partitions the weights as they arrive (zero.Init), as it did the
    policy's."""
    from trainer.model.loading import load_causal_lm

    frozen = load_causal_lm(config.model, dtype=dtype, attention=getattr(like.config, "_attn_implementation", None),
                            path=path, key=key, adapters=adapters)
    logger.info("%s: %s, frozen.", what, path)
    return frozen.requires_grad_(False).eval()


def shard_like_policy(config, frozen, dtype, what: str):
    """FSDP: fully_shard like the policy. ZeRO-3: an inference engine over the partitioned weights, whose hooks
    gather each layer's weights for its forward (as TRL does for its reference)."""
    if config.fsdp is not None:
        from trainer.engine import fsdp

        logger.info("%s sharded with FSDP like the policy.", what)
        return fsdp.shard(frozen, config.fsdp, dtype or torch.float32)
    import deepspeed

    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    engine, *_ = deepspeed.initialize(model=frozen, config=ds)
    engine.eval()
    logger.info("%s partitioned by ZeRO-3 like the policy.", what)
    return engine


def placed_separately(config) -> bool:
    """A frozen model must be loaded again and placed like the policy (several processes, weights sharded)."""
    return shards_weights(config) and config.training.world_size > 1


def starting_copy(config, model, wrapper, dtype, cast: bool):
    """(reference, its own ModelWrapper or None): a frozen copy of the policy's starting weights. In one process or
    under ZeRO-0/2 a deep copy (cast to the compute dtype when `cast`; ppo keeps the policy's dtype and runs it under
    the policy's autocast); over several processes under ZeRO-3 or FSDP loaded again from model_name_or_path and
    partitioned or sharded like the policy."""
    if not placed_separately(config):
        import copy

        reference = copy.deepcopy(model).requires_grad_(False).eval()
        if cast and dtype is not None:
            reference.to(dtype)
        return reference, None
    from trainer.model.wrapper import ModelWrapper

    reference = load_frozen(config, config.model.model_name_or_path, [], model, dtype or torch.float32,
                            "model_name_or_path", "Reference model")
    own = ModelWrapper(reference, chunk_size=wrapper.chunk_size, chunked=wrapper.chunked, liger=wrapper.liger)
    return shard_like_policy(config, reference, dtype, "Reference model"), own

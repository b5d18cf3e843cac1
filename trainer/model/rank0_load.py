"""FSDP's weights read once: rank 0 loads the checkpoint, the other processes build the model on the meta device
(shapes, no memory) and receive their shards from rank 0 when engine/fsdp.py shards it.

Every process loading the whole fp32 model before sharding it needs the model's full size in host memory per process
(an 8B model: 32 GB a process, 256 GB on an 8-GPU node). With this path only rank 0 holds the whole model, once.

Until the shards arrive, a meta process has shapes but no values, so every decision taken from the weights before
sharding (which modules take the lean ops, which new tokens' rows a LoRA adapter trains) is taken on rank 0 and
broadcast; whatever a meta process initialises itself (new adapters, a value head) is overwritten by rank 0's values
at sharding, so every process starts from rank 0's exact weights.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

LOGGED = "FSDP: weights loaded on rank 0 only, broadcast at sharding"

# Stages whose model preparation between loading and sharding reads no weight values (or only through the
# decisions broadcast here), each proven against one process (tests/test_distributed.py for rm and dpo); the
# others keep every process loading the checkpoint. rm's new value head is part of the model rank 0 broadcasts;
# dpo's reference is the base with the adapters off (LoRA), precomputed log-probs, or a frozen model every
# process loads again from disk (model/reference.py), never a copy of the policy's weights. orpo and kto would
# take the same path but have no FSDP test yet; ppo and grpo load reward models and generate before sharding.
STAGES = ("sft", "pt", "rm", "dpo")


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def refusal(stage: str, finetuning_args, model_args, world_size: int, wanted: bool = True) -> str | None:
    """Why this FSDP run cannot load on rank 0 alone (None: it can). Decided from the YAML alone, so every process
    decides alike. `wanted`: fsdp_config's cpu_ram_efficient_loading (default true)."""
    if world_size < 2:
        return "a single process"
    if not wanted:
        return "fsdp_config.cpu_ram_efficient_loading: false"
    if stage not in STAGES:
        return f"stage {stage} prepares its model from the weights (rank-0 loading covers {', '.join(STAGES)})"
    kind = finetuning_args.finetuning_type
    if kind not in ("full", "lora"):
        return f"finetuning_type {kind} (rank-0 loading covers full and lora)"
    if model_args.quantization_bit is not None:
        return "quantization_bit: quantized weights are not broadcast"
    if model_args.adapters:
        return "adapter_name_or_path: the adapters are read from disk on every process"
    reads = [key for key in ("pissa_init", "use_dora") if kind == "lora" and getattr(finetuning_args, key)]
    if reads:
        return f"{' and '.join(reads)} initialise the adapter from the base weights"
    return None


def chosen(finetuning_args, model_args, world_size: int, wanted: bool = True) -> bool:
    """For an FSDP run: does rank 0 alone load the weights? Says which path runs, and why not."""
    why = refusal(finetuning_args.stage, finetuning_args, model_args, world_size, wanted)
    if why:
        logger.info("FSDP: every process loads the full weights (%s).", why)
    return why is None


def from_rank0(value):
    """Rank 0's value on every process (a picklable object)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_on_meta(config, dtype: torch.dtype, attention: str, trust_remote_code: bool):
    """The model of `config` with every parameter and buffer on the meta device: no memory, no values."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention,
                                                trust_remote_code=trust_remote_code)

"""FSDP with torch's own FSDP2 (`fully_shard`), applied by zerotune rather than by transformers/accelerate.

accelerate's FSDP does not run on CPU (with use_cpu it silently trains plain DDP); torch's fully_shard runs on
any backend. So zerotune shards the model itself: each decoder layer, then the root, once the adapters are in
place and before the optimizer exists; the Trainer then leaves the sharded model unwrapped (engine/trainer.py).
The reduce-scatter averages gradients over processes exactly as DDP's all-reduce does, so the engine's token
normalisation holds unchanged.

Checkpoints hold ordinary weights (gathered to rank 0) that from_pretrained / PeftModel load, and, for an
exact resume, the trained parameters' and the optimizer's shards in torch.distributed.checkpoint format
(`fsdp_shards/`), which every process writes and reads its own part of.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from torch import nn

from trainer.engine.options import FSDPOptions
from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

SHARDS = "fsdp_shards"


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def layers_to_shard(model: nn.Module, class_names: list[str] | None) -> list[nn.Module]:
    """The decoder layers: fsdp_config's transformer_layer_cls_to_wrap, else the model's _no_split_modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(class_names or getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        present = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__})
        raise ConfigError(f"fsdp_config.transformer_layer_cls_to_wrap: no module of {type(base).__name__} is a "
                          f"{sorted(names) or 'decoder layer class'}; its layer classes are {present}.")
    return layers


def shard(model: nn.Module, options: FSDPOptions, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """fully_shard each decoder layer, then the root, over every process; returns the same (sharded) module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    cuda = torch.cuda.is_available()
    kwargs = {"mesh": init_device_mesh("cuda" if cuda else "cpu", (world_size(),)),
              "reshard_after_forward": options.reshard_after_forward}
    if options.cpu_offload:
        if cuda:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        else:
            logger.warning("fsdp offload has no effect without a GPU: the shards already live in CPU memory.")
    if cuda and compute_dtype != torch.float32:
        # Gather the weights in the compute dtype; reduce gradients in fp32 into the fp32 shards the optimizer
        # steps. (On CPU bf16 runs through autocast, as without FSDP, over the weights as loaded.)
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # The chunked loss head returns its per-token losses as a view; FSDP2 warns about in-place ops on such
    # outputs, which the stages never do (they only read the losses).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # fully_shard keeps each process's slice of its local copy instead of broadcasting. Either every process holds
    # the same full weights here (the same files, the same seed for the adapters' initialisation), or the processes
    # other than rank 0 hold meta weights (model/rank0_load.py) and receive rank 0's once sharded.
    from_rank0 = _meta_anywhere(model)
    full = model.state_dict() if from_rank0 and _rank() == 0 else {}  # references: no copy
    layers = layers_to_shard(model, options.layer_classes)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if from_rank0:
        _fill_from_rank0(model, full, kwargs["mesh"].device_type)
        del full
        logger.info("FSDP: weights loaded on rank 0 only, broadcast at sharding (the other processes built the model "
                    "on the meta device).")
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    logger.info("FSDP2 (%s): %d %s + the root sharded over %d processes; this one holds %d of %d parameters.",
                "full_shard" if options.reshard_after_forward else "shard_grad_op", len(layers),
                type(layers[0]).__name__, world_size(), local, total)
    return model


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _meta_anywhere(model: nn.Module) -> bool:
    """Does any process hold meta tensors (weights still to come from rank 0)? A collective."""
    import itertools

    import torch.distributed as dist

    local = any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    if world_size() == 1:
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(local)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _fill_from_rank0(model: nn.Module, full: dict, device_type: str) -> None:
    """Give the sharded model rank 0's values (`full`: its state dict, empty elsewhere). torch broadcasts one tensor
    at a time and cuts each process's shard from it; on a meta process the shards are assigned as the parameters
    (no second copy to fill them into). Buffers follow: the non-persistent ones (the rotary inv_freq) are in no
    state dict, so each is made on the device and broadcast."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_meta:
                    setattr(module, name, torch.empty_like(buffer, device=device))  # stays (non-)persistent
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    left = [name for name, p in model.named_parameters() if (p.to_local() if hasattr(p, "to_local") else p).is_meta]
    if left:
        raise RuntimeError(f"FSDP: rank 0's weights did not reach {left[:3]} (rank {_rank()}).")


# ---- state dicts ------------------------------------------------------------------------------------------------

def _options(**kwargs):
    """By default only what trains: in the shards, frozen weights would only repeat model_name_or_path."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**{"ignore_frozen_params": True, **kwargs})


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict:
    """The unsharded weights, gathered on every process (a collective) and returned on rank 0 only, on CPU."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True,
                                                        ignore_frozen_params=trainable_only))


def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=os.path.join(folder, SHARDS))


def _require_shards(folder: str) -> str:
    path = os.path.join(folder, SHARDS)
    if not os.path.isdir(path):
        raise ConfigError(f"resume_from_checkpoint: {folder} has no {SHARDS}/, so it was not written by an fsdp run; "
                          "resume it with the settings it was trained with.")
    return path


def load_model_shards(model: nn.Module, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model, options=_options())}
    dcp.load(state, checkpoint_id=_require_shards(folder))  # in place, each process its own shards
    set_model_state_dict(model, state["model"], options=_options(strict=False))


def load_optimizer_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer, options=_options())}
    dcp.load(state, checkpoint_id=_require_shards(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_options())

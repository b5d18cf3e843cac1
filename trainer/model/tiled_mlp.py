"""Tiled MLP (`tiled_mlp`, `tiled_mlp_num_shards`: Axolotl's keys; ALST's third memory saver): every decoder layer's
MLP runs over the row in shards under DeepSpeed's TiledMLP, which keeps only the MLP's input for the backward and
recomputes one shard at a time there. The MLP's intermediate-size activations (gate, up, their product) are then
never held for the whole row, only for one shard; the price is a second MLP forward (a third under gradient
checkpointing). Works with or without sequence parallelism (each process tiles its own shard of the row).

What zerotune adds around DeepSpeed 0.19.8's class, and why:
- the row is padded to a multiple of the shard count: TiledMLP's backward marks the MLP's parameters ready for ZeRO's
  gradient reduction only at shard number `shards`, and torch.chunk returns fewer pieces when the length does not
  divide well (6 tokens in 4 shards give 3), which would leave the gradients out of the reduction for good;
- each shard's RNG state is kept and replayed in the recompute (lora_dropout draws the same mask twice; DeepSpeed's
  class recomputes with whatever the generator holds then);
- under ZeRO-3 the automatic shard count is agreed over all processes (the recompute gathers parameters once a
  shard: processes with different counts would wait on each other).
"""

from __future__ import annotations

import logging
import math
import types

import torch
from torch import nn

from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

MARK = "_zerotune_tiled_mlp"  # set on each tiled MLP module: the shard count asked for (0: automatic)


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP module of every decoder layer (transformers names it `mlp`)."""
    return [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "mlp"]


def apply_tiled_mlp(model: nn.Module, shards: int | None) -> int:
    """Tile every decoder layer's MLP (`shards`: pieces of each row; None: ceil(tokens / hidden_size), as DeepSpeed's
    example and Axolotl choose). Returns the number of MLPs tiled."""
    mlps = decoder_mlps(model)
    if not mlps:
        raise ConfigError(f"tiled_mlp: {type(model).__name__} has no decoder-layer MLP zerotune can tile (no module "
                          "named mlp). Remove tiled_mlp.")
    moe = sorted({type(m).__name__ for m in mlps if hasattr(m, "experts")})
    if moe:
        raise ConfigError(f"tiled_mlp tiles dense MLPs; {', '.join(moe)} is a mixture of experts, whose router picks "
                          "different experts in each shard (under ZeRO-3, different parameter gathers on each "
                          "process). Remove tiled_mlp for this model.")
    for module in mlps:
        module.forward = types.MethodType(_tiled(module.forward), module)
        setattr(module, MARK, shards or 0)
    hidden = model.config.get_text_config().hidden_size
    logger.info("Tiled MLP (DeepSpeed's TiledMLP) in %d decoder layers (%s): %s; each MLP keeps only its input for "
                "the backward and recomputes there one shard at a time.", len(mlps), type(mlps[0]).__name__,
                f"{shards} shards a row" if shards else f"ceil(tokens / {hidden}) shards a row (hidden_size)")
    return len(mlps)


def tiled(model: nn.Module) -> bool:
    return any(hasattr(m, MARK) for m in model.modules())


def check_engine(deepspeed: bool, fsdp: bool, processes: int) -> None:
    """Where the shards' gradients can be taken: one process, or DeepSpeed (whose ZeRO reduction waits for the last
    shard, TiledMLP's ds_grad_is_ready). FSDP and DDP reduce a parameter's gradient as soon as it is accumulated,
    and the recompute accumulates it once a shard."""
    if fsdp:
        raise ConfigError("tiled_mlp is not supported with fsdp: FSDP reduce-scatters a parameter's gradient when its "
                          "backward hook fires, and the tiled MLP's backward produces it once a shard. Use deepspeed "
                          "(ZeRO-3 shards the model too), or remove tiled_mlp.")
    if processes > 1 and not deepspeed:
        raise ConfigError("tiled_mlp with several processes needs deepspeed (ds_configs/ds_z2_config.json or "
                          "ds_z3_config.json): plain DDP marks a parameter's gradient ready once a backward, and the "
                          "tiled MLP's backward produces it once a shard. One process or DeepSpeed take it.")


def shard_count(tokens: int, hidden: int, asked: int) -> int:
    """Shards of a row of `tokens` (asked, or one per hidden_size tokens), never more than the tokens."""
    return max(1, min(asked or math.ceil(tokens / hidden), tokens))


def _tiled(inner):
    """The MLP's forward run as DeepSpeed's TiledMLP when it trains; `inner` is the forward it had (its class's, or
    the lean one of model/lean_ops.py)."""

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled()):  # nothing kept for a backward: nothing to save
            return inner(x)
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

        trained = [p for p in self.parameters() if p.requires_grad]
        tokens = x.shape[-2]
        shards = shard_count(tokens, x.shape[-1], getattr(self, MARK))
        if not getattr(self, MARK) and any(hasattr(p, "ds_id") for p in self.parameters()):
            shards = _agreed(shards, x.device)
        pad = -tokens % shards
        if pad:  # exactly `shards` equal pieces (module docstring); the padding's output is cut off, its gradient 0
            x = torch.cat([x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], -2)
        out = TiledMLP.apply(_Replay(inner), self, x, shards, trained)
        return out[..., :tokens, :] if pad else out

    return forward


def _agreed(shards: int, device) -> int:
    """The largest shard count of all processes (ZeRO-3: the same number of recomputes, so of parameter gathers)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return shards
    count = torch.tensor(shards, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


class _Replay:
    """TiledMLP's `fn`: in its forward (no grad) each shard's call records the RNG state it started from; in its
    backward (grad enabled) the recompute of shard i starts from that state again, inside fork_rng so the run's own
    random stream goes on as if nothing had been recomputed (torch.utils.checkpoint does the same)."""

    def __init__(self, inner):
        self.inner, self.states, self.replayed = inner, [], 0

    def __call__(self, module, x):
        cuda = x.device.type == "cuda"
        if not torch.is_grad_enabled():
            self.states.append((torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if cuda else None))
            return self.inner(x)
        cpu_state, cuda_state = self.states[self.replayed]
        self.replayed += 1
        with torch.random.fork_rng(devices=[x.device] if cuda else []):
            torch.set_rng_state(cpu_state)
            if cuda:
                torch.cuda.set_rng_state(cuda_state, x.device)
            return self.inner(x)

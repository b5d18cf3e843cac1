"""The engine group's keys and how the run is distributed: the engine's own keys, FSDP (`fsdp`, `fsdp_config`, applied
by engine/fsdp.py) and what a DeepSpeed config says about sharding."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.engine.optimizer_options import OptimizerArguments
from trainer.errors import ConfigError
from trainer.options import FALSE, TRUE, coerce, did_you_mean, read_yaml

logger = logging.getLogger(__name__)


@dataclass
class EngineArguments(OptimizerArguments):
    """The engine's keys beside TrainingArguments' own (LLaMA-Factory's names where it has them); the optimizer keys
    come from OptimizerArguments (engine/optimizer_options.py)."""
    plot_loss: bool = False
    disable_gradient_checkpointing: bool = False
    forward_batch_size: str = field(default="auto", metadata={"help": (
        "Rows per forward/backward pass: per_device_train_batch_size is run as passes of this many rows whose "
        "gradients are accumulated (the same optimizer steps and gradient, less activation memory). auto: the "
        "whole batch on GPU and for padding-free batches (one row already); on CPU, one packed or padded row a "
        "pass, which measured both faster and leaner there.")})
    overwrite_output_dir: bool = False
    skip_nonfinite_batches: bool = field(
        default=False, metadata={"help": "Skip batches whose loss is nan/inf instead of stopping the run (off: the "
                                         "run stops, checked once an optimizer step; on: each micro-batch is "
                                         "checked before its backward, one GPU-to-host read each)."})
    sequence_parallel_size: int = field(default=1, metadata={"help": (
        "Processes that share each sequence (DeepSpeed Ulysses; engine/sequence_parallel.py): every row is cut into "
        "this many shards, data-parallel degree = processes / sequence_parallel_size. 1: off.")})
    cp_size: int | None = field(default=None, metadata={"help": "Alias of sequence_parallel_size (LLaMA-Factory v1)."})
    mfu_peak_tflops: float | None = field(default=None, metadata={"help": (
        "The device's peak TFLOP/s in the compute dtype, the denominator of MFU. Unset: the data sheet's for GPUs "
        "in zerotune's table, else a matmul measured for about a second by each process. Set it for a device the "
        "table lacks, or to spare each process that second.")})

    def __post_init__(self):
        if self.cp_size is not None:
            if self.sequence_parallel_size not in (1, self.cp_size):
                raise ConfigError(f"cp_size: {self.cp_size} and sequence_parallel_size: {self.sequence_parallel_size} "
                                  "disagree; set one of them (cp_size is an alias).")
            self.sequence_parallel_size = self.cp_size
        if self.mfu_peak_tflops is not None and not self.mfu_peak_tflops > 0:
            raise ConfigError(f"mfu_peak_tflops: {self.mfu_peak_tflops} must be a positive number of TFLOP/s "
                              "(or unset, to take the device's from the table or a measurement).")
        if self.sequence_parallel_size < 1:
            raise ConfigError(f"sequence_parallel_size: {self.sequence_parallel_size} must be at least 1 (1: off).")


@dataclass
class FSDPOptions:
    """torch FSDP2 as zerotune applies it (engine/fsdp.py), read from `fsdp` and `fsdp_config`."""
    reshard_after_forward: bool = True  # full_shard; shard_grad_op keeps each layer gathered until its backward
    cpu_offload: bool = False
    layer_classes: list[str] | None = None  # decoder layer classes; default: the model's _no_split_modules
    rank0_load: bool = True  # cpu_ram_efficient_loading: rank 0 alone reads the weights (model/rank0_load.py)


# `fsdp` words of TrainingArguments (and LLaMA-Factory), and the fsdp_config keys FSDP2 has no use for.
FSDP_STRATEGIES = {"full_shard": True, "shard_grad_op": False}
FSDP_CONFIG_IGNORED = ("backward_prefetch", "forward_prefetch", "use_orig_params", "sync_module_states",
                       "limit_all_gathers", "state_dict_type", "min_num_params",
                       "auto_wrap_policy", "xla_fsdp_v2", "xla_fsdp_grad_ckpt", "xla_fsdp_settings")
FSDP_CONFIG_KEYS = ("transformer_layer_cls_to_wrap", "reshard_after_forward", "cpu_offload", "offload", "version",
                    "xla", "activation_checkpointing", "cpu_ram_efficient_loading") + FSDP_CONFIG_IGNORED


def _fsdp_config_dict(value: Any) -> dict:
    """fsdp_config: a mapping, a JSON file, or a JSON/YAML string from the command line; `fsdp_` prefixes dropped."""
    if isinstance(value, str) and Path(value).is_file():
        value = read_yaml(value)  # JSON is YAML
    elif isinstance(value, str) and not value.lstrip().startswith("{"):
        raise ConfigError(f"fsdp_config: {value!r} is neither a mapping nor an existing JSON file.")
    value = coerce("fsdp_config", value or {}, dict)
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in value.items()}


def parse_fsdp(value: Any, fsdp_config: Any = None) -> FSDPOptions | None:
    """`fsdp: full_shard auto_wrap` (a string, list or true) + fsdp_config -> FSDPOptions, or None when off."""
    if isinstance(value, str):
        text = value.strip().lower()
        off, words = text in FALSE | {"", "none", "null"}, [] if text in TRUE else text.replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        off, words = not value, [str(v).strip().lower() for v in value]
    else:
        off, words = not value, []
    if off:
        if fsdp_config:
            logger.warning("Ignoring fsdp_config: fsdp is not set.")
        return None
    options = FSDPOptions()
    for word in words:
        if word == "offload":
            options.cpu_offload = True
        elif word not in FSDP_STRATEGIES and word != "auto_wrap":
            raise ConfigError(f"fsdp: {word!r} is not supported; use full_shard or shard_grad_op, optionally with "
                              "auto_wrap and offload (FSDP2 shards over every process; no_shard and hybrid_shard "
                              "are FSDP1 modes).")
    strategies = [w for w in words if w in FSDP_STRATEGIES]
    if len(set(strategies)) > 1:
        raise ConfigError("fsdp: choose one of full_shard and shard_grad_op, not both.")
    if strategies:
        options.reshard_after_forward = FSDP_STRATEGIES[strategies[0]]
    extra = _fsdp_config_dict(fsdp_config)
    for key in extra:
        if key not in FSDP_CONFIG_KEYS:
            raise ConfigError(f"fsdp_config: unknown key {key!r}.{did_you_mean(key, FSDP_CONFIG_KEYS, n=2)}")
        if key in FSDP_CONFIG_IGNORED:
            logger.warning("Ignoring fsdp_config.%s (an FSDP1/accelerate setting; zerotune's FSDP2 shards each "
                           "decoder layer and saves full weights plus resumable shards).", key)
    if coerce("fsdp_config.version", extra.get("version", 2), int) != 2:
        raise ConfigError(f"fsdp_config.version: {extra['version']!r}; zerotune runs FSDP2 only (version 2).")
    if coerce("fsdp_config.xla", extra.get("xla", False), bool):
        raise ConfigError("fsdp_config.xla: XLA FSDP is not supported.")
    if coerce("fsdp_config.activation_checkpointing", extra.get("activation_checkpointing", False), bool):
        raise ConfigError("fsdp_config.activation_checkpointing: set gradient_checkpointing: true instead "
                          "(checkpointing each decoder layer composes with FSDP2).")
    if "reshard_after_forward" in extra:
        options.reshard_after_forward = coerce("fsdp_config.reshard_after_forward", extra["reshard_after_forward"],
                                                bool)
    for key in ("cpu_offload", "offload"):
        if key in extra:
            options.cpu_offload = coerce(f"fsdp_config.{key}", extra[key], bool)
    if "cpu_ram_efficient_loading" in extra:
        options.rank0_load = coerce("fsdp_config.cpu_ram_efficient_loading", extra["cpu_ram_efficient_loading"], bool)
    if extra.get("transformer_layer_cls_to_wrap"):
        options.layer_classes = coerce("fsdp_config.transformer_layer_cls_to_wrap",
                                        extra["transformer_layer_cls_to_wrap"], list[str])
    return options


def deepspeed_dict(deepspeed) -> dict:
    """The DeepSpeed config as a dict ({} when unset or unreadable; DeepSpeed itself reports a bad file)."""
    import json

    if not deepspeed:
        return {}
    try:
        cfg = deepspeed if isinstance(deepspeed, dict) else json.loads(Path(deepspeed).read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def zero_stage(deepspeed) -> int:
    return int(deepspeed_dict(deepspeed).get("zero_optimization", {}).get("stage", 0) or 0)


def shards_weights(config) -> bool:
    """Each process holds only part of the weights (FSDP, or ZeRO-3): a frozen copy must be placed the same way."""
    t = config.training
    return config.fsdp is not None or bool(t.deepspeed and zero_stage(t.deepspeed) == 3)

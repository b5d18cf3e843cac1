"""The optimizer keys (LLaMA-Factory 0.9.5's names and defaults) and the checks that span groups: which method is
asked for, and where it is refused (DeepSpeed, FSDP, LoRA, several processes) with the reason. Pure: no torch.
engine/optimizers.py builds what these keys ask for."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import ConfigError


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class OptimizerArguments:
    """Memory-lean optimizers and LoRA+; without any of them the Trainer builds `optim` (transformers' name)."""
    use_muon: bool = field(default=False, metadata={"help": (
        "Muon (torch.optim.Muon) for the 2-D hidden matrices, `optim` (AdamW by default) for embeddings, heads, norms "
        "and biases. learning_rate is shared: each matrix's step is scaled to AdamW's RMS (0.2 x sqrt(max(rows, "
        "cols))), as in LLaMA-Factory.")})
    use_adam_mini: bool = field(default=False, metadata={"help": "Adam-mini (the adam-mini package)."})
    use_galore: bool = False
    galore_target: str = "all"
    galore_rank: int = 16
    galore_update_interval: int = 200
    galore_scale: float = 2.0
    galore_proj_type: str = field(default="std", metadata=_choices("std", "reverse_std", "right", "left", "full"))
    galore_layerwise: bool = False
    use_apollo: bool = False
    apollo_target: str = "all"
    apollo_rank: int = 16
    apollo_update_interval: int = 200
    apollo_scale: float = 32.0
    apollo_proj: str = field(default="random", metadata=_choices("svd", "random"))
    apollo_proj_type: str = field(default="std", metadata=_choices("std", "right", "left"))
    apollo_scale_type: str = field(default="channel", metadata=_choices("channel", "tensor"))
    apollo_layerwise: bool = False
    apollo_scale_front: bool = False
    use_badam: bool = False
    badam_mode: str = field(default="layer", metadata=_choices("layer", "ratio"))
    badam_start_block: int | None = None
    badam_switch_mode: str = field(default="ascending", metadata=_choices("ascending", "descending", "random",
                                                                           "fixed"))
    badam_switch_interval: int = 50
    badam_update_ratio: float = 0.05
    badam_mask_mode: str = field(default="adjacent", metadata=_choices("adjacent", "scatter"))
    badam_verbose: int = 0
    loraplus_lr_ratio: float | None = field(default=None, metadata={"help": (
        "LoRA+: the lora_B matrices (and 1-D trained parameters) learn at learning_rate x this ratio "
        "(PEFT's create_loraplus_optimizer).")})
    loraplus_lr_embedding: float = field(default=1e-6, metadata={"help": (
        "LoRA+: the learning rate of LoRA adapters on embedding layers (an absolute rate, as in PEFT).")})


# method -> the key that asks for it; the order is the order of the error message only (two at once are refused).
METHOD_KEYS = {"muon": "use_muon", "adam_mini": "use_adam_mini", "galore": "use_galore", "apollo": "use_apollo",
               "badam": "use_badam", "loraplus": "loraplus_lr_ratio"}
SHARDING_REFUSED = ("muon", "adam_mini", "galore", "apollo", "badam")  # refused under DeepSpeed and FSDP
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")  # transformers 5's default is the fused one on torch >= 2.8
GALORE_OPTIMS = ADAMW_OPTIMS + ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adafactor")

# Why a method cannot run where it is refused (the messages name the key and what to do).
PER_PARAMETER_STEP = ("steps each parameter inside the backward pass (a hook per parameter), so it can neither "
                      "accumulate gradients (zerotune runs each batch as accumulated passes on CPU, and "
                      "gradient_accumulation_steps > 1 anywhere) nor clip the global gradient norm, and the "
                      "Trainer's optimizer, scheduler and checkpoints never see it")


def deepspeed_optimizer(training) -> dict | None:
    """The DeepSpeed config's own "optimizer" block (DeepSpeed then builds the optimizer, not the Trainer), from
    TrainingArguments or the training keys (a dict, or the path of a JSON file)."""
    value = training.get("deepspeed") if isinstance(training, dict) else getattr(training, "deepspeed", None)
    if isinstance(value, str):
        try:
            value = json.loads(Path(value).read_text())
        except (OSError, ValueError):
            return None  # DeepSpeed itself reports a missing or bad file
    return value.get("optimizer") if isinstance(value, dict) else None


def chosen_method(o: OptimizerArguments) -> str | None:
    """The optimizer method the keys ask for (None: transformers' `optim`); two at once are refused."""
    asked = [m for m, key in METHOD_KEYS.items() if (getattr(o, key) is not None and getattr(o, key) is not False)]
    if len(asked) > 1:
        keys = ", ".join(METHOD_KEYS[m] for m in asked)
        raise ConfigError(f"{keys}: choose one optimizer method; each of them builds the whole optimizer "
                          "(LLaMA-Factory silently used the first one it checked).")
    return asked[0] if asked else None


def check_optimizer(o: OptimizerArguments, finetuning_type: str, training: dict, fsdp: bool) -> None:
    """The method's own values, and where it cannot run, before anything loads (and before DeepSpeed starts).
    `training`: the training group's keys as given."""
    method = chosen_method(o)
    if method is None:
        return
    optim_given = "optim" in training
    optim = str(getattr(training.get("optim"), "value", training.get("optim") or "adamw_torch_fused"))
    deepspeed = bool(training.get("deepspeed"))
    if deepspeed_optimizer(training):
        raise ConfigError(f"{METHOD_KEYS[method]}: the DeepSpeed config has its own optimizer block, which "
                          "DeepSpeed builds instead of this one; remove one of them.")
    if method == "loraplus":
        if finetuning_type != "lora":
            raise ConfigError(f"loraplus_lr_ratio is for finetuning_type: lora (this run: {finetuning_type}).")
        if o.loraplus_lr_ratio <= 0:
            raise ConfigError(f"loraplus_lr_ratio: {o.loraplus_lr_ratio} must be positive (the paper uses 2 to 16).")
        return
    if method in ("galore", "apollo", "badam") and finetuning_type == "lora":
        raise ConfigError(f"{METHOD_KEYS[method]}: {method} trains full weight matrices; it cannot run with "
                          "finetuning_type: lora (as in LLaMA-Factory). Use finetuning_type: full or freeze.")
    where = "DeepSpeed" if deepspeed else "FSDP" if fsdp else None
    if method == "muon":
        if where:
            raise ConfigError(
                f"use_muon is not supported under {where}: Muon orthogonalizes each whole matrix, and "
                + ("FSDP holds a shard of it per process. " if fsdp else
                   "under ZeRO the optimizer sees flat partitions (LLaMA-Factory then silently ran AdamW, its issue "
                   "#8041). DeepSpeed 0.19's own Muon does handle ZeRO, but it scales each update by "
                   "sqrt(max(1, rows/cols)), not by use_muon's AdamW-matched 0.2 x sqrt(max(rows, cols)), so the "
                   "same learning_rate would train a different model; to use it, leave use_muon unset and put "
                   '"optimizer": {"type": "Muon", "params": {"muon_lr": ..., "adam_lr": ...}} in the DeepSpeed '
                   'config (under ZeRO-3 also "reduce_scatter": false in zero_optimization). ')
                + "Without sharding (one process or plain DDP) use_muon runs torch.optim.Muon.")
    elif method == "adam_mini":
        if finetuning_type == "lora":
            raise ConfigError("use_adam_mini: Adam-mini shares one second moment per attention head and per neuron "
                              "of full weight matrices, and LoRA's factors are not such matrices (adam-mini 1.1.1 "
                              "fails on them). Use finetuning_type: full or freeze.")
        if where:
            raise ConfigError(f"use_adam_mini is not supported under {where} here: adam-mini 1.1.1 reads each "
                              "weight's rows as heads or neurons, which ZeRO's flat partitions and FSDP's shards "
                              "no longer are, and it counts processes with torch.cuda.device_count(). Run it "
                              "without sharding (one process or plain DDP).")
    elif method in ("galore", "apollo"):
        name = "GaLore" if method == "galore" else "APOLLO"
        if where:
            raise ConfigError(f"use_{method}: {name} projects each whole weight matrix's gradient; it cannot run "
                              f"under {where} (as in LLaMA-Factory, which refuses it under DeepSpeed). Run it in "
                              "one process or with plain DDP.")
        if getattr(o, f"{method}_layerwise"):
            raise ConfigError(f"{method}_layerwise: layer-wise {name} {PER_PARAMETER_STEP}. Leave it unset: "
                              f"use_{method} keeps its memory saving (the projected optimizer states) without it.")
        allowed = GALORE_OPTIMS if method == "galore" else ADAMW_OPTIMS
        if optim not in allowed:
            raise ConfigError(f"optim: {optim} has no {name} variant; with use_{method} choose one of "
                              f"{', '.join(allowed)}.")
        rank = getattr(o, f"{method}_rank")
        if rank <= 0 or getattr(o, f"{method}_update_interval") <= 0:
            raise ConfigError(f"{method}_rank and {method}_update_interval must be positive.")
    elif method == "badam":
        if finetuning_type != "full":
            raise ConfigError(f"use_badam: BAdam chooses which block of the model trains, block by block; it needs "
                              f"finetuning_type: full (this run: {finetuning_type}).")
        if where:
            raise ConfigError(f"use_badam is supported in one process only, not under {where}: it switches which parameters require "
                              "gradients as it runs, which DDP's and ZeRO-1/2's buffers, built once, cannot follow "
                              "(LLaMA-Factory refuses it under DDP and DeepSpeed ZeRO-1/2, and its ZeRO-3 path "
                              "patches DeepSpeed's private state).")
        if o.badam_mode == "ratio":
            raise ConfigError("badam_mode: ratio is not supported: BAdam's ratio mode turns each gradient sparse in "
                              "a hook at every backward pass, so the accumulated passes of a batch (zerotune's "
                              "forward_batch_size, gradient_accumulation_steps) and gradient clipping would meet "
                              "sparse gradients. Use badam_mode: layer (the default).")
        if o.badam_switch_interval == 0 or o.badam_switch_interval < -1:
            raise ConfigError("badam_switch_interval: a positive number of steps, or -1 to never switch blocks.")
    if method == "adam_mini" and optim_given and optim not in ADAMW_OPTIMS:
        raise ConfigError(f"optim: {optim} and use_adam_mini: Adam-mini is the whole optimizer; remove optim.")

"""finetuning_type lora | freeze | full: which parameters train."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

OUTPUT_LAYERS = ("lm_head", "embed_out", "output_layer", "v_head", "score")


def all_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of every Linear layer inside the decoder (the 'all' of lora_target)."""
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear) and full.split(".")[-1] not in OUTPUT_LAYERS:
            names.add(full.split(".")[-1])
    return sorted(names)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"finetuning_type: freeze cannot find the decoder layers of {type(model).__name__}.")


def apply_lora(model, args, adapter_path: str | None, is_trainable: bool):
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path:
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=is_trainable)
        logger.info("Loaded LoRA adapter from %s.", adapter_path)
        return model
    targets = all_linear_names(model) if args.lora_target == ["all"] else list(args.lora_target)
    known = set(all_linear_names(model)) | {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in known]
    if missing:
        raise ConfigError(f"lora_target: {missing} match no module of this model; its linear layers are "
                          f"{all_linear_names(model)} (or use all).")
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, modules_to_save=args.additional_target, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    logger.info("LoRA r=%d alpha=%d on %s.", args.lora_rank, args.lora_alpha, ",".join(targets))
    return model


def apply_freeze(model, args) -> None:
    layers = decoder_layers(model)
    n = args.freeze_trainable_layers
    if n == 0 or abs(n) > len(layers):
        raise ConfigError(f"freeze_trainable_layers: {n} must be between -{len(layers)} and {len(layers)}, not 0.")
    chosen = range(len(layers) - n, len(layers)) if n > 0 else range(-n)
    modules = args.freeze_trainable_modules
    for p in model.parameters():
        p.requires_grad_(False)
    matched = 0
    for i in chosen:
        for name, p in layers[i].named_parameters():
            if modules == ["all"] or any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", name) for m in modules):
                p.requires_grad_(True)
                matched += 1
    for extra in args.freeze_extra_modules or []:
        sub = dict(model.named_modules()).get(extra)
        if sub is None:
            raise ConfigError(f"freeze_extra_modules: {extra!r} is not a module of this model.")
        for p in sub.parameters():
            p.requires_grad_(True)
            matched += 1
    if not matched:
        raise ConfigError(f"freeze_trainable_modules: {modules} match no parameter of the chosen layers.")
    logger.info("Freeze tuning: training layers %s (%s).", list(chosen), ",".join(modules))


def prepare_trainable(model, finetuning_args, model_args, is_trainable: bool):
    kind = finetuning_args.finetuning_type
    if kind == "lora":
        model = apply_lora(model, finetuning_args, model_args.adapter_name_or_path, is_trainable)
    elif kind == "freeze":
        apply_freeze(model, finetuning_args)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    # The optimizer keeps fp32 copies only of what it trains; keep those in fp32 even on a bf16 base.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("Trainable parameters: %d of %d (%.3f%%).", trainable, total, 100 * trainable / max(total, 1))
    return model

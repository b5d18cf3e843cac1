"""PEFT's LoRA variants under LLaMA-Factory's keys (use_dora, use_rslora, pissa_init / pissa_iter): the LoraConfig
fields they set, the checks PEFT leaves to the first step or to nobody, and the log lines that say, from PEFT's own
layers, which variant engaged.

- DoRA: each adapted row is magnitude * (W + s·BA) / ||W + s·BA|| (one trained magnitude per output row).
- rsLoRA: the adapter is scaled by alpha / sqrt(r) instead of alpha / r.
- PiSSA: the adapter starts as the top-r singular part of W and the base keeps the residual, so the first forward is
  the base model's; pissa_iter >= 0 takes PEFT's randomized SVD with that many iterations, -1 the exact SVD.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

FLOAT_WEIGHTS = (torch.float32, torch.float16, torch.bfloat16)


def init_lora_weights(args) -> bool | str:
    """PEFT's init_lora_weights for the run: PiSSA's SVD (exact, or randomized with pissa_iter iterations) or LoRA's
    own start (B = 0)."""
    if not args.pissa_init:
        return True
    return "pissa" if args.pissa_iter == -1 else f"pissa_niter_{args.pissa_iter}"


def variant_fields(args) -> dict:
    """The LoraConfig fields of the variant keys."""
    return {"use_dora": args.use_dora, "use_rslora": args.use_rslora, "init_lora_weights": init_lora_weights(args)}


def check_pissa_weights(model: nn.Module, targets: list[str]) -> None:
    """PiSSA decomposes each target's full-precision weight; a quantized one (4/8-bit) cannot be (PEFT stops with a
    TypeError deep inside). LLaMA-Factory refuses it the same way."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.split(".")[-1] in targets and isinstance(weight, torch.Tensor) and weight.dtype not in FLOAT_WEIGHTS:
            raise ConfigError(f"pissa_init: {name} holds {weight.dtype} weights (a quantized model), and PiSSA "
                              "decomposes full-precision weights: train PiSSA on the 16-bit model, or LoRA without "
                              "pissa_init on the quantized one.")


def _lora_layers(model: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def check_dora_rows(model: nn.Module, adapter: str = "default") -> None:
    """DoRA divides each row of W + s·BA by its norm: a weight with an all-zero row (some released checkpoints have
    them) gives NaN from the first step. Say which layers before anything trains."""
    zero = {}
    for name, layer in _lora_layers(model, adapter).items():
        magnitudes = getattr(layer, "lora_magnitude_vector", {})
        dora = magnitudes[adapter] if adapter in magnitudes else None
        if dora is not None and dora.weight.numel() and bool((dora.weight == 0).any()):
            zero[name] = int((dora.weight == 0).sum())
    if zero:
        first = ", ".join(f"{n} ({k} rows)" for n, k in list(zero.items())[:3])
        raise ConfigError(f"use_dora: {len(zero)} adapted weights have rows of norm 0 ({first}), and DoRA divides "
                          "each row by its norm (NaN from the first step): leave those modules out of lora_target, "
                          "or train without use_dora.")


def describe(model: nn.Module, args, adapter: str = "default") -> str:
    """What PEFT built, read from its own layers: the variant, the scale each layer applies, DoRA's magnitude
    vectors and PiSSA's start."""
    layers = _lora_layers(model, adapter)
    if not layers:
        return "no LoRA layers"
    config = model.peft_config[adapter]
    scales = sorted({round(float(layer.scaling[adapter]), 6) for layer in layers.values()})
    rule = "alpha/sqrt(r)" if config.use_rslora else "alpha/r"
    parts = [f"r={config.r} alpha={config.lora_alpha}, scaling {', '.join(map(str, scales))} ({rule})"]
    names = []
    if config.use_dora:
        names.append("DoRA")
        magnitudes = sum(1 for layer in layers.values() if adapter in getattr(layer, "lora_magnitude_vector", {}))
        parts.append(f"{magnitudes} trained magnitude vectors")
    if config.use_rslora:
        names.append("rsLoRA")
    init = config.init_lora_weights
    if isinstance(init, str) and init.startswith("pissa"):
        how = "exact SVD" if init == "pissa" else f"randomized SVD, {init.split('_')[-1]} iterations"
        names.append(f"PiSSA ({how})")
        parts.append("the base weights hold the residual W - scaling·B0A0")
    if config.lora_dropout:
        parts.append(f"lora_dropout {config.lora_dropout}")
    return f"{' + '.join(names) or 'plain LoRA'} on {len(layers)} layers: {'; '.join(parts)}"


PISSA_RELOAD = ("PEFT rebuilds a PiSSA adapter's residual base while loading it, with a new randomized SVD "
                "(init_lora_weights {init}), so it loads a different model than the one trained (on SmolLM2-135M the "
                "logits were off by up to 36)")


def saved_adapter(path: str, args=None, key: str = "adapter_name_or_path", beside: bool = False) -> tuple[str, str]:
    """(the folder to load for the adapter at `path`, its variant), from its adapter_config.json.

    A PiSSA adapter loads as the trained model only where PEFT rebuilds the same residual: with the exact SVD
    (init_lora_weights "pissa"), alone on the model. Its pissa_converted folder (pissa_convert) is a plain LoRA adapter
    of the original base that always does: taken when it is there. Otherwise a randomized-SVD PiSSA adapter, or a PiSSA
    adapter loaded `beside` another one (it would change their shared base), is refused. With `args` (a run that trains
    the adapter further), a variant key that asks for what the adapter is not is refused too: the adapter's own config
    decides what PEFT builds, and the key would be dropped silently."""
    config = _saved_config(path)
    init = str(config.get("init_lora_weights", True))
    if init.startswith("pissa"):
        converted = os.path.join(path, "pissa_converted")
        if os.path.isfile(os.path.join(converted, "adapter_config.json")):
            logger.info("%s %s is a PiSSA adapter; loading its plain LoRA conversion %s (the same trained model, on "
                        "the original base).", key, path, converted)
            return converted, "plain LoRA (converted from PiSSA)"
        if init != "pissa" or beside:
            why = ("it would replace the base weights it shares with the model's other adapter by its residual"
                   if init == "pissa" else PISSA_RELOAD.format(init=init))
            raise ConfigError(f"{key} {path!r} is a PiSSA adapter without a pissa_converted folder, and {why}. Use "
                              "the pissa_converted folder of a run trained with pissa_convert: true, or train with "
                              "pissa_iter: -1 (the exact SVD, which PEFT rebuilds identically).")
    if args is not None:
        for field, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")):
            if getattr(args, field) and not config.get(field):
                raise ConfigError(f"{field}: true, but the adapter {path!r} ({key}) that this run trains further is "
                                  f"not {name}: its adapter_config.json decides. Set create_new_adapter: true to merge "
                                  f"it and train a new {name} adapter, or remove {field}.")
    names = [name for field, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")) if config.get(field)]
    if init == "pissa":
        names.append("PiSSA (exact SVD, rebuilt identically while loading)")
    return path, " + ".join(names) or "plain LoRA"


def _saved_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def warn_unconverted(args) -> None:
    """A PiSSA run without pissa_convert (exact SVD: check_lora_variants turns it on for a randomized one) leaves
    the PiSSA adapter alone, which loads right only where PEFT can rebuild its residual."""
    if args.pissa_init and not args.pissa_convert:
        logger.info("pissa_init with the exact SVD and no pissa_convert: output_dir holds the PiSSA adapter, whose "
                    "residual base PEFT rebuilds identically while loading it (alone on the model). pissa_convert: "
                    "true also writes output_dir/pissa_converted, a plain LoRA adapter of the original base.")


def plan(f, adapters: list[str]) -> str:
    """zerotune check's line for a LoRA run: the adapter it trains and its variant, from the config alone."""
    if adapters and not f.create_new_adapter:
        merged = f"; {', '.join(adapters[:-1])} merged into the base first" if len(adapters) > 1 else ""
        return f"trains {adapters[-1]} further (its adapter_config.json sets r, alpha and the variant){merged}"
    scaling = f.lora_alpha / (f.lora_rank ** 0.5 if f.use_rslora else f.lora_rank)
    parts = [f"new LoRA r={f.lora_rank} alpha={f.lora_alpha}, scaling {scaling:.4g} "
             f"({'alpha/sqrt(r): rsLoRA' if f.use_rslora else 'alpha/r'})"]
    if f.use_dora:
        parts.append("DoRA (a trained magnitude per output row; PEFT's forward)")
    if f.pissa_init:
        how = "exact SVD" if f.pissa_iter == -1 else f"randomized SVD, {f.pissa_iter} iterations"
        parts.append(f"PiSSA start ({how})" + ("; pissa_convert writes output_dir/pissa_converted"
                                               if f.pissa_convert else ""))
    if f.lora_dropout:
        parts.append(f"lora_dropout {f.lora_dropout} (PEFT's forward)")
    if adapters:
        parts.append(f"on the base with {', '.join(adapters)} merged (create_new_adapter)")
    return "; ".join(parts)


"""Tokenizer and model loading: local folder or hub id, dtype, attention implementation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from trainer.errors import ConfigError
from trainer.model.params import human_count, parameter_count

logger = logging.getLogger(__name__)


def _hub_error(path: str, err: Exception) -> ConfigError:
    return ConfigError(
        f"model_name_or_path {path!r} is not a local folder and could not be loaded from the hub "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Without network access, "
        "download the model first and point model_name_or_path at its folder."
    )


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Can we open a connection to the hub? Checked in a thread, because a DNS lookup ignores socket timeouts."""
    import socket
    import threading
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _check_local(path: str, key: str = "model_name_or_path") -> None:
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1 or p.exists()
    if looks_local and not p.is_dir():
        raise ConfigError(f"{key} {path!r}: no such folder.")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{key} {path!r} has no config.json; is it a Hugging Face model folder?")
        return
    # A hub id. Without a network, transformers retries for about a minute before failing: fail fast instead.
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
    if not cached and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True") and not _hub_reachable():
        raise _hub_error(path, OSError("the hub is unreachable (no network?)"))


def load_tokenizer(model_args):
    from transformers import AutoTokenizer

    path = model_args.model_name_or_path
    _check_local(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code,
                                            cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                                            token=model_args.hf_hub_token, use_fast=model_args.use_fast_tokenizer)
    except OSError as err:
        raise _hub_error(path, err) from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"The tokenizer of {path!r} is not a fast tokenizer; zerotune needs one for exact labels.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def attention_implementation(choice: str, config=None, segments_wanted: bool = False) -> str:
    """flash_attn: auto picks FlashAttention-2 (varlen over packed rows) on a CUDA GPU that has it, else
    zerotune's per-example SDPA (kernels.py), else plain SDPA for models it does not cover. A stage whose batches
    share prompts between sequences (segments_wanted) gets zerotune_segments, which runs FlashAttention-2 varlen
    itself where flash-attn is installed."""
    from trainer.model import kernels

    uncovered = config is not None and bool(
        getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
        or getattr(config, "attn_logit_softcapping", None))
    if choice == "fa2" or (choice == "auto" and kernels.has_flash_attn() and (uncovered or not segments_wanted)):
        if not kernels.has_flash_attn():
            raise ConfigError("flash_attn: fa2 needs a CUDA GPU and the flash-attn package "
                              "(pip install 'zerotune[gpu]'); flash_attn: auto picks the best available path.")
        return "flash_attention_2"
    if choice == "auto":
        if torch.cuda.is_available() and not kernels.has_flash_attn():
            varlen = kernels.varlen_status()
            if varlen.usable:
                logger.info("Attention: padding-free batches run PyTorch's varlen flash attention (%s) through %s "
                            "(flash-attn: %s); shared prompts and dropout run SDPA per segment.", varlen.why,
                            kernels.SEGMENTS, kernels.flash_status().why)
            else:
                logger.warning("Attention: padding-free batches run SDPA per segment (%s): neither flash-attn (%s) "
                               "nor PyTorch's varlen_attn (%s) is usable here.", kernels.SEGMENTS,
                               kernels.flash_status().why, varlen.why)
        if uncovered:
            return "sdpa"
        kernels.register()
        return kernels.SEGMENTS
    if choice in ("sdpa", "eager"):
        return choice
    return "eager"  # disabled


def weights_dtype(training_args, finetuning_type: str) -> torch.dtype:
    """Frozen weights live in the compute dtype, on CPU as on GPU: half the memory, no cast of every weight
    in every forward, and activations that stay bf16 between layers (on this CPU the casts were ~10% of a
    LoRA step). Trained parameters are upcast to fp32 later (adapters.prepare_trainable). A full
    fine-tune keeps fp32 weights for its optimizer and computes under autocast, unless DeepSpeed keeps
    the fp32 master copy itself.
    """
    if finetuning_type == "full" and not training_args.deepspeed:
        return torch.float32
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16 and torch.cuda.is_available():
        return torch.float16
    return torch.float32


def load_causal_lm(model_args, *, dtype: torch.dtype, attention: str | None = None, segments_wanted: bool = False,
                   path: str | None = None, key: str = "model_name_or_path", adapters: list[str] = (),
                   trains: bool = False, quantize: bool = False, sharded: bool = False, rank0_weights: bool = False):
    """THE loader: the policy, a reference, a reward model, or a model to chat with or export. `path` defaults to
    model_name_or_path (`key` names the YAML key it came from, for errors); `attention` is an implementation name
    (a frozen model takes its policy's), else flash_attn decides (attention_implementation); `adapters` are merged
    in order. A model that `trains` gets Liger's kernels (enable_liger_kernel) or else the lean ops, which change
    only what is kept for backward (exact, checked per module); frozen models have no backward to spare. The KV
    cache is off: packed rows are only kept apart without it (see PLATFORM.md); generation turns it on per call.
    `quantize`: quantization_bit applies (the policy, chat; never export, which merges into the 16-bit weights); a
    checkpoint quantized ahead loads as it is whatever `quantize` says (model/quantization.py); `sharded`: ZeRO-3 or
    FSDP will shard the model; `rank0_weights`: FSDP will broadcast rank 0's weights, so the other processes build
    the model on the meta device (model/rank0_load.py) and take the decisions that read weights from rank 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.model import quantization

    path = path or model_args.model_name_or_path
    _check_local(path, key=key)
    common = dict(trust_remote_code=model_args.trust_remote_code, cache_dir=model_args.cache_dir,
                  revision=model_args.model_revision, token=model_args.hf_hub_token)
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except OSError as err:
        raise _hub_error(path, err) from None
    from trainer.model.rope import configure_rope

    configure_rope(config, model_args.rope_scaling, model_args.model_max_length)
    impl = attention or attention_implementation(model_args.flash_attn, config, segments_wanted)
    liger = False
    if trains:
        from trainer.engine.agree import agreed_choice
        from trainer.model.kernels import apply_liger

        liger = apply_liger(config.model_type, model_args.enable_liger_kernel)
        agreed_choice("the attention path and Liger kernels (flash_attn, enable_liger_kernel)", (impl, liger))
    quantized = quantization.load_kwargs(model_args, config, dtype, quantize, path, key, sharded)
    from trainer.model import rank0_load

    meta = rank0_weights and rank0_load.rank() != 0
    if meta and quantization.prequantized_method(config) is not None:
        logger.warning("FSDP: every process loads the full weights (%s is quantized ahead: its packed weights are "
                       "not broadcast).", path)
        meta = False
    try:
        if meta:
            model = rank0_load.build_on_meta(config, dtype, impl, model_args.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, attn_implementation=impl,
                                                         **common, **quantized)
    except ImportError as err:  # a quantization method whose packages zerotune does not know to check ahead
        if quantization.prequantized_method(config) is None:
            raise
        raise ConfigError(f"{key} {path!r} is a quantized checkpoint that transformers cannot load here: "
                          f"{err}") from None
    if quantization.is_quantized(model):
        logger.info(quantization.describe(model) or f"{path}: a quantized checkpoint.")
        quantization.own_cpu_weights(model)
        if trains:
            quantization.prepare_for_training(model)
    for adapter in adapters:
        from trainer.model.adapters import merge_adapter

        model = merge_adapter(model, adapter, key)
    if trains and not liger:
        from trainer.model.lean_ops import apply_lean_ops, lean_rotary

        # A meta model has no values to check the lean ops against: it takes rank 0's verdict.
        swapped = None if meta else apply_lean_ops(model)
        if rank0_weights:
            swapped = rank0_load.from_rank0(swapped)
            if meta:
                apply_lean_ops(model, classes=swapped)
        lean_rotary(model)
    if trains and model_args.tiled_mlp:  # around whichever MLP forward the model now has (lean or Liger's)
        from trainer.model.tiled_mlp import apply_tiled_mlp

        apply_tiled_mlp(model, model_args.tiled_mlp_num_shards)
    model.config.use_cache = False
    logger.info("Loaded %s%s (%s, %s parameters) with %s attention, weights in %s.", path,
                "".join(f" + {a}" for a in adapters), type(model).__name__,
                human_count(parameter_count(model.parameters())), impl, dtype)
    return model


def load_model(model_args, training_args, finetuning_type: str, segments_wanted: bool = False,
               sharded: bool = False, rank0_weights: bool = False):
    """The model to train (or evaluate), its frozen weights in the compute dtype (weights_dtype), quantized when
    quantization_bit asks (QLoRA: bitsandbytes computes and stores the 4-bit weights in that dtype too)."""
    return load_causal_lm(model_args, dtype=weights_dtype(training_args, finetuning_type),
                          segments_wanted=segments_wanted, trains=True, quantize=True, sharded=sharded,
                          rank0_weights=rank0_weights)


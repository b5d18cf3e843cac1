"""QLoRA: the base model's Linear layers quantized by bitsandbytes as they load (quantization_bit 4 or 8), LoRA
trained over them; checkpoints quantized ahead (GPTQ, AWQ, AQLM, bitsandbytes, ...) loaded through transformers where
their kernels are installed; and what engaged, said in the log and counted in zerotune check's memory plan.

4-bit weights are stored packed in the compute dtype (bnb_4bit_quant_storage), not uint8: ZeRO-3 and FSDP then
partition them like any other weight of that dtype (FSDP shards floating-point tensors only, and flattens a unit's
weights together in one dtype: with uint8 storage QLoRA fails under both, the failure of LLaMA-Factory #8482 and
Axolotl #207).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.model.params import numel, stored_bytes

logger = logging.getLogger(__name__)

MB = 2**20
# A checkpoint's quantization_config.quant_method -> the modules transformers needs to load it (import name, pip name).
PREQUANTIZED_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "gptq": (("optimum", "optimum"), ("gptqmodel", "gptqmodel")),
    "awq": (("gptqmodel", "gptqmodel"),),  # transformers 5 runs AWQ through gptqmodel (autoawq before)
    "aqlm": (("aqlm", "aqlm[gpu,cpu]"),),
    "bitsandbytes": (("bitsandbytes", "bitsandbytes"),),
    "hqq": (("hqq", "hqq"),),
    "eetq": (("kernels", "kernels"),),
    "quanto": (("optimum.quanto", "optimum-quanto"),),
    "compressed-tensors": (("compressed_tensors", "compressed-tensors"),),
    "torchao": (("torchao", "torchao"),),
    "vptq": (("vptq", "vptq"),),
    "spqr": (("spqr_quant", "spqr_quant"),),
}
# Methods whose weights transformers dequantizes as they load (LLaMA-Factory lets them pass ZeRO-3 and FSDP too).
DEQUANTIZED_ON_LOAD = ("mxfp4", "fp8")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False


def prequantized_method(model_config) -> str | None:
    """How the checkpoint's weights were quantized (its config.json's quantization_config), or None."""
    qc = getattr(model_config, "quantization_config", None)
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def check_prequantized(model_config, path: str, key: str, model_args, sharded: bool) -> str | None:
    """A checkpoint quantized ahead: its kernel packages must be installed (refused by name before loading
    otherwise), it cannot be quantized again, and ZeRO-3 / FSDP cannot shard its packed weights. Returns the method."""
    method = prequantized_method(model_config)
    if method is None:
        return None
    missing = [pip for module, pip in PREQUANTIZED_PACKAGES.get(method, ()) if not _installed(module)]
    if missing:
        raise ConfigError(f"{key} {path!r} is quantized with {method} (its config.json's quantization_config), and "
                          f"loading it needs {' and '.join(missing)}, which is not installed: pip install "
                          f"{' '.join(repr(p) for p in missing)} (or use the model's 16-bit checkpoint, with "
                          "quantization_bit: 4 to quantize it with bitsandbytes).")
    if sharded and method not in DEQUANTIZED_ON_LOAD and method != "bitsandbytes":
        raise ConfigError(f"{key} {path!r} is quantized with {method}: DeepSpeed ZeRO-3 and FSDP cannot shard its "
                          "packed weights. Train it without ZeRO-3/FSDP, or use the 16-bit checkpoint with "
                          "quantization_bit: 4.")
    if model_args.quantization_bit is not None:
        logger.warning("quantization_bit: %d does not apply: %s is already quantized with %s, and loads as it is.",
                       model_args.quantization_bit, path, method)
    return method


def bnb_config(model_args, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig of quantization_bit, quantization_type and double_quantization. 4-bit weights compute
    in `compute_dtype` and are stored packed in it too (so ZeRO-3 and FSDP can shard them)."""
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"quantization_bit: {model_args.quantization_bit} needs bitsandbytes: pip install "
                          "'zerotune[qlora]' (bitsandbytes >= 0.50, which also runs on the CPU).") from None
    if model_args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.quantization_type,
                              bnb_4bit_use_double_quant=model_args.double_quantization,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype)


def _device_map(model_args) -> str | dict | None:
    """Where a bitsandbytes model loads: it cannot be moved once quantized (transformers' Trainer leaves it where it
    is), so straight onto this process's GPU (LOCAL_RANK), or the CPU; quantization_device_map: auto (chat) lets
    accelerate spread it. Under ZeRO-3 none (transformers refuses one there): bitsandbytes' quantizer places it on the
    current device, and DeepSpeed partitions it when it builds its engine."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if model_args.quantization_device_map == "auto":
        return "auto"
    if is_deepspeed_zero3_enabled():
        return None
    if torch.cuda.is_available():
        return {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}
    return {"": "cpu"}


def load_kwargs(model_args, model_config, dtype: torch.dtype, quantize: bool, path: str, key: str,
                sharded: bool = False) -> dict:
    """from_pretrained's quantization arguments: none for a 16-bit load; for a checkpoint quantized ahead, its own
    config (checked first); with quantization_bit and `quantize`, bitsandbytes' config and a device map."""
    method = check_prequantized(model_config, path, key, model_args, sharded)
    if method is not None:
        logger.info("%s is a %s-quantized checkpoint: loading it through transformers' %s quantizer.", path, method,
                    method)
        return {}
    if not quantize or model_args.quantization_bit is None:
        return {}
    if model_args.quantization_method == "bitsandbytes":
        logger.info("quantization_method: bitsandbytes is read as bnb (LLaMA-Factory 0.9.5 knows only 'bnb' and, "
                    "given its own example's 'bitsandbytes', loads the model unquantized without a word).")
    if model_args.quantization_bit == 8:
        # bitsandbytes casts a bf16 input of each int8 matmul to fp16 and warns at every call: said here once.
        warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
        if dtype == torch.bfloat16:
            logger.info("8-bit: bitsandbytes computes each int8 matmul's input in fp16 (bf16 activations are cast).")
    placed = _device_map(model_args)
    return {"quantization_config": bnb_config(model_args, dtype), **({"device_map": placed} if placed else {})}


def _bits(module: nn.Module) -> int | None:
    """4 or 8 for a bitsandbytes Linear, None for any other module (bitsandbytes imported only if loaded)."""
    import sys

    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return 4
    if isinstance(module, bnb.nn.Linear8bitLt):
        return 8
    return None


def is_quantized(model: nn.Module) -> bool:
    """Loaded in 4 or 8 bits by bitsandbytes, or from a checkpoint quantized ahead."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_quantized", False) or getattr(base, "is_loaded_in_4bit", False)
                or getattr(base, "is_loaded_in_8bit", False))


def _base_linears(model: nn.Module):
    """(name, module) of the model's own Linear layers: not the adapters' (lora_A, lora_B, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and isinstance(getattr(module, "weight", None), torch.Tensor) and \
                not any(part.startswith("lora_") for part in name.split(".")):
            yield name, module


def quantized_linears(model: nn.Module) -> dict:
    """{bits: [layers, weights, bytes stored]} of the bitsandbytes Linear layers, and {"unquantized": [...]} of the
    model's other Linear layers (the output head, which transformers keeps unquantized, and any it skips)."""
    found: dict = {}
    for _, module in _base_linears(model):
        bits = _bits(module) or "unquantized"
        row = found.setdefault(bits, [0, 0, 0])
        row[0] += 1
        row[1] += numel(module.weight)
        row[2] += stored_bytes(module.weight)
    return found


def _kind_of_4bit(model: nn.Module) -> str:
    """' NF4, double quantization' as the first 4-bit weight's quant_state says (a checkpoint quantized ahead may
    differ from quantization_type / double_quantization)."""
    state = next((m.weight.quant_state for _, m in _base_linears(model) if _bits(m) == 4
                  and getattr(m.weight, "quant_state", None) is not None), None)
    if state is None:
        return ""
    return f" {str(state.quant_type).upper()}" + (", double quantization" if state.nested else "")


def describe(model: nn.Module) -> str | None:
    """One line on what bitsandbytes quantized, in how many bytes against the 16-bit weights (None: nothing)."""
    found = quantized_linears(model)
    rows = [(bits, found[bits]) for bits in (4, 8) if bits in found]
    if not rows:
        return None
    total = sum(row[0] for row in found.values())
    parts = []
    for bits, (layers, weights, stored) in rows:
        kind = _kind_of_4bit(model) if bits == 4 else ""
        parts.append(f"{layers} of {total} Linear layers in {bits}-bit{kind}: {weights / 1e6:.2f}M weights in "
                     f"{stored / MB:.2f} MB ({8 * stored / max(weights, 1):.2f} bits a weight with their scales; "
                     f"{2 * weights / MB:.2f} MB in 16-bit)")
    left = found.get("unquantized")
    if left:
        names = sorted({name.split(".")[-1] for name, m in _base_linears(model) if _bits(m) is None})
        parts.append(f"left unquantized: {left[0]} ({', '.join(names)}: transformers keeps the output head and tied "
                     "weights as they are)")
    return "bitsandbytes: " + "; ".join(parts) + "."


def prepare_for_training(model: nn.Module) -> None:
    """PEFT's k-bit preparation (prepare_model_for_kbit_training), step by step as zerotune needs it: the base is
    frozen; gradient checkpointing is non-reentrant (transformers enables the input gradients it would need
    otherwise); the norms normalise and the loss head takes its softmax in fp32 already (zerotune's lean RMSNorm,
    transformers' own norms, the chunked loss), so the embeddings, norms and head stay in the compute dtype where
    PEFT would cast every one of them to fp32 (for a 128k-vocabulary 70B: 4 GB more for the same numbers)."""
    for p in model.parameters():
        p.requires_grad_(False)
    repacked = _keep_cpu_layout(model)
    if repacked:
        logger.info("bitsandbytes' CPU inference repacking is off in the %d 4-bit layers of this trained model: at the "
                    "first eval-mode forward without gradient (an evaluation) it repacks the weights for a kernel "
                    "that has no backward, and from then on no gradient flows through those layers (bitsandbytes "
                    "0.50, CPUs with AVX512-bf16).", repacked)
    kept = sum(numel(p) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32
               and getattr(p, "quant_state", None) is None and type(p).__name__ not in ("Params4bit", "Int8Params"))
    if kept:
        logger.info("k-bit preparation: the base frozen, its %.2fM 16-bit weights (embeddings, norms, head) kept in "
                    "16-bit: the norms and the loss compute in fp32 anyway (PEFT's prepare_model_for_kbit_training "
                    "would hold them in fp32, %.1f MB more).", kept / 1e6, 2 * kept / MB)


def own_cpu_weights(model: nn.Module) -> int:
    """Copy the unquantized weights that a quantized load left on the CPU (embeddings, norms, head) out of the
    checkpoint's memory map; returns how many weights. transformers hands them over as views of the mapped
    safetensors file, and one view keeps the whole mapping alive: every page that quantization read (the whole
    16-bit checkpoint) then stays resident, counted in the process's RSS, for the whole run."""
    copied = 0
    for p in model.parameters():
        if p.device.type == "cpu" and p.is_floating_point() and _bits_of_parameter(p) is None:
            p.data = p.data.clone()
            copied += numel(p)
    if copied:
        logger.info("Quantized load: its %.2fM 16-bit weights copied out of the checkpoint's memory map, which is "
                    "released (else the 16-bit checkpoint's pages would stay in RSS).", copied / 1e6)
    return copied


def _bits_of_parameter(p: torch.Tensor) -> str | None:
    """bitsandbytes' own parameter types (their packed storage may be a float dtype), by name."""
    return type(p).__name__ if type(p).__name__ in ("Params4bit", "Int8Params") else None


def _keep_cpu_layout(model: nn.Module) -> int:
    """Turn off Linear4bit's CPU repacking (support_avx512bf16_for_cpu) in every 4-bit layer; returns how many had
    it on."""
    found = 0
    for module in model.modules():
        if _bits(module) == 4 and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            found += 1
    return found


# ---- zerotune check: quantized weights counted at their real bytes, from the config alone --------------------------

def bytes_per_weight(bits: int, double_quantization: bool = True, blocksize: int = 64) -> float:
    """A quantized weight's bytes, its scales included. 4-bit: half a byte, plus one absmax a block of `blocksize`
    (fp32, or uint8 under double quantization with one fp32 absmax a 256 of those blocks); 8-bit: one byte, plus
    an fp32 scale a row (negligible at any real width: not counted here)."""
    if bits == 8:
        return 1.0
    scales = (1 + 4 / 256) / blocksize if double_quantization else 4 / blocksize
    return 0.5 + scales


def _get(qc, *keys):
    """The first of `keys` that a quantization_config (a dict or transformers' config object) sets."""
    for key in keys:
        value = qc.get(key) if isinstance(qc, dict) else getattr(qc, key, None)
        if value is not None:
            return value
    return None


def checkpoint_bytes_per_weight(model_config) -> tuple[str, float | None, str] | None:
    """A checkpoint quantized ahead: (method, bytes a quantized weight takes with its scales, how they were read from
    its quantization_config), bytes None where the method's layout is not known here; None for a 16-bit checkpoint.
    GPTQ and AWQ pack `bits` a weight, with an fp16 scale and a packed zero point a group of `group_size` weights
    of a row (group_size -1: one a row, negligible); AQLM's codes take num_codebooks x nbits_per_codebook bits a
    group of in_group_size weights (its codebooks, a few MB a model, not counted); bitsandbytes as it quantizes."""
    method = prequantized_method(model_config)
    if method is None:
        return None
    qc = model_config.quantization_config
    if method == "bitsandbytes":
        if _get(qc, "load_in_4bit"):
            double = bool(_get(qc, "bnb_4bit_use_double_quant"))
            kind = str(_get(qc, "bnb_4bit_quant_type") or "fp4").upper()
            return method, bytes_per_weight(4, double), f"4-bit {kind}" + (", double quantization" if double else "")
        return method, bytes_per_weight(8), "8-bit"
    if method == "aqlm":
        codebooks, nbits, group = (_get(qc, "num_codebooks"), _get(qc, "nbits_per_codebook"),
                                   _get(qc, "in_group_size"))
        if codebooks and nbits and group:
            bits = codebooks * nbits / group
            return method, bits / 8, f"{bits:g} bits a weight ({codebooks} codebooks of {nbits} bits a group of {group})"
    bits = _get(qc, "bits", "w_bit")  # w_bit, q_group_size: AutoAWQ's own names
    if method in DEQUANTIZED_ON_LOAD or not bits:
        return method, None, f"{method}: its bytes a weight are not known here"
    group = _get(qc, "group_size", "q_group_size") or -1
    if group > 0:
        return method, bits / 8 + (2 + bits / 8) / group, f"{bits}-bit, group_size {group}"
    return method, bits / 8, f"{bits}-bit, one scale a row"

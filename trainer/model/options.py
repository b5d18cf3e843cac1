"""The model group's keys: which model (and adapters) load and how (model/loading.py), how it is fine-tuned
(model/adapters.py), and how inference and export load it (trainer/inference.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trainer.errors import ConfigError
from trainer.options import split_list

logger = logging.getLogger(__name__)

FINETUNING_TYPES = ("lora", "freeze", "full")
FLASH_ATTN = ("auto", "fa2", "sdpa", "eager", "disabled")
# LLaMA-Factory's quantization_method values (plus "bitsandbytes", which LF's own example YAML writes); only bnb
# quantizes as the model loads, the others name how a checkpoint was quantized (model/quantization.py).
QUANTIZATION_METHODS = ("bnb", "bitsandbytes", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4", "fp8")


@dataclass
class QuantizationArguments:
    """QLoRA: the base model quantized by bitsandbytes as it loads (model/quantization.py), LoRA trained over it."""
    quantization_bit: int | None = field(default=None, metadata={
        "help": "4 or 8: quantize the base model's Linear layers with bitsandbytes as it loads (QLoRA; LoRA only)."})
    quantization_method: str = field(default="bnb", metadata={"choices": QUANTIZATION_METHODS})
    quantization_type: str = field(default="nf4", metadata={"choices": ("nf4", "fp4"), "help": "4-bit data type."})
    double_quantization: bool = field(default=True, metadata={
        "help": "4-bit: quantize the per-block scales too (~0.37 bit a weight less)."})
    quantization_device_map: str | None = field(default=None, metadata={
        "choices": ("auto",), "help": "chat only: auto spreads a quantized model over the GPUs and the CPU."})


@dataclass
class ModelArguments(QuantizationArguments):
    model_name_or_path: str | None = field(default=None, metadata={"help": "Local folder or hub id."})
    adapter_name_or_path: str | None = field(default=None, metadata={"help": "LoRA adapter to load."})
    trust_remote_code: bool = False
    cache_dir: str | None = None
    model_revision: str = "main"
    hf_hub_token: str | None = None
    flash_attn: str = field(default="auto", metadata={"choices": FLASH_ATTN})
    enable_liger_kernel: bool = False
    chunked_loss: bool = field(default=True, metadata={"help": "Loss without full logits (chunked head)."})
    use_fast_tokenizer: bool = True

    @property
    def adapters(self) -> list[str]:
        """adapter_name_or_path as the list it is (a comma list, applied in order, as in LLaMA-Factory)."""
        return split_list(self.adapter_name_or_path)


@dataclass
class FinetuningArguments:
    stage: str = field(default="sft", metadata={"help": "A registered stage plugin (trainer/stages)."})
    finetuning_type: str = field(default="lora", metadata={"choices": FINETUNING_TYPES})
    lora_target: list[str] = field(default_factory=lambda: ["all"])
    lora_rank: int = 8
    lora_alpha: int | None = field(default=None, metadata={"help": "Default: 2 * lora_rank."})
    lora_dropout: float = 0.0
    additional_target: list[str] | None = None
    train_new_token_rows: bool = field(default=True, metadata={
        "help": "LoRA: train the embedding and head rows of the template's stop tokens and the labels' tokens whose "
                "rows look never trained (new tokens), saved with the adapter (PEFT's trainable_token_indices)."})
    freeze_trainable_layers: int = 2
    freeze_trainable_modules: list[str] = field(default_factory=lambda: ["all"])
    freeze_extra_modules: list[str] | None = None


INFER_DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass
class InferenceArguments:
    """Predict, chat and export (LLaMA-Factory's keys). Generation settings are trainer.generation's."""
    predict_with_generate: bool = field(default=False, metadata={
        "help": "do_predict: generate an answer for every eval example and score it (BLEU-4, ROUGE)."})
    infer_backend: str = field(default="huggingface", metadata={"choices": ("huggingface", "vllm", "sglang")})
    infer_dtype: str = field(default="auto", metadata={"choices": INFER_DTYPES})
    skip_special_tokens: bool = True


@dataclass
class ExportArguments:
    export_dir: str | None = None
    export_size: int = field(default=5, metadata={"help": "GB per weights shard."})
    export_device: str = field(default="cpu", metadata={"choices": ("cpu", "auto")})
    export_legacy_format: bool = field(default=False, metadata={"help": "true: .bin files instead of safetensors."})
    export_dtype: str | None = field(default=None, metadata={
        "choices": INFER_DTYPES, "help": "The exported weights' dtype (default: infer_dtype's choice)."})
    export_untrained_stop_tokens: bool = field(default=False, metadata={
        "help": "true: export even though a stop token's rows are new and untouched by the adapters (a warning)."})


def check_backend(inference: InferenceArguments) -> None:
    if inference.infer_backend != "huggingface":
        raise ConfigError(f"infer_backend: {inference.infer_backend} is not supported: zerotune generates with "
                          "transformers (infer_backend: huggingface, the default). To serve with "
                          f"{inference.infer_backend}, export the model (zerotune export) and point "
                          f"{inference.infer_backend} at export_dir.")


def bitsandbytes_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def check_quantization(model: ModelArguments, finetuning: FinetuningArguments, do_train: bool, sharded: bool) -> None:
    """quantization_bit against the rest of the run, as LLaMA-Factory checks it, and where LF would quietly do
    something else (a method that quantizes nothing on the fly), refused by name. `sharded`: ZeRO-3 or FSDP."""
    bits, method = model.quantization_bit, model.quantization_method
    if bits is None:
        unused = [k for k, default in (("quantization_method", "bnb"), ("quantization_type", "nf4"),
                                       ("double_quantization", True), ("quantization_device_map", None))
                  if getattr(model, k) != default and not (k == "quantization_method" and method == "bitsandbytes")]
        if unused:
            logger.warning("%s set, but quantization_bit is not: nothing is quantized (a checkpoint quantized ahead "
                           "loads as saved whatever they say).", ", ".join(unused))
        return
    if method in ("gptq", "awq", "aqlm", "quanto", "mxfp4", "fp8"):
        raise ConfigError(f"quantization_method: {method} quantizes nothing as the model loads: a checkpoint already "
                          f"quantized with {method} (its config.json has a quantization_config) loads as it is. "
                          "Remove quantization_bit and quantization_method, or set quantization_method: bnb to "
                          "quantize with bitsandbytes (LLaMA-Factory would train unquantized here without a word).")
    if method in ("hqq", "eetq"):
        raise ConfigError(f"quantization_method: {method} is not supported; quantization_method: bnb (bitsandbytes, "
                          "the default) quantizes to 4 or 8 bits.")
    if bits not in (4, 8):
        raise ConfigError(f"quantization_bit: {bits}: bitsandbytes quantizes to 4 or 8 bits.")
    if not bitsandbytes_installed():
        raise ConfigError(f"quantization_bit: {bits} needs bitsandbytes: pip install 'zerotune[qlora]' (bitsandbytes "
                          ">= 0.50, which also runs on the CPU).")
    if finetuning.finetuning_type != "lora":
        raise ConfigError(f"quantization_bit: {bits} with finetuning_type: {finetuning.finetuning_type}: quantized "
                          "models can only be trained with LoRA (the quantized weights are frozen). Set "
                          "finetuning_type: lora, or remove quantization_bit.")
    if len(model.adapters) > 1:
        raise ConfigError("adapter_name_or_path: a quantized model takes a single adapter (merging the others into "
                          "4-bit weights would round them away). Merge them first (zerotune export), then train "
                          "over the merged model.")
    if model.quantization_device_map and do_train:
        raise ConfigError("quantization_device_map: auto places a quantized model for chat; training places the "
                          "model itself (one device a process). Remove quantization_device_map.")
    if sharded and bits != 4:
        raise ConfigError("quantization_bit: 8 cannot be sharded by ZeRO-3 or FSDP (its int8 weights keep their "
                          "scales beside them); use quantization_bit: 4, whose packed weights are stored in the "
                          "compute dtype and shard like any weight.")

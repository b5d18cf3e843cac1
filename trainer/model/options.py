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
    tiled_mlp: bool = field(default=False, metadata={
        "help": "Run each decoder layer's MLP over the row in shards (DeepSpeed's TiledMLP, model/tiled_mlp.py): its "
                "intermediate activations are kept for one shard, not the row; the MLP's forward runs twice."})
    tiled_mlp_num_shards: int | None = field(default=None, metadata={
        "help": "Shards a row with tiled_mlp (default: ceil(tokens / hidden_size))."})
    chunked_loss: bool = field(default=True, metadata={"help": "Loss without full logits (chunked head)."})
    use_fast_tokenizer: bool = True
    rope_scaling: str | None = field(default=None, metadata={
        "choices": ("linear", "dynamic", "yarn", "llama3"),
        "help": "Stretch RoPE to cutoff_len (factor ceil(cutoff_len / the model's positions); 2 at inference), as "
                "LLaMA-Factory (model/rope.py)."})
    model_max_length: int | None = field(default=None, metadata={
        "help": "The context rope_scaling stretches to; training sets it to cutoff_len."})

    def __post_init__(self):
        if self.tiled_mlp_num_shards is not None and self.tiled_mlp_num_shards < 1:
            raise ConfigError(f"tiled_mlp_num_shards: {self.tiled_mlp_num_shards} must be at least 1 (or unset: "
                              "ceil(tokens / hidden_size)).")
        if self.tiled_mlp_num_shards and not self.tiled_mlp:
            logger.warning("tiled_mlp_num_shards: %d is set but tiled_mlp is not: the MLP is not tiled (set tiled_mlp: "
                           "true to tile it).", self.tiled_mlp_num_shards)

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
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on each LoRA layer's input (PEFT's own forward runs such layers, not the fused one)."})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA: a trained magnitude per output row times the direction of W + BA (PEFT's use_dora)."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale the adapter by alpha / sqrt(r), not "
                                                              "alpha / r (PEFT's use_rslora)."})
    pissa_init: bool = field(default=False, metadata={
        "help": "PiSSA: the adapter starts as the principal part of each weight and the base keeps the residual."})
    pissa_iter: int = field(default=16, metadata={
        "help": "PiSSA's randomized SVD iterations (PEFT's pissa_niter_N); -1: the exact, full SVD."})
    pissa_convert: bool = field(default=False, metadata={
        "help": "At the end of training also write output_dir/pissa_converted: a plain LoRA adapter (rank 2r) that "
                "gives the trained model on the original, unmodified base."})
    create_new_adapter: bool = field(default=False, metadata={
        "help": "With adapter_name_or_path: merge all the given adapters into the base and train a new one."})
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


def check_lora_variants(f: FinetuningArguments, model: ModelArguments, zero3: bool, fsdp: bool) -> None:
    """The LoRA variant keys against each other, the fine-tuning type and the sharding (LLaMA-Factory's refusals, and
    the cases where PEFT would fail later or give a wrong adapter). Turns pissa_convert on where the PiSSA adapter
    alone could not be loaded again (a randomized SVD)."""
    if model.adapter_name_or_path and f.finetuning_type != "lora":
        raise ConfigError("adapter_name_or_path needs finetuning_type: lora.")
    wanted = [k for k in ("use_dora", "use_rslora", "pissa_init", "pissa_convert", "create_new_adapter")
              if getattr(f, k)]
    if wanted and f.finetuning_type != "lora":
        raise ConfigError(f"{', '.join(wanted)}: LoRA only; this run's finetuning_type is {f.finetuning_type}.")
    if f.pissa_iter < -1:
        raise ConfigError(f"pissa_iter: {f.pissa_iter}; use a number of randomized-SVD iterations (0 or more), or -1 "
                          "for the exact SVD.")
    if f.pissa_convert and not f.pissa_init:
        raise ConfigError("pissa_convert converts a PiSSA adapter to plain LoRA: set pissa_init: true too (or remove "
                          "pissa_convert).")
    if f.pissa_init and f.pissa_iter != -1 and not f.pissa_convert:
        # PEFT rebuilds a PiSSA adapter's residual base while loading it, with a new randomized SVD: the adapter in
        # output_dir alone would load as another model (LLaMA-Factory leaves it so). Its conversion is what loads.
        if f.use_dora or fsdp:
            key, why = ("use_dora", "a DoRA adapter has no plain LoRA conversion") if f.use_dora else \
                ("fsdp", "the conversion needs the unsharded model")
            raise ConfigError(f"pissa_init with pissa_iter: {f.pissa_iter} (a randomized SVD) and {key}: the adapter "
                              "could not be loaded again as the trained model (PEFT rebuilds its residual with a new "
                              f"random SVD, and {why}). Set pissa_iter: -1 (the exact SVD, which PEFT rebuilds "
                              "identically).")
        logger.warning("pissa_init with pissa_iter: %d (a randomized SVD): PEFT rebuilds the adapter's residual base "
                       "with a new random SVD whenever it loads it, so output_dir's PiSSA adapter alone would load as "
                       "another model. Turning pissa_convert on: output_dir/pissa_converted will hold the plain LoRA "
                       "adapter that loads as the trained model (zerotune's export, chat and adapter_name_or_path "
                       "take it from there).", f.pissa_iter)
        f.pissa_convert = True
    if f.pissa_convert and f.use_dora:
        raise ConfigError("pissa_convert writes a plain LoRA delta (W + BA), and a DoRA adapter's weight is not one "
                          "(its magnitude rescales every row): use one of pissa_convert and use_dora.")
    if f.pissa_init and zero3:
        raise ConfigError("pissa_init decomposes each whole weight matrix when the adapter is made, and ZeRO-3 has "
                          "partitioned them as they loaded (LLaMA-Factory refuses it too): use ZeRO-2, fsdp or one "
                          "process.")
    if f.pissa_convert and fsdp:
        raise ConfigError("pissa_convert converts the adapter on the whole (unsharded) model at the end of "
                          "training; fsdp holds it sharded. Train without pissa_convert, or with deepspeed ZeRO-2.")
    if model.adapters and f.pissa_init and not f.create_new_adapter:
        raise ConfigError("pissa_init initialises a new adapter, and with adapter_name_or_path this run trains the "
                          "given adapter further: set create_new_adapter: true to merge it and start a PiSSA adapter.")
    if model.adapters and f.create_new_adapter and zero3:
        raise ConfigError("create_new_adapter merges adapter_name_or_path into the base weights, which ZeRO-3 "
                          "partitions as they load: merge them first (zerotune export) and give the merged folder "
                          "as model_name_or_path.")


"""The model group's keys: which model (and adapters) load and how (model/loading.py), how it is fine-tuned
(model/adapters.py), and how inference and export load it (trainer/inference.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.errors import ConfigError
from trainer.options import split_list

FINETUNING_TYPES = ("lora", "freeze", "full")
FLASH_ATTN = ("auto", "fa2", "sdpa", "eager", "disabled")


@dataclass
class ModelArguments:
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
    rope_scaling: str | None = field(default=None, metadata={
        "choices": ("linear", "dynamic", "yarn", "llama3"),
        "help": "Stretch RoPE to cutoff_len (factor ceil(cutoff_len / the model's positions); 2 at inference), as "
                "LLaMA-Factory (model/rope.py)."})
    model_max_length: int | None = field(default=None, metadata={
        "help": "The context rope_scaling stretches to; training sets it to cutoff_len."})

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

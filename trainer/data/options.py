"""The data group's keys (LLaMA-Factory's names and defaults): what data/ reads to build token ids and rows."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.errors import ConfigError


@dataclass
class DataArguments:
    dataset: list[str] | None = None
    eval_dataset: list[str] | None = None
    dataset_dir: str = "data"
    template: str | None = None
    cutoff_len: int = 2048
    max_samples: int | None = None
    val_size: float = 0.0
    packing: bool | None = field(default=None, metadata={
        "help": "Pack examples across batches into rows of cutoff_len (fewer, fuller steps). Default: true for pt, "
                "false otherwise, as in LLaMA-Factory."})
    neat_packing: bool = field(default=False, metadata={"help": "Alias of packing: true (never contaminated)."})
    padding_free: bool = field(default=True, metadata={
        "help": "Lay each micro-batch's examples end to end in one row, without padding (the steps hold the same "
                "examples either way). false: one right-padded example a row (needs packing: false)."})
    train_on_prompt: bool = False
    mask_history: bool = False
    overwrite_cache: bool = False
    streaming: bool = field(default=False, metadata={"help": "Read, tokenize and pack on the fly (needs max_steps)."})
    preprocessing_num_workers: int | None = None
    preprocessing_batch_size: int = 1000
    default_system: str | None = None
    enable_thinking: bool = field(default=True, metadata={
        "help": "Reasoning templates (qwen3, deepseekr1, glm4_moe, ...), as LLaMA-Factory: true trains an empty "
                "thought block in front of replies that have none; false drops the replies' thoughts and puts the "
                "empty block in the prompt, untrained."})
    preserve_thinking: bool = field(default=False, metadata={
        "help": "Reasoning templates: keep the thoughts of history replies where they would be dropped (preference "
                "and kto prompts, and sft with mask_history)."})
    tool_format: str | None = field(default=None, metadata={
        "help": "Write tool lists and calls in this format instead of the template's (default, qwen, llama3, "
                "mistral, glm4, ...)."})
    max_bad_rows: float = field(
        default=0.1, metadata={"help": "Malformed rows tolerated per dataset: a fraction (< 1) or a count (>= 1)."})
    cutoff_policy: str = field(default="truncate", metadata={
        "choices": ("truncate", "drop"), "help": "Examples longer than cutoff_len: truncate them or drop them."})
    tokenized_path: str | None = field(default=None, metadata={
        "help": "As in LLaMA-Factory: load the tokenized training data saved here, or tokenize and save it here."})
    tokenized_cache_dir: str | None = field(
        default=None, metadata={"help": "Where tokenized data is cached (default ~/.cache/zerotune/tokenized)."}
    )

    def check(self) -> None:
        """The data keys' own checks (config.py checks what spans groups)."""
        if self.cutoff_len < 2:
            raise ConfigError(f"cutoff_len: {self.cutoff_len} must be at least 2.")
        if self.val_size < 0 or (self.val_size >= 1 and not float(self.val_size).is_integer()):
            raise ConfigError(f"val_size: {self.val_size} must be a fraction in [0, 1) or a whole number of examples.")
        if self.val_size and self.eval_dataset:
            raise ConfigError("Set val_size or eval_dataset, not both: val_size would hold examples out of training "
                              "that eval_dataset then replaces.")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ConfigError(f"max_samples: {self.max_samples} must be positive.")

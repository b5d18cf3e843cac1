"""The data group's keys (LLaMA-Factory's names and defaults): what data/ reads to build token ids and rows."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    max_bad_rows: float = field(
        default=0.1, metadata={"help": "Malformed rows tolerated per dataset: a fraction (< 1) or a count (>= 1)."})
    cutoff_policy: str = field(default="truncate", metadata={
        "choices": ("truncate", "drop"), "help": "Examples longer than cutoff_len: truncate them or drop them."})
    tokenized_path: str | None = field(default=None, metadata={
        "help": "As in LLaMA-Factory: load the tokenized training data saved here, or tokenize and save it here."})
    tokenized_cache_dir: str | None = field(
        default=None, metadata={"help": "Where tokenized data is cached (default ~/.cache/zerotune/tokenized)."}
    )

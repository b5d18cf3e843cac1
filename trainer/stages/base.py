"""What a stage is: a plugin built from the config that owns everything stage-specific.

A stage never owns a training loop, a model loader or packing; those are shared. It answers:
- `options`: a dataclass of its own YAML keys (the pref_*, kto_*, ppo_* families), parsed and validated by
  trainer/config.py with the same did-you-mean errors as every other key, and refused for any other stage;
- `data_kind`: what processing builds from its datasets (processing dispatches on it, never on a name);
- `collator()`: how dataset items become one batch (by default the padding-free segment layout);
- `count_items(batch)`: how many items of its loss one micro-batch holds (trained tokens for sft/pt, pairs for
  rm/dpo); the engine sums this over the accumulated batch and every process and divides by it;
- `compute(wrapper, model, batch)`: its loss as a sum over items, plus per-item statistics (sums and counts)
  that the engine adds up exactly, for the logs and for eval.

This module imports no torch at module level: the config reads the stage registry to validate keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.registry import Registry

# The only list of stages: each stage file registers its class here (trainer/stages/__init__.py imports them all).
STAGES = Registry("stage", "This version trains")


@dataclass
class StageOutput:
    """One micro-batch through a stage.

    loss_sum: the sum of the per-item losses (a scalar tensor); the engine divides by the global item count.
    items: how many items this micro-batch holds (the same number count_items gives).
    stats: name -> (sums, counts), tensors of one entry per dataset item of the batch. The engine logs
    sum(sums) / sum(counts) over a logging window, and in eval over the whole eval set, so the figures never
    depend on the batch size, the accumulation or the number of processes. "loss" is always among them. counts
    None: a count, logged as the window's sum (Stage.summarize turns the totals into the logged figures).
    """
    loss_sum: Any
    items: Any
    stats: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    head_tokens: Any = None  # labelled tokens the loss head computed (MFU; default: items)
    reference_passes: int = 0  # no-grad forwards of a reference model over the same batch (MFU)
    batch: Any = None  # the batch the stage built and ran, when not the collated one (ppo): tokens/s and MFU count it


@dataclass
class NoOptions:
    """A stage without keys of its own."""


class Stage:
    name: str = ""
    data_kind: str = "supervised"  # what processing.tokenized_dataset builds
    needs_padding_free: bool = False  # its items are several sequences end to end (the pair stages)
    wants_segments: bool = False  # asks the loader for zerotune_segments attention (the one that reads shared prompts)
    predicts: bool = False  # do_predict generates its answers and scores them (sft, as in LLaMA-Factory)
    needs_template: bool = True
    packing_default: bool = False  # as in LLaMA-Factory: pt packs by default, the chat stages do not
    item_name: str = "examples"  # what one dataset item is, in the log
    batch_item_name: str | None = None  # what per_device_train_batch_size counts when not dataset items (grpo)
    plotted: tuple = ("loss", "eval_loss")  # what plot_loss draws from the log history
    options: type = NoOptions
    # Under sequence parallelism (engine/sequence_parallel.py): False (refused), "shard" (its loss adds up over the
    # shards of a row: the engine cuts the batch) or "rows" (it reads whole rows of per-token losses: the wrapper runs
    # each shard and gathers them back).
    sequence_parallel: bool | str = False

    def __init__(self, config=None, options=None):
        n = getattr(getattr(config, "engine", None), "sequence_parallel_size", 1)
        if n > 1 and not self.sequence_parallel:
            from trainer.errors import ConfigError

            raise ConfigError(f"sequence_parallel_size: {n} is supported for stages pt, sft, rm, dpo, orpo and kto; "
                              f"stage {self.name} trains on answers it generates, through a forward (per-token "
                              "log-probs, values, entropies) that zerotune does not cut into shards and gather back "
                              "yet. Train it with sequence_parallel_size: 1 (ZeRO-3 and gradient checkpointing for "
                              "memory).")
        self.config = config
        self.opts = options if options is not None else self.options()

    # ---- data ------------------------------------------------------------------------------------
    def collator(self, pad_token_id: int, padding_free: bool = True):
        from trainer.data.collators import Collator

        return Collator(pad_token_id, padding_free=padding_free)

    def count_items(self, batch: dict):
        """Items of the loss in this micro-batch (a tensor), counted from the batch before the forward pass."""
        raise NotImplementedError

    def extend_model(self, model):
        """Called right after the adapters are in place and before sharding: add what the stage trains beside the
        language model (the rm stage's value head). Returns the model."""
        return model

    def prepare(self, model, wrapper) -> None:
        """Called once the model is ready (adapters in place, loss head patched) and before the engine wraps it, in
        training and eval-only runs alike."""

    def steps_per_epoch(self, items: int, batch: int, accumulation: int, world: int) -> int:
        """Optimizer steps one pass over `items` dataset items takes (ppo visits each buffer ppo_epochs times)."""
        return -(-(-(-items // (batch * world))) // accumulation)

    def micro_batch_tokens(self, config) -> int:
        """The most tokens one micro-batch holds (activation memory: gradient_checkpointing auto)."""
        d = config.data
        return config.training.per_device_train_batch_size * (d.cutoff_len if d.packing else min(d.cutoff_len, 2048))

    def train_items(self, dataset):
        """The training dataset as the engine iterates it (ppo: keys its sampler yields, the prompts read by the
        stage itself)."""
        return dataset

    def train_sampler(self, trainer, dataset):
        """The order of the training items (None: the engine's shuffled order). ppo visits each buffer of prompts
        ppo_epochs times (stages/rollout_sampler.py)."""
        return None

    def before_step(self, trainer, batch_samples: list[dict]) -> None:
        """Called with one optimizer step's micro-batches (this process's) before any is counted or computed: an
        online stage samples its responses here."""

    def save_process_state(self, folder: str, rank: int) -> None:
        """Called on every process whenever a checkpoint is written (into its folder, before it is published): what
        this process alone holds that a resume needs (ppo's sampled buffer)."""

    def load_state(self, folder: str) -> None:
        """Called before training resumes from a checkpoint folder, in every run and on every process: restore what
        save_extra wrote besides weights (ppo's KL coefficient and score statistics)."""

    def before_training(self, trainer) -> None:
        """Called once the engine has wrapped the model (and restored a checkpoint), before the first step: the
        place for a pass over the data that training then reads (precomputed reference log-probs)."""

    def save_extra(self, folder: str, state_dict: dict | None) -> None:
        """Called on the main process whenever the model is saved (checkpoints and output_dir), with the gathered
        state dict when the weights are sharded: write what the model's own files leave out."""

    def load_extra(self, folder: str) -> None:
        """Called when a checkpoint's weights are loaded back (resume) outside DeepSpeed and FSDP, whose own
        checkpoints restore every parameter."""

    # ---- loss ------------------------------------------------------------------------------------
    def compute(self, wrapper, model, batch: dict) -> StageOutput:
        raise NotImplementedError

    def summarize(self, totals: dict[str, tuple[float, float | None]]) -> dict[str, float]:
        """The logged figures from each statistic's (sum, count) over a window or the eval set: the mean, or the
        sum for a count (count None). A stage adds figures derived from them (kto's rewards/margins)."""
        # A statistic no item of the window had (kto's rewards/chosen in a window of undesirable examples only) is
        # left out rather than logged as 0.
        return {name: s if c is None else s / c for name, (s, c) in totals.items() if c is None or c > 0}


def register(cls: type[Stage]) -> type[Stage]:
    return STAGES.register(cls.name)(cls)


def build_stage(config) -> Stage:
    """The stage of a RunConfig, with its parsed options."""
    return STAGES.lookup(config.finetuning.stage)(config, config.stage_options)

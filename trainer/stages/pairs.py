"""What the stages on pairs share: the pair layout (Pairwise) and the reference model (ReferenceStage).

Pairwise: one item of the loss is two sequences end to end (a preference pair's chosen and rejected answers), laid
padding-free with the other items of the micro-batch; with
pref_prefix_sharing (the default where the attention path reads it) the second sequence attends to the first
one's prompt instead of computing it again (collators.shared_prompt, kernels.segment_attention).

ReferenceStage: the reference model of dpo and kto (whose item is one example, with its mismatched pair in a batch
of its own: kto.py). A LoRA run's is the same weights with the adapters switched off
(no second copy); a full or freeze run keeps a frozen copy of its starting weights in the compute dtype, placed
like the policy; ref_model (+ ref_model_adapters) loads a separate one, placed the same way (model/reference.py). precompute_ref_log_probs (reference_logps.py) computes the reference's
log-probs in one pass before training, so training runs the policy alone and full/freeze runs need no copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from trainer.engine.options import zero_stage
from trainer.errors import ConfigError
from trainer.model.adapters import peft_model, reference_context
from trainer.model.reference import frozen_dtype, load_frozen, placed_separately, shard_like_policy, sharded_module, \
    starting_copy
from trainer.options import split_list
from trainer.stages.base import Stage

logger = logging.getLogger(__name__)


@dataclass
class PairOptions:
    # The prompt computed once a pair (the rejected sequence attends to the chosen one's prompt): exact, on by
    # default wherever the attention path supports it (zerotune_segments, flash_attn: auto).
    pref_prefix_sharing: bool = True


@dataclass
class ReferenceOptions(PairOptions):
    # TRL's key (LLaMA-Factory has none): the reference's log-probs computed once before training, then read.
    precompute_ref_log_probs: bool = False
    # LLaMA-Factory's: a separate reference model (a folder), with adapters merged into it (a comma list).
    ref_model: str | None = None
    ref_model_adapters: str | None = None


@dataclass
class PolicyOptions(ReferenceOptions):
    """The keys of every loss that weighs the policy against the reference (dpo's family, kto)."""
    pref_beta: float = 0.1
    pref_ftx: float = 0.0  # LLaMA-Factory's: the SFT loss of the preferred answers, added with this weight

    def __post_init__(self):
        if self.pref_beta <= 0:
            raise ConfigError(f"pref_beta: {self.pref_beta} must be positive.")
        if self.pref_ftx < 0:
            raise ConfigError(f"pref_ftx: {self.pref_ftx} must be non-negative.")


class Pairwise(Stage):
    """A stage whose item is one preference pair: its chosen and rejected sequences, end to end, the rejected one
    sharing the chosen one's prompt where the attention path allows (pref_prefix_sharing)."""
    data_kind = "pairwise"
    item_name = "pairs"
    options = PairOptions
    needs_padding_free = True

    def __init__(self, config=None, options=None):
        super().__init__(config, options)
        self.shares_prefix = self.opts.pref_prefix_sharing

    @property
    def wants_segments(self) -> bool:
        """Ask the loader for zerotune_segments: the one attention path that reads shared prompts."""
        return self.opts.pref_prefix_sharing

    def extend_model(self, model):
        from trainer.model.kernels import SEGMENTS

        attention = getattr(model.config, "_attn_implementation", None)
        if self.shares_prefix and attention != SEGMENTS:
            logger.info("pref_prefix_sharing: off with %s attention (it needs flash_attn: auto and a model that "
                        "zerotune_segments covers); each pair's prompt is computed twice.", attention)
            self.shares_prefix = False
        elif self.shares_prefix:
            logger.info("pref_prefix_sharing: each pair's prompt is computed once, the rejected answer attending "
                        "to the chosen sequence's prompt.")
        return model

    def collator(self, pad_token_id: int, padding_free: bool = True):
        from trainer.data.collators import Collator

        return Collator(pad_token_id, padding_free=padding_free, share_prefix=self.shares_prefix)

    @staticmethod
    def by_item(stats: dict, batch: dict) -> dict:
        """Per-pair statistics -> per dataset item (a packed item holds several pairs): the engine's eval gathers
        one row per item across processes, so every process must report one per item it holds."""
        per_item = batch["item_segments"] // 2
        index = torch.repeat_interleave(torch.arange(len(per_item), device=per_item.device), per_item)

        def add(values):
            if values is None:
                return None
            return values.new_zeros(len(per_item)).index_add_(0, index.to(values.device), values)

        return {name: (add(sums), add(counts)) for name, (sums, counts) in stats.items()}

    def count_items(self, batch: dict):
        # Pairs, not dataset items: a packed item holds several pairs (two sequences each).
        return batch["item_lengths"].new_tensor((len(batch["cu_seq_lens_q"]) - 1) // 2)


class ReferenceStage(Pairwise):
    """A pair stage whose loss compares the policy with a reference model."""
    options = ReferenceOptions

    def __init__(self, config=None, options=None):
        super().__init__(config, options)
        self.needs_reference = self.reference_needed()
        self.reference = None  # a frozen copy of the starting weights, or ref_model (prepare)
        self.reference_adapter = None  # LoRA continuing adapter_name_or_path: a frozen copy of it (extend_model)
        self.reference_wrapper = None  # ref_model's own loss head
        self.precomputes = self.needs_reference and self.opts.precompute_ref_log_probs
        self.separate_reference = self.needs_reference and bool(self.opts.ref_model)
        if self.opts.ref_model and not self.needs_reference:
            logger.warning("ref_model is not used: this run's loss has no reference model.")
        if config is not None and config.finetuning.pissa_init and self.needs_reference and \
                not self.separate_reference:
            raise ConfigError(f"pissa_init: stage {self.name}'s reference model is the LoRA base with the adapter "
                              "switched off, and PiSSA has replaced that base by its residual (not the model you "
                              "start from). Give the base model as ref_model, or train without pissa_init.")
        if self.opts.ref_model_adapters and not self.opts.ref_model:
            raise ConfigError("ref_model_adapters are merged into ref_model: set ref_model too.")
        if self.opts.ref_model_adapters and config is not None and config.training.deepspeed and \
                zero_stage(config.training.deepspeed) == 3:
            raise ConfigError("ref_model_adapters cannot be merged into a ref_model that ZeRO-3 partitions as it "
                              "loads: merge them first (zerotune export) and give the merged folder as ref_model.")
        # Full and freeze runs without ref_model: the reference is the starting weights, as a copy, or (precomputed)
        # the policy itself before its first step.
        self.reference_is_policy = config is not None and config.finetuning.finetuning_type != "lora" and \
            not self.separate_reference
        self.copies_reference = self.needs_reference and self.reference_is_policy and not self.precomputes
        if self.opts.precompute_ref_log_probs and config is not None and config.data.streaming:
            raise ConfigError("precompute_ref_log_probs needs the whole dataset before training; it cannot run "
                              "over a stream (streaming: true).")

    def reference_needed(self) -> bool:
        return True

    def extend_model(self, model):
        from trainer.model.adapters import keep_starting_adapter

        model = super().extend_model(model)
        if self.needs_reference and not self.separate_reference and self.config is not None and \
                self.config.training.do_train:
            self.reference_adapter = keep_starting_adapter(model, self.config)
        return model

    def prepare(self, model, wrapper) -> None:
        """The reference, frozen, in the compute dtype, placed like the policy: ref_model (adapters merged), or for a
        full/freeze run its starting weights (a copy in one process or under ZeRO-0/2; loaded again and partitioned
        by ZeRO-3 or sharded by FSDP like the policy over several). LoRA runs need none: the reference is the base
        with the adapters off."""
        t = self.config.training
        dtype = frozen_dtype(self.config)
        copy_wanted = self.copies_reference and t.do_train  # an eval-only run's reference is the model it loaded
        if not (self.separate_reference or copy_wanted):
            return
        if not self.separate_reference:
            self.reference, self.reference_wrapper = starting_copy(self.config, model, wrapper, dtype, cast=True)
            return
        from trainer.model.wrapper import ModelWrapper

        o = self.opts
        reference = load_frozen(self.config, o.ref_model, split_list(o.ref_model_adapters), model,
                                dtype or torch.float32, "ref_model", "Reference model")
        self.reference_wrapper = ModelWrapper(reference, chunk_size=wrapper.chunk_size, chunked=wrapper.chunked,
                                              liger=wrapper.liger)
        self.reference = shard_like_policy(self.config, reference, dtype, "Reference model") \
            if placed_separately(self.config) else reference

    def before_training(self, trainer) -> None:
        if not self.precomputes:
            return
        from trainer.data.packing import Items
        from trainer.stages.reference_logps import reference_table

        for name, items in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
            if isinstance(items, Items):
                items.extra["ref_logps"] = reference_table(self, trainer, items, name)

    def reference_rows(self, wrapper, model, batch):
        """[items, 2] reference log-probs of a collated batch, one row a table row: a pair's chosen and rejected
        sequences (kto: an example and its mismatched pair)."""
        return self.reference_logps(wrapper, model, batch).view(-1, 2)

    def reference_for(self, wrapper, model, batch):
        """(each sequence's reference log-prob, reference forwards run): precomputed when the batch carries them."""
        if "ref_logps" in batch:
            return batch["ref_logps"], 0
        return self.reference_logps(wrapper, model, batch), 1

    def reference_logps(self, wrapper, model, batch):
        """Each sequence's summed log-prob under the reference: the frozen copy, the LoRA base (adapters off), or
        for a full/freeze run without a copy the model itself (before training, or in an eval-only run)."""
        import torch

        with torch.no_grad():
            if self.reference is not None:
                return self._sequence_logps(self.reference_wrapper or wrapper, self._placed_reference(batch), batch)[0]
            if peft_model(model) is not None:
                with reference_context(model, self.reference_adapter):
                    return self._sequence_logps(wrapper, model, batch)[0]
            if model.training:  # a training step of a run whose reference was precomputed: never the moved policy
                raise RuntimeError("precomputed reference log-probs are missing from a training batch")
            return self._sequence_logps(wrapper, model, batch)[0]

    def _sequence_logps(self, wrapper, model, batch):
        from trainer.data.collators import segment_sums

        nll, mask = wrapper.token_nll(model, batch)
        return segment_sums(-(nll * mask), batch), segment_sums(mask.to(nll.dtype), batch)

    def _placed_reference(self, batch):
        device = batch["input_ids"].device
        if sharded_module(self.reference):  # placed by FSDP or DeepSpeed
            return self.reference
        if next(self.reference.parameters()).device != device:  # the engine moved the policy after prepare()
            self.reference.to(device)
        return self.reference

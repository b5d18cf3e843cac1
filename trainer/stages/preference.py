"""dpo and orpo: preference training on pairs (LLaMA-Factory's stage dpo with pref_loss, and stage orpo).

One item of the loss is one pair. A pair's chosen and rejected sequences (each prompt + answer) go through the
model in the same padding-free forward as the other pairs of the micro-batch, kept apart by the segment layout,
and with pref_prefix_sharing (the default where the attention path reads it) the prompt is computed once: the
rejected answer attends to the chosen sequence's prompt (collators.shared_prompt, kernels.segment_attention).
Log-probabilities come from the chunked loss head (never full logits), summed per sequence. The reference model
of a LoRA run is the same weights with the adapters switched off (no second copy); a full or freeze run keeps a
frozen copy of its starting weights in the compute dtype, placed like the policy (partitioned by ZeRO-3 or sharded
by FSDP over several processes). The losses are the pure functions of trainer/model/preference_losses.py.

precompute_ref_log_probs (reference_logps.py) computes the reference's log-probs in one pass before training,
so training runs the policy alone, and full/freeze runs need no copy at all. ref_model (+ ref_model_adapters)
loads a separate frozen reference, placed the same way.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from trainer.errors import ConfigError
from trainer.stages.base import Stage, StageOutput, register

logger = logging.getLogger(__name__)

PREF_LOSSES = ("sigmoid", "hinge", "ipo", "simpo", "orpo")


@dataclass
class PairOptions:
    # The prompt computed once a pair (the rejected sequence attends to the chosen one's prompt): exact, on by
    # default wherever the attention path supports it (zerotune_segments, flash_attn: auto).
    pref_prefix_sharing: bool = True


@dataclass
class PreferenceOptions(PairOptions):
    pref_beta: float = 0.1
    pref_loss: str = field(default="sigmoid", metadata={"choices": PREF_LOSSES})
    pref_ftx: float = 0.0
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    # TRL's key (LLaMA-Factory has none): the reference's log-probs computed once before training, then read.
    precompute_ref_log_probs: bool = False
    # LLaMA-Factory's: a separate reference model (a folder), with adapters merged into it (a comma list).
    ref_model: str | None = None
    ref_model_adapters: str | None = None

    def __post_init__(self):
        if self.pref_beta <= 0:
            raise ConfigError(f"pref_beta: {self.pref_beta} must be positive.")
        if self.dpo_label_smoothing and self.pref_loss != "sigmoid":
            raise ConfigError(f"dpo_label_smoothing applies to pref_loss: sigmoid only (as in LLaMA-Factory), not "
                              f"{self.pref_loss}.")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            raise ConfigError(f"dpo_label_smoothing: {self.dpo_label_smoothing} must be in [0, 0.5).")
        if self.pref_ftx < 0:
            raise ConfigError(f"pref_ftx: {self.pref_ftx} must be non-negative.")


@dataclass
class OrpoOptions(PreferenceOptions):
    pref_loss: str = field(default="orpo", metadata={"choices": ("orpo",)})


def _shards(config) -> bool:
    from trainer.config import _zero_stage

    t = config.training
    return config.fsdp is not None or bool(t.deepspeed and _zero_stage(t.deepspeed) == 3)


def _zero3(config) -> bool:
    from trainer.config import _zero_stage

    t = config.training
    return bool(t.deepspeed and _zero_stage(t.deepspeed) == 3)


def _sharded_module(module) -> bool:
    from trainer.engine.fsdp import is_sharded

    return is_sharded(module) or hasattr(module, "zero_optimization_partition_weights")


def _peft_model(model):
    """The PeftModel inside DDP / DeepSpeed / FSDP wrappers (None: no adapters)."""
    while True:
        if hasattr(model, "disable_adapter"):
            return model
        inner = getattr(model, "module", None)
        if inner is None:
            return None
        model = inner


class Pairwise(Stage):
    """A stage whose item is one preference pair: its chosen and rejected sequences, end to end, the rejected one
    sharing the chosen one's prompt where the attention path allows (pref_prefix_sharing)."""
    data_kind = "pairwise"
    item_name = "pairs"
    options = PairOptions

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

    def count_items(self, batch: dict):
        # Pairs, not dataset items: a packed item holds several pairs (two sequences each).
        return batch["item_lengths"].new_tensor((len(batch["cu_seq_lens_q"]) - 1) // 2)


@register
class DPO(Pairwise):
    name = "dpo"
    options = PreferenceOptions

    def __init__(self, config=None, options=None):
        super().__init__(config, options)
        from trainer.model.preference_losses import LOSSES, NEEDS_REFERENCE

        self.loss_fn = LOSSES[self.opts.pref_loss]
        self.needs_reference = self.opts.pref_loss in NEEDS_REFERENCE
        self.reference = None  # a frozen copy of the starting weights, or ref_model (prepare)
        self.reference_wrapper = None  # ref_model's own loss head
        self.precomputes = self.needs_reference and self.opts.precompute_ref_log_probs
        self.separate_reference = self.needs_reference and bool(self.opts.ref_model)
        if self.opts.ref_model and not self.needs_reference:
            logger.warning("ref_model is not used: pref_loss %s has no reference model.", self.opts.pref_loss)
        if self.opts.ref_model_adapters and not self.opts.ref_model:
            raise ConfigError("ref_model_adapters are merged into ref_model: set ref_model too.")
        if self.opts.ref_model_adapters and config is not None and _zero3(config):
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

    def prepare(self, model, wrapper) -> None:
        """The reference, frozen, in the compute dtype, placed like the policy: ref_model (adapters merged), or for a
        full/freeze run its starting weights (a copy in one process or under ZeRO-0/2; loaded again and partitioned
        by ZeRO-3 or sharded by FSDP like the policy over several). LoRA runs need none: the reference is the base
        with the adapters off."""
        import torch

        t = self.config.training
        dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else None
        sharded = _shards(self.config) and t.world_size > 1
        copy_wanted = self.copies_reference and t.do_train  # an eval-only run's reference is the model it loaded
        if not (self.separate_reference or copy_wanted):
            return
        if not self.separate_reference and not sharded:
            import copy

            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
            if dtype is not None:
                self.reference.to(dtype)
            return
        from trainer.model.wrapper import ModelWrapper

        o = self.opts
        path = o.ref_model if self.separate_reference else self.config.model.model_name_or_path
        reference = self._load_reference(path, o.ref_model_adapters if self.separate_reference else None, model,
                                         dtype or torch.float32)
        self.reference_wrapper = ModelWrapper(reference, chunk_size=wrapper.chunk_size, chunked=wrapper.chunked,
                                              liger=wrapper.liger)
        self.reference = self._shard_like_policy(reference, dtype) if sharded else reference

    def _load_reference(self, path: str, adapters: str | None, model, dtype):
        from transformers import AutoModelForCausalLM

        from trainer.model.loading import _check_local

        m = self.config.model
        _check_local(path, key="ref_model" if self.separate_reference else "model_name_or_path")
        # Under ZeRO-3 this load partitions the weights as they arrive (zero.Init), as it did the policy's.
        reference = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=m.trust_remote_code,
            attn_implementation=getattr(model.config, "_attn_implementation", None))
        reference.config.use_cache = False
        for adapter in [a.strip() for a in (adapters or "").split(",") if a.strip()]:
            from peft import PeftModel

            reference = PeftModel.from_pretrained(reference, adapter).merge_and_unload()
        logger.info("Reference model: %s%s, frozen, weights in %s.", path, f" + {adapters}" if adapters else "", dtype)
        return reference.requires_grad_(False).eval()

    def _shard_like_policy(self, reference, dtype):
        """FSDP: fully_shard like the policy. ZeRO-3: an inference engine over the partitioned weights, whose hooks
        gather each layer's weights for its forward (as TRL does for its reference)."""
        import torch

        if self.config.fsdp is not None:
            from trainer.engine import fsdp

            logger.info("Reference model sharded with FSDP like the policy.")
            return fsdp.shard(reference, self.config.fsdp, dtype or torch.float32)
        import deepspeed

        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
        engine, *_ = deepspeed.initialize(model=reference, config=ds)
        engine.eval()
        logger.info("Reference model partitioned by ZeRO-3 like the policy.")
        return engine

    def before_training(self, trainer) -> None:
        if not self.precomputes:
            return
        from trainer.data.packing import Items
        from trainer.stages.reference_logps import reference_table

        for name, items in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
            if isinstance(items, Items):
                items.extra["ref_logps"] = reference_table(self, trainer, items, name)

    def reference_logps(self, wrapper, model, batch):
        """Each sequence's summed log-prob under the reference: the frozen copy, the LoRA base (adapters off), or
        for a full/freeze run without a copy the model itself (before training, or in an eval-only run)."""
        import torch

        with torch.no_grad():
            if self.reference is not None:
                return self._sequence_logps(self.reference_wrapper or wrapper, self._placed_reference(batch), batch)[0]
            if _peft_model(model) is not None:
                with self._reference(model):
                    return self._sequence_logps(wrapper, model, batch)[0]
            if model.training:  # a training step of a run whose reference was precomputed: never the moved policy
                raise RuntimeError("precomputed reference log-probs are missing from a training batch")
            return self._sequence_logps(wrapper, model, batch)[0]

    def _sequence_logps(self, wrapper, model, batch):
        from trainer.data.collators import segment_sums

        nll, mask = wrapper.token_nll(model, batch)
        return segment_sums(-(nll * mask), batch), segment_sums(mask.to(nll.dtype), batch)

    def compute(self, wrapper, model, batch: dict) -> StageOutput:
        import torch

        logps, tokens = self._sequence_logps(wrapper, model, batch)
        labelled = tokens.sum()
        chosen, rejected, n_chosen, n_rejected = logps[0::2], logps[1::2], tokens[0::2], tokens[1::2]
        ref_chosen = ref_rejected = None
        reference_passes = 0
        if self.needs_reference:
            if "ref_logps" in batch:  # precomputed before training
                ref = batch["ref_logps"].to(logps.device, logps.dtype)
            else:
                ref, reference_passes = self.reference_logps(wrapper, model, batch), 1
            ref_chosen, ref_rejected = ref[0::2], ref[1::2]
        o = self.opts
        losses, reward_chosen, reward_rejected = self.loss_fn(
            chosen, rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected, beta=o.pref_beta,
            label_smoothing=o.dpo_label_smoothing, gamma=o.simpo_gamma, chosen_tokens=n_chosen.clamp(min=1),
            rejected_tokens=n_rejected.clamp(min=1))
        if o.pref_ftx:  # LLaMA-Factory's pref_ftx: the chosen answer's SFT loss (per token) added to each pair's
            losses = losses + o.pref_ftx * (-chosen / n_chosen.clamp(min=1))
        one = torch.ones_like(losses)
        stats = {"loss": (losses.detach(), one),
                 "rewards/chosen": (reward_chosen, one), "rewards/rejected": (reward_rejected, one),
                 "rewards/accuracies": ((reward_chosen > reward_rejected).to(losses.dtype), one),
                 "rewards/margins": (reward_chosen - reward_rejected, one),
                 "logps/chosen": (chosen.detach(), one), "logps/rejected": (rejected.detach(), one)}
        if o.pref_loss == "orpo":  # TRL's and LLaMA-Factory's names for ORPO's two terms
            from trainer.model.preference_losses import orpo_terms

            nll, log_odds = orpo_terms(chosen.detach(), rejected.detach(), n_chosen.clamp(min=1),
                                       n_rejected.clamp(min=1))
            stats.update({"nll_loss": (nll, one), "log_odds_ratio": (log_odds, one)})
        return StageOutput(loss_sum=losses.sum(), items=one.sum(), stats=stats, head_tokens=labelled,
                           reference_passes=reference_passes)

    def _placed_reference(self, batch):
        device = batch["input_ids"].device
        if _sharded_module(self.reference):  # placed by FSDP or DeepSpeed
            return self.reference
        if next(self.reference.parameters()).device != device:  # the engine moved the policy after prepare()
            self.reference.to(device)
        return self.reference

    @staticmethod
    def _reference(model):
        peft = _peft_model(model)
        if peft is None:
            raise ConfigError("the reference model of this pref_loss is the LoRA base; the model has no adapters.")
        return peft.disable_adapter() if hasattr(peft, "disable_adapter") else contextlib.nullcontext()


@register
class ORPO(DPO):
    name = "orpo"
    options = OrpoOptions

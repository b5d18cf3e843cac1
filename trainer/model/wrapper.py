"""The one model wrapper every stage uses: per-token losses (or values) through the model's own forward.

The model's output head answers in one of a few explicit modes, each a small object that says what the head
computes from the final hidden states in place of the [tokens x vocab] logits: TokenNLL (each labelled token's
negative log-likelihood, in chunks), Values (a value head's value at every token: the rm stage's scores), and
PolicyChannels (ppo: each labelled token's log-probability at the sampling temperature, the critic's value at every
position and, without gradient, the entropy). A wrapper method passes its mode for exactly one forward
(`_engaged`): the mode sits on the head module of the model being run, not in any global or ambient state, and the
method reads the forward's output back through the same mode, so no caller ever sees `.logits` meaning anything
else. Without a mode (generation, plain use) the head is the ordinary Linear. The mode has to ride on the head rather
than be passed as an argument because the call goes through the DDP / DeepSpeed / FSDP wrappers and their hooks,
which call the model's own forward. Models whose head cannot take the loss path (soft-capped logits, a head that is
not a plain Linear, or PEFT's row-trained Linear) fall back to full logits, and say so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.collators import model_inputs
from trainer.model.losses import IGNORE_INDEX, chunked_token_entropy, chunked_token_nll, shift_targets

logger = logging.getLogger(__name__)

MODE = "zerotune_head_mode"  # the attribute of the head module that holds the engaged mode


@dataclasses.dataclass
class TokenNLL:
    """[B, T]: the loss of predicting each target (IGNORE_INDEX: not computed, 0)."""
    targets: torch.Tensor
    chunk_size: int
    liger: bool = False
    count: int | None = None  # targets not ignored, counted on the host by the collator (no sync to find them)
    uniform: bool = False  # every token weighs alike in the loss (sft, pt)

    def __call__(self, weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        flat, targets = hidden.reshape(-1, hidden.shape[-1]), self.targets.reshape(-1)
        if self.liger:  # Liger's Triton kernel: the same per-token loss, fused on CUDA
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            nll = liger_fused_linear_cross_entropy(flat, weight, targets, bias, reduction="none")
        else:
            nll = chunked_token_nll(flat, weight, bias, targets, self.chunk_size, self.count, self.uniform)
        return nll.view(hidden.shape[:-1])


@dataclasses.dataclass
class Values:
    """[B, T, 1]: a value head's value at every token; no logits are computed."""
    value_head: nn.Module

    def __call__(self, weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden)


@dataclasses.dataclass
class PolicyChannels:
    """[..., C]: the nll of each target at temperature T (logits / T), then the value head's value, then the
    entropy, as requested."""
    targets: torch.Tensor
    chunk_size: int
    temperature: float
    value_head: nn.Module | None
    entropy: bool

    def __call__(self, weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        flat, targets = hidden.reshape(-1, hidden.shape[-1]), self.targets.reshape(-1)
        scaled = flat / self.temperature if self.temperature != 1.0 else flat
        bias = None if bias is None else bias / self.temperature
        channels = [chunked_token_nll(scaled, weight, bias, targets, self.chunk_size)]
        if self.value_head is not None:
            channels.append(self.value_head(flat).squeeze(-1).float())
        if self.entropy:
            channels.append(chunked_token_entropy(scaled, weight, bias, targets, self.chunk_size))
        return torch.stack(channels, dim=-1).view(*hidden.shape[:-1], len(channels))


def _mode_head_forward(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    mode = self.__dict__.get(MODE)
    return type(self).forward(self, hidden) if mode is None else mode(*_head_weights(self), hidden)


def _rows_trained(head: nn.Module) -> bool:
    """A head PEFT trains some rows of (trainable_token_indices, a LoRA run's new tokens) over a plain Linear."""
    adapter = getattr(head, "token_adapter", None)
    return adapter is not None and type(adapter.base_layer) is nn.Linear


def _head_weights(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) the head computes with. A row-trained head (_rows_trained): the base weight with the trained
    rows put in, as PEFT's own forward computes (gradients reach just those rows); the base alone while its adapters
    are off (a reference model run as the base) or merged into the base."""
    if not _rows_trained(head):
        return head.weight, head.bias
    adapter = head.token_adapter
    base = adapter.base_layer
    if adapter.disable_adapters or not adapter.active_adapters or adapter.merged:
        return base.weight, base.bias
    return adapter.get_merged_weights(adapter.active_adapters), base.bias


def _head_of(model: nn.Module) -> nn.Module:
    """The output head of the causal LM inside DDP / DeepSpeed engines and PEFT."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return _base_model(model).get_output_embeddings()


@contextlib.contextmanager
def _engaged(model: nn.Module, mode):
    """The model's head answers in `mode` for the forward passes inside this block."""
    head = _head_of(model)
    if getattr(head.forward, "__func__", None) is not _mode_head_forward:
        raise RuntimeError(f"the output head of {type(model).__name__} has no loss modes: build a ModelWrapper over "
                           "this model (or a copy of one) before asking it for token losses")
    head.__dict__[MODE] = mode
    try:
        yield
    finally:
        head.__dict__.pop(MODE, None)


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _post_processes_logits(config) -> bool:
    """Models that scale or soft-cap logits after the head (Gemma 2 soft-capping, Granite's logits_scaling,
    Cohere's logit_scale, ...): the loss head would see unscaled logits, so they take the full-logits path."""
    for name, value in vars(config).items():
        if "logit" in name and isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            return True
    return False


class ModelWrapper:
    """Holds how to get token losses out of one (possibly adapter-wrapped) causal LM."""

    def __init__(self, model: nn.Module, chunk_size: int = 512, chunked: bool = True, liger: bool = False):
        self.chunk_size = chunk_size
        self.neftune = None  # use_neftune: noise on the input embeddings of training forwards
        self.sequence_parallel = None  # engine/sequence_parallel.WholeRows: training forwards run on row shards
        base = _base_model(model)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        self.patched = type(head) is nn.Linear or _rows_trained(head)
        self.post_processes = _post_processes_logits(base.config)
        self.chunked = chunked and self.patched and not self.post_processes
        self.liger = liger and self.chunked
        if self.patched:  # the loss and value modes; the plain Linear otherwise
            head.forward = types.MethodType(_mode_head_forward, head)
        if self.chunked:
            if self.liger:
                logger.info("Loss: Liger fused linear cross-entropy, no full logits.")
            else:
                logger.info("Loss: chunked linear cross-entropy (%d tokens a chunk), no full logits.", chunk_size)
            if _rows_trained(head):
                logger.info("The head trains some of its rows (new tokens): its weight gradient is formed in one "
                            "vocab x hidden fp32 buffer, as when the whole head trains, and only those rows keep it.")
        else:
            why = "disabled" if not chunked else "the model's head is not a plain Linear or post-processes its logits"
            logger.warning("Loss: full logits (%s).", why)

    def use_neftune(self, model: nn.Module, alpha: float) -> None:
        from trainer.model.neftune import NEFTune

        self.neftune = NEFTune(_base_model(model).get_input_embeddings(), alpha)

    def _noise(self, batch: dict):
        """NEFTune's per-token lengths for this batch's forward (nothing without NEFTune)."""
        return self.neftune.batch(batch) if self.neftune is not None else contextlib.nullcontext()

    def token_nll(self, model: nn.Module, batch: dict, uniform: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(nll [B, T], mask [B, T]): the loss of predicting labels[:, t + 1] at position t, and where it counts.
        uniform: the caller's loss weighs every token alike (a plain sum)."""
        rows = self.sequence_parallel if model.training else None
        whole = batch
        if rows is not None:  # this process's shard runs; the whole row's losses come back (sequence_parallel.py)
            batch = rows.cut(batch)
        # A sequence-parallel shard comes with its labels shifted before the row was cut (engine/sequence_parallel.py).
        targets = batch["shift_labels"] if "shift_labels" in batch else shift_targets(batch["labels"])
        inputs = model_inputs(batch)
        inputs["use_cache"] = False  # packed rows are only kept apart without a cache (PLATFORM.md)
        if self.chunked:
            mode = TokenNLL(targets, self.chunk_size, self.liger, batch.get("target_count"), uniform)
            with _engaged(model, mode), self._noise(batch):
                nll = model(**inputs).logits
        else:
            with self._noise(batch):
                logits = model(**inputs).logits.float()
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                  reduction="none").view(targets.shape)
        if rows is not None:
            nll, targets = rows.whole(nll, whole["input_ids"].shape[1]), shift_targets(whole["labels"])
        return nll, targets.ne(IGNORE_INDEX)

    def token_values(self, model: nn.Module, batch: dict, value_head: nn.Module) -> torch.Tensor:
        """value_head(final hidden state) at every token, [B, T]: the rm stage's scores, with no logits computed.
        Under sequence parallelism this process's shard runs and the whole row's values come back (token_nll)."""
        rows = self.sequence_parallel if model.training else None
        total = batch["input_ids"].shape[1]
        if rows is not None:
            batch = rows.cut(batch)
        inputs = model_inputs(batch)
        inputs["use_cache"] = False
        if self.patched and not self.post_processes:
            # The head's output must be what the model returns (not a side channel): ZeRO-3 fetches and releases
            # the head's weights for backward on hooks around its output and input.
            with _engaged(model, Values(value_head)), self._noise(batch):
                values = model(**inputs).logits.squeeze(-1)
        else:
            # A model that soft-caps or scales its logits would do that to the values too: the final hidden states
            # instead (the full logits are computed and dropped).
            with self._noise(batch):
                hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
            values = value_head(hidden).squeeze(-1)
        return rows.whole(values, total) if rows is not None else values

    def policy_outputs(self, model: nn.Module, batch: dict, value_head: nn.Module | None = None,
                       temperature: float = 1.0, entropy: bool = False) -> dict:
        """The ppo stage's one forward: {"logps": log-prob of each labelled next token under logits / temperature,
        "values": value_head at every position (with a value head), "entropy": of each labelled position's
        distribution (entropy=True, no gradient), "mask": where a label is}, each [B, T]."""
        if not (self.patched and not self.post_processes):
            raise NotImplementedError("ppo needs a model whose output head is a plain Linear without logit "
                                      "post-processing (soft-capping or scaling)")
        targets = shift_targets(batch["labels"])
        inputs = model_inputs(batch)
        inputs["use_cache"] = False
        with _engaged(model, PolicyChannels(targets, self.chunk_size, float(temperature), value_head, entropy)), \
                self._noise(batch):
            channels = model(**inputs).logits
        out = {"logps": -channels[..., 0], "mask": targets.ne(IGNORE_INDEX)}
        if value_head is not None:
            out["values"] = channels[..., 1]
        if entropy:
            out["entropy"] = channels[..., -1]
        return out

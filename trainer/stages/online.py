"""What the online RL stages (ppo, grpo) share: their loop over the shared engine.

The Trainer iterates keys that a rollout sampler yields (stages/rollout_sampler.py), buffer by buffer, each buffer
several times (ppo_epochs, num_iterations). When an optimizer step's keys have no responses yet, the stage samples
them for its process's whole buffer (`sample_buffer`: generation, scores, the no-grad forwards, advantages), then
every micro-batch trains on its keys' responses (`compute`). This base owns the rest: the prompts as the engine's
dataset, dropout off, the reference model (the LoRA base, a frozen copy of a continued adapter, or a frozen copy of
the starting weights), the template's stop tokens, the sampling settings, the buffer saved with each checkpoint so a
resume mid-buffer is exact, the stage's small state file, and the figures derived for the log.

The policy's log-probs are at the sampling temperature (logits / temperature), as sampled. Dropout is turned off
(as TRL does), so the policy that sampled a response and the one trained on it agree before the first update.
"""

from __future__ import annotations

import json
import logging
import os

from trainer.errors import ConfigError
from trainer.stages.base import Stage

logger = logging.getLogger(__name__)

EXPERIENCE_FILE = "{stage}_experience_{rank}.pt"  # a process's sampled buffer, so a resume mid-buffer is exact


class RolloutPrompts:
    """The training dataset the engine iterates: the sampler's (epoch, buffer, slot, index) keys, nothing read; the
    stage reads the prompts (`items`) itself when it samples a buffer."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        return {"key": key}


class KeyCollator:
    def __call__(self, rows: list[dict]):
        import torch

        return {"rollout_keys": torch.tensor([list(r["key"]) for r in rows], dtype=torch.long)}


class OnlineStage(Stage):
    """A stage that samples its own training data. Subclasses say: `uses_reference`, `make_sampler`,
    `sample_buffer`, `compute`, and what of their state survives a resume (`state_dict` / `load_state_dict`)."""
    needs_padding_free = True
    item_name = "prompts"
    plotted = ("loss", "reward", "kl")
    state_file = ""  # the stage's own state beside each checkpoint ("ppo_state.json")
    head = None  # a value head (ppo's critic)
    shares_prompts = False  # a batch's consecutive responses to one prompt compute it once (grpo's groups)

    def __init__(self, config=None, options=None):
        super().__init__(config, options)
        self.rollouts = 0
        self.items = self.sampler = None
        self.reference = self.reference_wrapper = None  # a frozen copy (full/freeze), else the LoRA base
        self.reference_adapter = None  # LoRA continuing adapter_name_or_path: a frozen copy of it is the reference
        self.experience: dict[tuple, list] = {}  # sampler key -> its sampled responses
        self.pending: dict = {}  # the last rollout's statistics, logged with the next micro-batch
        self.stop_ids: list[int] = []

    @property
    def uses_reference(self) -> bool:
        raise NotImplementedError

    # ---- checks --------------------------------------------------------------------------------
    def check_online(self, config, sampling_defaults: dict) -> None:
        """What every online stage needs of the whole config; `sampling_defaults`: the generation keys' values when
        the YAML leaves them out (the losses read the untruncated policy)."""
        d, t, g, name = config.data, config.training, config.generation, self.name
        if d.train_on_prompt:
            raise ConfigError(f"train_on_prompt: stage {name} reads each example's prompt as the tokens before its "
                              "last answer; with train_on_prompt every token is an answer. Remove it.")
        if g.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: {g.max_new_tokens}: {name} needs room for an answer (at least 1).")
        if g.do_sample and g.temperature <= 0:
            raise ConfigError(f"temperature: {g.temperature} with do_sample: true; sampling needs a positive "
                              "temperature (or do_sample: false for greedy answers).")
        self._sample_from_the_policy(config, sampling_defaults)
        if d.packing:
            raise ConfigError(f"packing: stage {name} trains on prompts with their sampled responses; remove packing.")
        if d.streaming:
            raise ConfigError(f"streaming: stage {name} visits each buffer of prompts several times; it needs the "
                              "whole dataset (streaming: false).")
        if t.do_eval or t.eval_strategy != "no" or d.val_size or d.eval_dataset:
            raise ConfigError(f"stage {name} has no eval loss (as in LLaMA-Factory's ppo): remove do_eval, "
                              "eval_strategy, val_size and eval_dataset; the logged reward is its measure.")
        if g.num_beams != 1:
            raise ConfigError(f"num_beams: {g.num_beams}: {name} samples its responses; beam search is not a policy.")
        if d.cutoff_len < 2:
            raise ConfigError("cutoff_len must leave room for a prompt.")

    def _sample_from_the_policy(self, config, defaults: dict) -> None:
        """The losses read log-probs of softmax(logits / temperature): sample from exactly that (TRL does the same),
        unless the YAML asks for truncation itself, which then only warns."""
        g, raw = config.generation, config.raw
        for key, plain in defaults.items():
            if key not in raw:
                setattr(g, key, plain)
        asked = {k: raw[k] for k in ("top_p", "top_k", "repetition_penalty") if k in raw}
        if (g.top_p < 1.0 or g.top_k > 0 or g.repetition_penalty != 1.0) and g.do_sample:
            logger.warning("%s samples with %s, but its ratios and KL use the untruncated policy softmax(logits / "
                           "temperature): the samples are not from that policy, so both are approximations. Leave "
                           "top_p, top_k and repetition_penalty unset for exact ones.", self.name,
                           ", ".join(f"{k}: {v}" for k, v in asked.items()))

    # ---- model ---------------------------------------------------------------------------------
    def extend_model(self, model):
        from torch import nn

        dropped = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        for m in dropped:
            m.p = 0.0
        for m in model.modules():  # attention modules pass their own probability to the attention call
            if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0:
                m.attention_dropout = 0.0
                dropped.append(m)
        if dropped:
            logger.info("%s: dropout off in %d modules (as TRL does): the policy that sampled a response and the "
                        "one trained on it must agree before the first update.", self.name, len(dropped))
        if self.uses_reference and self.config.training.do_train:
            from trainer.model.adapters import keep_starting_adapter

            self.reference_adapter = keep_starting_adapter(model, self.config)
        return model

    def prepare(self, model, wrapper) -> None:
        from trainer.model.adapters import peft_model
        from trainer.model.reference import frozen_dtype, starting_copy

        # The template's stop tokens, as run() set them (the Trainer later aligns generation_config with the
        # tokenizer's eos alone).
        stops = model.generation_config.eos_token_id
        self.stop_ids = [stops] if isinstance(stops, int) else list(stops)
        if self.uses_reference and peft_model(model) is None and self.config.training.do_train:
            # full / freeze: a frozen copy of the starting weights, kept in the policy's dtype and run under its
            # autocast (rollouts.precision), so that before the first update its log-probs are the policy's exactly
            self.reference, self.reference_wrapper = starting_copy(self.config, model, wrapper,
                                                                   frozen_dtype(self.config), cast=False)
            logger.info("%s: reference model: a frozen copy of the starting weights.", self.name)
        elif not self.uses_reference:
            logger.info("%s: no reference model (none is loaded or kept): the loss has no KL term.", self.name)

    # ---- data ----------------------------------------------------------------------------------
    def train_items(self, dataset):
        self.items = dataset
        return RolloutPrompts(dataset)

    def collator(self, pad_token_id: int, padding_free: bool = True):
        return KeyCollator()

    def make_sampler(self, size: int, batch: int, accumulation: int, world: int, seed: int, epoch_of=None):
        raise NotImplementedError

    def steps_per_epoch(self, items: int, batch: int, accumulation: int, world: int) -> int:
        sampler = self.make_sampler(items, batch, accumulation, world, 0)
        return sampler.buffers * sampler.micro_batches * sampler.repeats // accumulation

    def train_sampler(self, trainer, dataset):
        a = trainer.args
        world = trainer.accelerator.num_processes
        per_epoch = self.steps_per_epoch(len(dataset), a.per_device_train_batch_size, a.gradient_accumulation_steps,
                                         world)
        self.sampler = self.make_sampler(len(dataset), a.per_device_train_batch_size, a.gradient_accumulation_steps,
                                         world, a.seed, epoch_of=lambda: trainer.state.global_step // per_epoch)
        return self.sampler

    def count_items(self, batch: dict):
        import torch

        return torch.tensor(sum(len(s.response) for s in self._samples_of(batch)))

    def _samples_of(self, batch: dict) -> list:
        return [s for key in batch["rollout_keys"].tolist() for s in self.experience[tuple(key)]]

    # ---- rollouts ------------------------------------------------------------------------------
    def sample_buffer(self, trainer, keys: list[tuple]) -> tuple[dict, dict]:
        """(key -> its samples, the rollout's statistics as (sums, counts)) for this process's share of a buffer."""
        raise NotImplementedError

    def share_of(self, trainer, epoch: int, buffer: int) -> list[tuple]:
        share = self.sampler.share(epoch, buffer, trainer.accelerator.process_index)
        return [(epoch, buffer, slot, i) for slot, i in share]

    def before_step(self, trainer, batch_samples: list[dict]) -> None:
        import time

        keys = [tuple(k) for b in batch_samples for k in b["rollout_keys"].tolist()]
        missing = [k for k in keys if k not in self.experience]
        if not missing:
            return
        epoch, buffer = missing[0][:2]
        start = time.perf_counter()
        self.experience = {}  # the previous buffer's responses are done with
        self.experience, self.pending = self.sample_buffer(trainer, self.share_of(trainer, epoch, buffer))
        self.rollouts += 1
        trainer.exclude_from_window(time.perf_counter() - start)
        _show_progress(trainer, self.rollouts, self.pending)

    @property
    def temperature(self) -> float:
        g = self.config.generation
        return g.temperature if g.do_sample and g.temperature > 0 else 1.0

    def summarize(self, totals: dict) -> dict:
        import math

        figures = super().summarize(totals)
        square = figures.pop("reward_sq", None)
        if square is not None and "reward" in figures:
            figures["reward_std"] = math.sqrt(max(square - figures["reward"] ** 2, 0.0))
        seconds, tokens = figures.get("time/generation"), figures.pop("generation_tokens", None)
        if seconds and tokens is not None:
            figures["generation_tokens_per_second"] = tokens / seconds
        return figures

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = state["rollouts"]

    def save_state(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, self.state_file), "w") as f:
            json.dump(self.state_dict(), f, indent=2)

    def save_extra(self, folder: str, state_dict: dict | None) -> None:
        self.save_state(folder)

    def save_process_state(self, folder: str, rank: int) -> None:
        """This process's current buffer: resumed mid-buffer, the run trains on the very responses it sampled."""
        import dataclasses

        import torch

        experience = {key: [dataclasses.asdict(s) for s in samples] for key, samples in self.experience.items()}
        torch.save(experience, os.path.join(folder, EXPERIENCE_FILE.format(stage=self.name, rank=rank)))

    def load_state(self, folder: str) -> None:
        import torch

        from trainer.stages.rollouts import Sample

        rank = self.config.training.process_index
        saved = os.path.join(folder, EXPERIENCE_FILE.format(stage=self.name, rank=rank))
        if os.path.isfile(saved):
            experience = torch.load(saved, weights_only=True)
            self.experience = {tuple(key): [Sample(**s) for s in samples] for key, samples in experience.items()}
        path = os.path.join(folder, self.state_file)
        if not os.path.isfile(path):
            logger.warning("%s has no %s: the stage's statistics start afresh.", folder, self.state_file)
            return
        with open(path) as f:
            self.load_state_dict(json.load(f))


def _show_progress(trainer, rollouts: int, stats: dict) -> None:
    """Rollouts and the last reward beside the optimizer steps on the Trainer's progress bar."""
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
        if bar is not None and "reward" in stats:
            total, count = stats["reward"]
            bar.set_postfix(rollouts=rollouts, reward=f"{float(total.sum() / count.sum()):.3f}", refresh=False)

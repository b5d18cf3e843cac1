"""ppo: online RL from a reward model or a reward function (LLaMA-Factory's stage ppo, with its keys), and GRPO.

One loop over the shared engine. The Trainer iterates prompts buffer by buffer, each buffer ppo_epochs times
(stages/rollout_sampler.py); when an optimizer step's prompts have no responses yet, the stage samples them for its
process's whole buffer (stages/rollouts.py: generation, scores, the no-grad forwards, advantages), then every
micro-batch trains on its prompts' responses:

- gae (PPO, Ziegler et al. 2019 as TRL implemented it): per-token rewards = -kl_coef (log pi_old - log pi_ref)
  plus the score on the last token; a value head on the policy (the critic); GAE advantages, whitened; the clipped
  policy loss plus ppo_vf_coef x the clipped value loss; kl_coef adapted toward ppo_target after each buffer.
- grpo (DeepSeekMath, Shao et al. 2024): num_generations responses a prompt, advantages (r - mean) / (std + 1e-4)
  within each prompt's group, no value head; the KL to the reference as a loss term, grpo_beta x k3 per token.

One item of the loss is one response token: the loss is the sum over the optimizer step's response tokens (on every
process) divided by their count, so accumulation and processes do not change it. The policy's log-probs are at the
sampling temperature (logits / temperature), as sampled. Dropout is turned off (as TRL does), so the ratio
pi / pi_old is exactly 1 before the first update of a buffer.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from trainer.errors import ConfigError
from trainer.stages.base import Stage, StageOutput, register
from trainer.stages.reward import WithValueHead

logger = logging.getLogger(__name__)

STATE_FILE = "ppo_state.json"
EXPERIENCE_FILE = "ppo_experience_{rank}.pt"  # a process's sampled buffer, so a resume mid-buffer is exact


@dataclass
class PPOOptions:
    # LLaMA-Factory's keys and defaults.
    reward_model: str | None = None
    reward_model_type: str = field(default="lora", metadata={"choices": ("lora", "full", "function")})
    reward_model_adapters: str | None = None
    ppo_epochs: int = 4
    ppo_buffer_size: int = 1
    ppo_target: float = 6.0
    ppo_score_norm: bool = False
    ppo_whiten_rewards: bool = False
    # zerotune's: a reward function instead of a model, and GRPO.
    reward_function: str | None = None
    advantage_estimator: str = field(default="gae", metadata={"choices": ("gae", "grpo")})
    num_generations: int = 8
    grpo_beta: float = 0.04  # DeepSeekMath's KL weight; 0 runs without a reference
    # Answers sampled together (TRL's name): decoding reads every weight once a token for the whole batch, so larger
    # batches sample faster; its KV cache is far smaller than a training micro-batch's activations. Default: one
    # optimizer step's answers (per_device_train_batch_size x gradient_accumulation_steps x num_generations).
    generation_batch_size: int | None = None
    # TRL's PPO defaults, under ppo_ names.
    ppo_init_kl_coef: float = 0.2
    ppo_kl_horizon: int = 10000
    ppo_cliprange: float = 0.2
    ppo_cliprange_value: float = 0.2
    ppo_vf_coef: float = 0.1
    ppo_gamma: float = 1.0
    ppo_lam: float = 0.95

    def __post_init__(self):
        if self.reward_function and not self.reward_model:
            self.reward_model_type = "function"
        if self.reward_model_type == "function":
            if not self.reward_function:
                raise ConfigError("reward_model_type: function needs reward_function: module:callable.")
            if self.reward_model:
                raise ConfigError("Set reward_model or reward_function, not both.")
        elif not self.reward_model:
            raise ConfigError("stage ppo needs reward_model (the output_dir of an rm run) or reward_function "
                              "(module:callable scoring each response).")
        elif self.reward_function:
            raise ConfigError("Set reward_model or reward_function, not both.")
        if self.reward_model_adapters and self.reward_model_type != "full":
            raise ConfigError("reward_model_adapters are merged into a full reward_model: set reward_model_type: "
                              "full.")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise ConfigError(f"generation_batch_size: {self.generation_batch_size} must be at least 1.")
        for key in ("ppo_epochs", "ppo_buffer_size", "num_generations", "ppo_kl_horizon"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: {getattr(self, key)} must be at least 1.")
        if self.advantage_estimator == "grpo" and self.num_generations < 2:
            raise ConfigError("advantage_estimator: grpo compares each prompt's responses: num_generations must be "
                              "at least 2.")
        for key in ("ppo_target", "ppo_cliprange", "ppo_cliprange_value"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: {getattr(self, key)} must be positive.")
        for key in ("grpo_beta", "ppo_init_kl_coef", "ppo_vf_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: {getattr(self, key)} must be non-negative.")


class RolloutPrompts:
    """The training dataset the engine iterates: the sampler's (epoch, buffer, index) keys, nothing read; the
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


@register
class PPO(WithValueHead, Stage):
    name = "ppo"
    data_kind = "supervised"  # the prompt is what precedes the last answer; the answer is the reference
    needs_padding_free = True
    item_name = "prompts"
    plotted = ("loss", "reward", "kl")  # LLaMA-Factory's ppo plots loss and reward
    options = PPOOptions
    head_role = "critic"  # its value head estimates values: never a reward model (export leaves it out)

    def __init__(self, config=None, options=None):
        super().__init__(config, options)
        from trainer.model.rl_losses import AdaptiveKLController, RunningMoments

        o = self.opts
        self.grpo = o.advantage_estimator == "grpo"
        self.samples = o.num_generations if self.grpo else 1
        self.kl_control = AdaptiveKLController(o.ppo_init_kl_coef, o.ppo_target, o.ppo_kl_horizon)
        self.score_moments = RunningMoments()
        self.rollouts = 0
        self.items = self.sampler = None
        self.reward = None  # rewards.FunctionReward or rewards.ModelReward
        self.reference = self.reference_wrapper = None  # a frozen copy (full/freeze), else the LoRA base
        self.reference_adapter = None  # LoRA continuing adapter_name_or_path: a frozen copy of it is the reference
        self.experience: dict[tuple, list] = {}  # (epoch, buffer, index) -> that prompt's sampled responses
        self.pending: dict = {}  # the last rollout's statistics, logged with the next micro-batch
        if config is not None:
            self._check(config)

    @property
    def uses_reference(self) -> bool:
        return not self.grpo or self.opts.grpo_beta > 0

    def _check(self, config) -> None:
        from trainer.stages.rewards import FunctionReward

        d, t, g, o = config.data, config.training, config.generation, self.opts
        if config.finetuning.pissa_init and (self.uses_reference or o.reward_model_type == "lora"):
            raise ConfigError("pissa_init: ppo's reference model (and a LoRA reward model) is the policy's base with "
                              "its adapter switched off, and PiSSA has replaced that base by its residual (not the "
                              "model you start from). Train ppo without pissa_init (LLaMA-Factory refuses it too).")
        if d.train_on_prompt:
            raise ConfigError("train_on_prompt: stage ppo reads each example's prompt as the tokens before its last "
                              "answer; with train_on_prompt every token is an answer. Remove it.")
        if g.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: {g.max_new_tokens}: ppo needs room for an answer (at least 1).")
        if g.do_sample and g.temperature <= 0:
            raise ConfigError(f"temperature: {g.temperature} with do_sample: true; sampling needs a positive "
                              "temperature (or do_sample: false for greedy answers).")
        self._sample_from_the_policy(config)
        if d.packing:
            raise ConfigError("packing: stage ppo trains on prompts with their sampled responses; remove packing.")
        if d.streaming:
            raise ConfigError("streaming: stage ppo visits each buffer of prompts ppo_epochs times; it needs the "
                              "whole dataset (streaming: false).")
        if t.do_eval or t.eval_strategy != "no" or d.val_size or d.eval_dataset:
            raise ConfigError("stage ppo has no eval loss (as in LLaMA-Factory): remove do_eval, eval_strategy, "
                              "val_size and eval_dataset; the logged reward is its measure.")
        if g.num_beams != 1:
            raise ConfigError(f"num_beams: {g.num_beams}: ppo samples its responses; beam search is not a policy.")
        if self.grpo and not g.do_sample:
            raise ConfigError("advantage_estimator: grpo needs do_sample: true (greedy responses to one prompt are "
                              "all the same, so every advantage would be 0).")
        if o.reward_model_type == "lora" and config.finetuning.finetuning_type != "lora":
            raise ConfigError("reward_model_type: lora loads the reward adapter onto the policy's own base, which "
                              "needs finetuning_type: lora; with full or freeze set reward_model_type: full.")
        if o.reward_model_type == "full":
            from trainer.model.loading import _check_local

            _check_local(o.reward_model, key="reward_model")
        elif o.reward_model_type == "lora":
            if not os.path.isfile(os.path.join(o.reward_model, "adapter_config.json")):
                raise ConfigError(f"reward_model: {o.reward_model} holds no LoRA adapter (adapter_config.json); give "
                                  "the output_dir of an rm run with finetuning_type: lora, or set reward_model_type: "
                                  "full for a whole reward model.")
        else:
            self.reward = FunctionReward(o.reward_function)
        if d.cutoff_len < 2:
            raise ConfigError("cutoff_len must leave room for a prompt.")

    def _sample_from_the_policy(self, config) -> None:
        """The losses read log-probs of softmax(logits / temperature): sample from exactly that (TRL's PPO does the
        same), unless the YAML asks for truncation itself, which then only warns."""
        g, raw = config.generation, config.raw
        asked = {k: raw[k] for k in ("top_p", "top_k", "repetition_penalty") if k in raw}
        for key, plain in (("top_p", 1.0), ("top_k", 0), ("repetition_penalty", 1.0)):
            if key not in asked:
                setattr(g, key, plain)
        truncating = (g.top_p < 1.0 or g.top_k > 0 or g.repetition_penalty != 1.0) and g.do_sample
        if truncating:
            logger.warning("ppo samples with %s, but its ratios and KL use the untruncated policy softmax(logits / "
                           "temperature): the samples are not from that policy, so both are approximations. Leave "
                           "top_p, top_k and repetition_penalty unset for exact ones.",
                           ", ".join(f"{k}: {v}" for k, v in asked.items()))

    # ---- model ---------------------------------------------------------------------------------
    def extend_model(self, model):
        from torch import nn

        o = self.opts
        dropped = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        for m in dropped:
            m.p = 0.0
        for m in model.modules():  # attention modules pass their own probability to the attention call
            if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0:
                m.attention_dropout = 0.0
                dropped.append(m)
        if dropped:
            logger.info("ppo: dropout off in %d modules (as TRL does): the policy that sampled a response and the "
                        "one trained on it must agree before the first update.", len(dropped))
        if not self.grpo:
            self.attach_head(model)  # the critic
        if self.uses_reference and self.config.training.do_train:
            from trainer.model.adapters import keep_starting_adapter

            self.reference_adapter = keep_starting_adapter(model, self.config)
        if o.reward_model_type == "lora":
            from trainer.stages.rewards import ModelReward, load_reward_adapter, load_value_head

            load_reward_adapter(model, o.reward_model)
            hidden = _causal_hidden(model)
            self.reward = ModelReward(o.reward_model, load_value_head(o.reward_model, hidden))
        return model

    def prepare(self, model, wrapper) -> None:
        import torch

        from trainer.model.adapters import peft_model
        from trainer.model.reference import frozen_dtype, load_frozen, placed_separately, shard_like_policy, \
            starting_copy
        from trainer.options import split_list

        t, o = self.config.training, self.opts
        # The template's stop tokens, as run() set them (the Trainer later aligns generation_config with the
        # tokenizer's eos alone).
        stops = model.generation_config.eos_token_id
        self.stop_ids = [stops] if isinstance(stops, int) else list(stops)
        dtype = frozen_dtype(self.config)
        if self.uses_reference and peft_model(model) is None and t.do_train:
            # full / freeze: a frozen copy of the starting weights, kept in the policy's dtype and run under its
            # autocast (rollouts._precision), so that before the first update its log-probs are the policy's exactly
            self.reference, self.reference_wrapper = starting_copy(self.config, model, wrapper, dtype, cast=False)
        if o.reward_model_type == "full":
            from trainer.model.wrapper import ModelWrapper
            from trainer.stages.rewards import ModelReward, load_value_head

            scorer = load_frozen(self.config, o.reward_model, split_list(o.reward_model_adapters), model,
                                 dtype or torch.float32, "reward_model", "Reward model")
            head = load_value_head(o.reward_model, scorer.config.hidden_size)
            scorer_wrapper = ModelWrapper(scorer, chunk_size=wrapper.chunk_size)
            if placed_separately(self.config):
                scorer = shard_like_policy(self.config, scorer, dtype, "Reward model")
            self.reward = ModelReward(o.reward_model, head, scorer, scorer_wrapper)

    # ---- data ----------------------------------------------------------------------------------
    def train_items(self, dataset):
        self.items = dataset
        return RolloutPrompts(dataset)

    def collator(self, pad_token_id: int, padding_free: bool = True):
        return KeyCollator()

    def steps_per_epoch(self, items: int, batch: int, accumulation: int, world: int) -> int:
        from trainer.stages.rollout_sampler import RolloutSampler

        o = self.opts
        sampler = RolloutSampler(items, batch, accumulation, world, o.ppo_buffer_size, o.ppo_epochs, 0)
        return sampler.buffers * o.ppo_buffer_size * o.ppo_epochs

    def micro_batch_tokens(self, config) -> int:
        """Each prompt's num_generations answers, each up to max_new_tokens after the prompt."""
        d = config.data
        longest = min(d.cutoff_len, 2048) + config.generation.max_new_tokens
        return config.training.per_device_train_batch_size * self.samples * longest

    def train_sampler(self, trainer, dataset):
        from trainer.stages.rollout_sampler import RolloutSampler

        a, o = trainer.args, self.opts
        world = trainer.accelerator.num_processes
        per_epoch = self.steps_per_epoch(len(dataset), a.per_device_train_batch_size, a.gradient_accumulation_steps,
                                         world)
        self.sampler = RolloutSampler(len(dataset), a.per_device_train_batch_size, a.gradient_accumulation_steps,
                                      world, o.ppo_buffer_size, o.ppo_epochs, a.seed,
                                      epoch_of=lambda: trainer.state.global_step // per_epoch)
        s = self.sampler
        logger.info("ppo: buffers of %d prompts (%d on each of %d processes) x %d response%s each, trained on %d "
                    "time%s (ppo_epochs) in %d optimizer steps; %d buffers an epoch.", s.buffer_len,
                    s.buffer_len // s.world, s.world, self.samples, "s" if self.samples > 1 else "", o.ppo_epochs,
                    "s" if o.ppo_epochs > 1 else "", o.ppo_epochs * o.ppo_buffer_size, s.buffers)
        return self.sampler

    def count_items(self, batch: dict):
        import torch

        return torch.tensor(sum(len(s.response) for s in self._samples_of(batch)))

    def _samples_of(self, batch: dict) -> list:
        return [s for key in batch["rollout_keys"].tolist() for s in self.experience[tuple(key)]]

    # ---- rollouts ------------------------------------------------------------------------------
    def before_step(self, trainer, batch_samples: list[dict]) -> None:
        keys = [tuple(k) for b in batch_samples for k in b["rollout_keys"].tolist()]
        missing = [k for k in keys if k not in self.experience]
        if not missing:
            return
        epoch, buffer = missing[0][:2]
        share = self.sampler.share(epoch, buffer, trainer.accelerator.process_index)
        import time

        from trainer.stages.rollouts import rollout

        start = time.perf_counter()
        self.experience = {}  # the previous buffer's responses are done with
        self.experience, self.pending = rollout(self, trainer, [(epoch, buffer, slot, i) for slot, i in share])
        self.rollouts += 1
        trainer.exclude_from_window(time.perf_counter() - start)
        _show_progress(trainer, self.rollouts, self.pending)

    # ---- loss ----------------------------------------------------------------------------------
    def compute(self, wrapper, model, batch: dict) -> StageOutput:
        import torch

        from trainer.model import rl_losses as rl
        from trainer.stages.rollouts import collate

        o = self.opts
        samples = self._samples_of(batch)
        device = batch["rollout_keys"].device
        built = collate(samples, device)
        out = wrapper.policy_outputs(model, built, None if self.grpo else self.head, self.temperature)
        mask = out["mask"]
        logps = out["logps"][mask]

        def cat(name):
            return torch.cat([getattr(s, name) for s in samples]).to(device)

        old, advantages = cat("old_logps"), cat("advantages")
        pg, pg_clipped = rl.policy_terms(logps, old, advantages, o.ppo_cliprange)
        terms = pg
        n = torch.ones_like(pg).sum()
        stats = {"policy_loss": (pg.detach().sum().view(1), n.view(1)),
                 "clipfrac/policy": (pg_clipped.sum().view(1), n.view(1)),
                 "approx_kl": ((0.5 * (logps.detach() - old) ** 2).sum().view(1), n.view(1))}
        if not self.grpo:
            vf, vf_clipped = rl.value_terms(out["values"][mask], cat("old_values"), cat("returns"),
                                            o.ppo_cliprange_value)
            terms = terms + o.ppo_vf_coef * vf
            stats["value_loss"] = (vf.detach().sum().view(1), n.view(1))
            stats["clipfrac/value"] = (vf_clipped.sum().view(1), n.view(1))
        elif o.grpo_beta > 0:
            kl = rl.kl_k3(logps, cat("ref_logps"))
            terms = terms + o.grpo_beta * kl
            stats["kl_loss"] = (kl.detach().sum().view(1), n.view(1))
        loss_sum = terms.sum()
        stats["loss"] = (loss_sum.detach().view(1), n.view(1))
        for name, value in self.pending.items():  # a buffer's rollout statistics, counted once
            stats[name] = tuple(None if v is None else v.to(device) for v in value)
        self.pending = {}
        return StageOutput(loss_sum=loss_sum, items=n, stats=stats, batch=built)

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
    def save_extra(self, folder: str, state_dict: dict | None) -> None:
        super().save_extra(folder, state_dict)
        state = {"kl_coef": self.kl_control.value, "score_moments": self.score_moments.state_dict(),
                 "rollouts": self.rollouts}
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)

    def save_process_state(self, folder: str, rank: int) -> None:
        """This process's current buffer: resumed mid-buffer, the run trains on the very responses it sampled."""
        import dataclasses

        import torch

        experience = {key: [dataclasses.asdict(s) for s in samples] for key, samples in self.experience.items()}
        torch.save(experience, os.path.join(folder, EXPERIENCE_FILE.format(rank=rank)))

    def load_state(self, folder: str) -> None:
        import torch

        from trainer.stages.rollouts import Sample

        rank = self.config.training.process_index
        saved = os.path.join(folder, EXPERIENCE_FILE.format(rank=rank))
        if os.path.isfile(saved):
            experience = torch.load(saved, weights_only=True)
            self.experience = {tuple(key): [Sample(**s) for s in samples] for key, samples in experience.items()}
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            logger.warning("%s has no %s: the KL coefficient and score statistics start afresh.", folder, STATE_FILE)
            return
        with open(path) as f:
            state = json.load(f)
        self.kl_control.value = state["kl_coef"]
        self.score_moments.load_state_dict(state["score_moments"])
        self.rollouts = state["rollouts"]


def _causal_hidden(model) -> int:
    from trainer.model.value_head import causal_lm

    return causal_lm(model).config.hidden_size


def _show_progress(trainer, rollouts: int, stats: dict) -> None:
    """Rollouts and the last reward beside the optimizer steps on the Trainer's progress bar."""
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
        if bar is not None:
            total, count = stats["reward"]
            bar.set_postfix(rollouts=rollouts, reward=f"{float(total.sum() / count.sum()):.3f}", refresh=False)

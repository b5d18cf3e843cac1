"""ppo: online RL from a reward model or a reward function (LLaMA-Factory's stage ppo, with its keys), and GRPO.

One loop over the shared engine (stages/online.py, shared with stage grpo, TRL's GRPO with TRL's keys). The Trainer
iterates prompts buffer by buffer, each buffer ppo_epochs times (stages/rollout_sampler.py); when an optimizer step's
prompts have no responses yet, the stage samples them for its process's whole buffer (stages/rollouts.py:
generation, scores, the no-grad forwards, advantages), then every micro-batch trains on its prompts' responses:

- gae (PPO, Ziegler et al. 2019 as TRL implemented it): per-token rewards = -kl_coef (log pi_old - log pi_ref)
  plus the score on the last token; a value head on the policy (the critic); GAE advantages, whitened; the clipped
  policy loss plus ppo_vf_coef x the clipped value loss; kl_coef adapted toward ppo_target after each buffer.
- grpo (DeepSeekMath, Shao et al. 2024): num_generations responses a prompt, advantages (r - mean) / (std + 1e-4)
  within each prompt's group, no value head; the KL to the reference as a loss term, grpo_beta x k3 per token.

One item of the loss is one response token: the loss is the sum over the optimizer step's response tokens (on every
process) divided by their count, so accumulation and processes do not change it. With dropout off (online.py) the
ratio pi / pi_old is exactly 1 before the first update of a buffer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from trainer.errors import ConfigError
from trainer.stages.base import StageOutput, register
from trainer.stages.online import OnlineStage
from trainer.stages.reward import WithValueHead

logger = logging.getLogger(__name__)


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


@register
class PPO(WithValueHead, OnlineStage):
    name = "ppo"
    data_kind = "supervised"  # the prompt is what precedes the last answer; the answer is the reference
    options = PPOOptions
    head_role = "critic"  # its value head estimates values: never a reward model (export leaves it out)
    state_file = "ppo_state.json"

    def __init__(self, config=None, options=None):
        super().__init__(config, options)
        from trainer.model.rl_losses import AdaptiveKLController, RunningMoments

        o = self.opts
        self.grpo = o.advantage_estimator == "grpo"
        self.samples = o.num_generations if self.grpo else 1
        self.kl_control = AdaptiveKLController(o.ppo_init_kl_coef, o.ppo_target, o.ppo_kl_horizon)
        self.score_moments = RunningMoments()
        self.reward = None  # rewards.FunctionReward or rewards.ModelReward
        if config is not None:
            self._check(config)

    @property
    def uses_reference(self) -> bool:
        return not self.grpo or self.opts.grpo_beta > 0

    def _check(self, config) -> None:
        from trainer.stages.rewards import FunctionReward

        g, o = config.generation, self.opts
        self.check_online(config, {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0})
        if config.finetuning.pissa_init and (self.uses_reference or o.reward_model_type == "lora"):
            raise ConfigError("pissa_init: ppo's reference model (and a LoRA reward model) is the policy's base with "
                              "its adapter switched off, and PiSSA has replaced that base by its residual (not the "
                              "model you start from). Train ppo without pissa_init (LLaMA-Factory refuses it too).")
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

    # ---- model ---------------------------------------------------------------------------------
    def extend_model(self, model):
        o = self.opts
        model = super().extend_model(model)  # dropout off, the continued adapter's frozen copy
        if not self.grpo:
            self.attach_head(model)  # the critic
        if o.reward_model_type == "lora":
            from trainer.stages.rewards import ModelReward, load_reward_adapter, load_value_head

            load_reward_adapter(model, o.reward_model)
            hidden = _causal_hidden(model)
            self.reward = ModelReward(o.reward_model, load_value_head(o.reward_model, hidden))
        return model

    def prepare(self, model, wrapper) -> None:
        import torch

        from trainer.model.reference import frozen_dtype, load_frozen, placed_separately, shard_like_policy
        from trainer.options import split_list

        super().prepare(model, wrapper)  # stop tokens, the frozen starting copy (full / freeze)
        o = self.opts
        if o.reward_model_type == "full":
            from trainer.model.wrapper import ModelWrapper
            from trainer.stages.rewards import ModelReward, load_value_head

            dtype = frozen_dtype(self.config)
            scorer = load_frozen(self.config, o.reward_model, split_list(o.reward_model_adapters), model,
                                 dtype or torch.float32, "reward_model", "Reward model")
            head = load_value_head(o.reward_model, scorer.config.hidden_size)
            scorer_wrapper = ModelWrapper(scorer, chunk_size=wrapper.chunk_size)
            if placed_separately(self.config):
                scorer = shard_like_policy(self.config, scorer, dtype, "Reward model")
            self.reward = ModelReward(o.reward_model, head, scorer, scorer_wrapper)

    # ---- data ----------------------------------------------------------------------------------
    def make_sampler(self, size: int, batch: int, accumulation: int, world: int, seed: int, epoch_of=None):
        from trainer.stages.rollout_sampler import RolloutSampler

        o = self.opts
        return RolloutSampler(size, batch, accumulation, world, o.ppo_buffer_size, o.ppo_epochs, seed,
                              epoch_of=epoch_of)

    def micro_batch_tokens(self, config) -> int:
        """Each prompt's num_generations answers, each up to max_new_tokens after the prompt."""
        d = config.data
        longest = min(d.cutoff_len, 2048) + config.generation.max_new_tokens
        return config.training.per_device_train_batch_size * self.samples * longest

    def train_sampler(self, trainer, dataset):
        s, o = super().train_sampler(trainer, dataset), self.opts
        logger.info("ppo: buffers of %d prompts (%d on each of %d processes) x %d response%s each, trained on %d "
                    "time%s (ppo_epochs) in %d optimizer steps; %d buffers an epoch.", s.buffer_len,
                    s.buffer_len // s.world, s.world, self.samples, "s" if self.samples > 1 else "", o.ppo_epochs,
                    "s" if o.ppo_epochs > 1 else "", o.ppo_epochs * o.ppo_buffer_size, s.buffers)
        return s

    # ---- rollouts ------------------------------------------------------------------------------
    def sample_buffer(self, trainer, keys: list[tuple]) -> tuple[dict, dict]:
        from trainer.stages.rollouts import rollout

        return rollout(self, trainer, keys)

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

    # ---- state ---------------------------------------------------------------------------------
    def save_extra(self, folder: str, state_dict: dict | None) -> None:
        WithValueHead.save_extra(self, folder, state_dict)  # the critic
        self.save_state(folder)

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_control.value, "score_moments": self.score_moments.state_dict(),
                "rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.kl_control.value = state["kl_coef"]
        self.score_moments.load_state_dict(state["score_moments"])
        self.rollouts = state["rollouts"]


def _causal_hidden(model) -> int:
    from trainer.model.value_head import causal_lm

    return causal_lm(model).config.hidden_size

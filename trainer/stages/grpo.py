"""grpo: Group Relative Policy Optimization with TRL's GRPOConfig keys and defaults (TRL 1.16).

The online loop is the one stage ppo runs on (stages/online.py: the shared engine, generation function, reference
model, checkpoints and signals; `advantage_estimator: grpo` under ppo keeps its own keys). What grpo adds is TRL's
GRPOTrainer: per_device_train_batch_size and generation_batch_size count completions, not prompts; one generation
(generation_batch_size completions, num_generations per prompt, on every process together) is trained num_iterations
times (the old log-probs kept) over steps_per_generation micro-batches; rewards from several reward_funcs
(grpo_rewards.py) weighted by reward_weights; advantages within each prompt's group scaled as scale_rewards says;
the clipped loss at token or sequence level (GSPO) with epsilon / epsilon_high / delta, normalised as loss_type says,
plus beta x the k3 KL to the reference (beta 0, TRL's default: no reference at all); model/grpo_losses.py holds the
formulas. Its data are prompts with their other columns (grpo_data.py); what a generation does is grpo_rollouts.py.

TRL keys zerotune does not implement are refused by name (TRL_REFUSED), never ignored.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from trainer.errors import ConfigError
from trainer.stages.grpo_data import KIND as PROMPTS  # registers the data kind "prompts"
from trainer.stages.base import StageOutput, register
from trainer.stages.online import OnlineStage

logger = logging.getLogger(__name__)

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
TRL_LOSSES = ("cispo", "sapo", "luspo", "vespo")  # TRL's others, not implemented here
SCALES = {"group": "group", "batch": "batch", "none": "none", True: "group", False: "none"}
_VLLM = "vLLM generation is not supported: stage grpo samples with the policy itself (zerotune's one generation " \
        "function, batched with the KV cache)"
_LOGGED = "completion tables are not logged; the reward, its per-function means and the completion lengths are"
TRL_REFUSED = {
    **{k: _VLLM for k in ("use_vllm", "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode",
                          "vllm_structured_outputs_regex", "vllm_server_base_url", "vllm_server_host",
                          "vllm_server_port", "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization",
                          "vllm_max_model_length", "vllm_tensor_parallel_size", "vllm_importance_sampling_correction",
                          "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
                          "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap",
                          "use_transformers_continuous_batching", "transformers_continuous_batching_config",
                          "use_transformers_paged", "cache_implementation", "ds3_gather_for_generation")},
    **{k: _LOGGED for k in ("log_completions", "num_completions_to_print", "log_unique_prompts",
                            "log_completions_hub_repo", "log_multimodal")},
    **{k: "the TR-DPO reference sync is not implemented; the reference stays the starting model"
       for k in ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps")},
    **{k: "the entropy bonus is not implemented" for k in ("entropy_coef", "use_adaptive_entropy", "entropy_coef_min",
                                                           "entropy_coef_max", "entropy_coef_delta",
                                                           "entropy_target")},
    **{k: "belongs to a loss_type not implemented here (grpo, dapo, dr_grpo and bnpo are)"
       for k in ("sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                 "vespo_lambda_neg")},
    "off_policy_mask_threshold": "DeepSeek-V3.2's off-policy sequence mask is not implemented",
    "min_p": "min_p sampling is not supported (the losses read the untruncated policy; top_p / top_k warn why)",
    "generation_kwargs": "give the generation keys themselves (temperature, top_p, top_k, repetition_penalty)",
    "chat_template_kwargs": "the template writes the prompts: set template, enable_thinking, tool_format",
    "num_generations_eval": "stage grpo has no eval loop; the logged reward is its measure",
    "disable_dropout": "dropout is always off in stage grpo (as disable_dropout: true): remove the key",
    "cast_lm_head_to_fp32": "the output head runs in the training dtype (the loss head computes log-probs in fp32)",
    "router_aux_loss_coef": "the MoE load-balancing loss is not added",
    "max_tool_calling_iterations": "tool-calling rollouts are not implemented",
    "model_init_kwargs": "use the model keys (model_name_or_path, trust_remote_code, ...)",
    "pad_to_multiple_of": "batches are padding-free",
    "shuffle_dataset": "prompts are always drawn in a fresh random order each epoch",
}


@dataclass
class _GRPOKeys:
    # The rewards: functions (module:callable, path/to/file.py:callable) and/or rm-run output folders.
    reward_funcs: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    # Generation (TRL's names and defaults; batch sizes count completions).
    num_generations: int = 8
    max_prompt_length: int | None = None  # latest TRL has none; TRL before 0.26 cut prompts from the left
    max_completion_length: int | None = None  # 512 (TRL's), or max_new_tokens when only that is given
    generation_batch_size: int | None = None  # completions a generation, every process together
    steps_per_generation: int | None = None  # default gradient_accumulation_steps: one generation a step
    # The loss.
    beta: float = 0.0
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: str = "dapo"
    importance_sampling_level: str = field(default="token", metadata={"choices": ("token", "sequence")})
    scale_rewards: bool | str = "group"
    multi_objective_aggregation: str = "sum_then_normalize"
    mask_truncated_completions: bool = False
    top_entropy_quantile: float = 1.0
    use_bias_correction_kl: bool = True
    # zerotune's: each prompt computed once a group in the update and no-grad forwards (the pair stages' prefix
    # sharing, from 2 answers to num_generations); needs the zerotune_segments attention path.
    grpo_prefix_sharing: bool = True
    # zerotune's: in generation each prompt is prefilled once and its KV cache repeated for its num_generations
    # samples (the same tokens as prefilling every copy; off only to measure it).
    grpo_shared_prefill: bool = True

    def __post_init__(self):
        for key, why in TRL_REFUSED.items():
            if getattr(self, key, None) is not None:
                raise ConfigError(f"{key}: {why} (TRL GRPOConfig key).")
        if self.loss_type in TRL_LOSSES:
            raise ConfigError(f"loss_type: {self.loss_type} is TRL's, not implemented here; choose one of "
                              f"{', '.join(LOSS_TYPES)} (TRL's default: dapo).")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type: {self.loss_type!r} is not allowed; choose one of {', '.join(LOSS_TYPES)}.")
        scale = self.scale_rewards.lower() if isinstance(self.scale_rewards, str) else self.scale_rewards
        if scale not in SCALES:
            raise ConfigError(f"scale_rewards: {self.scale_rewards!r} is not allowed; choose group, batch or none "
                              "(true is group, false none).")
        self.scale_rewards = SCALES[scale]
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ConfigError(f"multi_objective_aggregation: {self.multi_objective_aggregation!r}: only "
                              "sum_then_normalize (TRL's default) is implemented.")
        for key in ("num_generations", "num_iterations"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: {getattr(self, key)} must be at least 1.")
        if self.num_generations < 2:
            raise ConfigError("num_generations must be at least 2: GRPO compares each prompt's completions (TRL "
                              "refuses fewer too).")
        for key in ("max_prompt_length", "max_completion_length", "generation_batch_size", "steps_per_generation"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key}: {getattr(self, key)} must be at least 1.")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ConfigError("Set generation_batch_size or steps_per_generation, not both (each sets the other, as "
                              "in TRL).")
        if self.beta < 0:
            raise ConfigError(f"beta: {self.beta} must be non-negative (0: no reference model).")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ConfigError("epsilon and epsilon_high must be positive.")
        if self.delta is not None and self.delta <= 1:
            raise ConfigError(f"delta: {self.delta} caps the ratio from above; it must exceed 1 (INTELLECT-2 "
                              "recommends more than 1 + epsilon).")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ConfigError(f"top_entropy_quantile: {self.top_entropy_quantile} must be in [0, 1].")


# The keys TRL has and zerotune refuses belong to the stage too, so that setting one stops the run by name.
GRPOOptions = dataclasses.make_dataclass(
    "GRPOOptions", [(key, Any, field(default=None)) for key in TRL_REFUSED], bases=(_GRPOKeys,))
GRPOOptions.__module__ = __name__


@register
class GRPO(OnlineStage):
    name = "grpo"
    data_kind = PROMPTS
    item_name = "prompts"
    batch_item_name = "completions"  # TRL's per_device_train_batch_size counts completions
    options = GRPOOptions
    state_file = "grpo_state.json"

    def __init__(self, config=None, options=None):
        super().__init__(config, options)
        self.rewards: list = []  # grpo_rewards.RewardFunction / RewardModel
        self.reward_weights = None
        self.steps_per_generation = self.opts.steps_per_generation or 1
        self.accumulation = 1
        if config is not None:
            self._check(config)

    @property
    def uses_reference(self) -> bool:
        return self.opts.beta > 0

    @property
    def wants_segments(self) -> bool:
        """Ask the loader for zerotune_segments: the one attention path that reads shared prompts."""
        return self.opts.grpo_prefix_sharing

    @property
    def keeps_old_logps(self) -> bool:
        """Whether an update can run on a policy that has moved since the generation (TRL computes old log-probs
        exactly then; otherwise pi / pi_old is exactly 1 and the old log-probs are the current ones, detached)."""
        return self.opts.num_iterations > 1 or self.steps_per_generation > self.accumulation

    # ---- checks --------------------------------------------------------------------------------
    def _check(self, config) -> None:
        import torch

        import trainer.stages.grpo_rewards as grpo_rewards

        t, g, o = config.training, config.generation, self.opts
        self.rewards = grpo_rewards.parse(o.reward_funcs, o.reward_weights, config.finetuning.finetuning_type)
        self.reward_weights = torch.tensor(o.reward_weights or [1.0] * len(self.rewards), dtype=torch.float32)
        given = config.raw.get("max_new_tokens")
        if given is not None and o.max_completion_length is not None and int(given) != o.max_completion_length:
            raise ConfigError(f"max_new_tokens: {given} and max_completion_length: {o.max_completion_length}; set "
                              "one (max_completion_length is TRL's name for the same length).")
        o.max_completion_length = o.max_completion_length or (g.max_new_tokens if given is not None else 512)
        g.max_new_tokens = o.max_completion_length
        self.check_online(config, {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0})
        if not g.do_sample:
            raise ConfigError("stage grpo needs do_sample: true (greedy completions of one prompt are all the same, "
                              "so every advantage would be 0).")
        self._batches(t.per_device_train_batch_size, t.gradient_accumulation_steps, max(t.world_size, 1))

    def _batches(self, batch: int, accumulation: int, world: int) -> None:
        """TRL's batch geometry: generation_batch_size = per_device_train_batch_size x processes x
        steps_per_generation completions; here each process's share holds whole groups and a generation spans whole
        optimizer steps."""
        o = self.opts
        self.accumulation = accumulation
        if o.generation_batch_size is not None:
            if o.generation_batch_size % (batch * world):
                raise ConfigError(f"generation_batch_size: {o.generation_batch_size} must be a multiple of the "
                                  f"global batch (per_device_train_batch_size {batch} x {world} processes), as in TRL.")
            self.steps_per_generation = o.generation_batch_size // (batch * world)
        else:
            self.steps_per_generation = o.steps_per_generation or accumulation
        spg = self.steps_per_generation
        if spg % accumulation:
            raise ConfigError(f"steps_per_generation {spg} must be a multiple of gradient_accumulation_steps "
                              f"{accumulation}: a generation trains whole optimizer steps (one generation a step by "
                              "default).")
        if (batch * spg) % o.num_generations:
            raise ConfigError(f"num_generations {o.num_generations} must divide the completions each process trains a "
                              f"generation (per_device_train_batch_size {batch} x steps_per_generation {spg} = "
                              f"{batch * spg}): each process samples whole groups. Raise per_device_train_batch_size "
                              "or steps_per_generation (or generation_batch_size).")

    # ---- model ---------------------------------------------------------------------------------
    def extend_model(self, model):
        from trainer.model.kernels import SEGMENTS
        from trainer.stages.grpo_rewards import load_models

        model = super().extend_model(model)  # dropout off, the continued adapter's frozen copy
        attention = getattr(model.config, "_attn_implementation", None)
        self.shares_prompts = self.opts.grpo_prefix_sharing and attention == SEGMENTS
        if self.opts.grpo_prefix_sharing and not self.shares_prompts:
            logger.info("grpo_prefix_sharing: off with %s attention (it needs flash_attn: auto and a model that "
                        "zerotune_segments covers); each completion computes its prompt again.", attention)
        elif self.shares_prompts:
            logger.info("grpo_prefix_sharing: each prompt is computed once a group in the update and reference "
                        "forwards, the group's other completions attending to the first one's prompt.")
        logger.info("grpo_shared_prefill: %s", "each prompt is prefilled once in generation, its KV cache repeated "
                    "for its num_generations samples" if self.opts.grpo_shared_prefill else
                    "off: generation prefills every completion's copy of its prompt")
        load_models(self.rewards, model, lora=True)
        return model

    def prepare(self, model, wrapper) -> None:
        from trainer.stages.grpo_rewards import load_models

        super().prepare(model, wrapper)  # stop tokens, the frozen starting copy when beta > 0 (full / freeze)
        load_models(self.rewards, model, self.config, wrapper, lora=False)

    # ---- data ----------------------------------------------------------------------------------
    def make_sampler(self, size: int, batch: int, accumulation: int, world: int, seed: int, epoch_of=None):
        from trainer.stages.rollout_sampler import GroupSampler

        self._batches(batch, accumulation, world)
        o = self.opts
        return GroupSampler(size, batch, accumulation, world, self.steps_per_generation // accumulation,
                            o.num_iterations, seed, o.num_generations, epoch_of=epoch_of)

    def train_sampler(self, trainer, dataset):
        s, o = super().train_sampler(trainer, dataset), self.opts
        logger.info("grpo: each generation samples %d completions (%d prompts x num_generations %d, %d on each of %d "
                    "processes), trained %d time%s (num_iterations) in %d optimizer step%s a pass; %d generations an "
                    "epoch. Old log-probs: %s; reference: %s; loss_type %s, importance_sampling_level %s, "
                    "scale_rewards %s.", s.buffer_len, s.prompts, o.num_generations, s.per_process, s.world,
                    o.num_iterations, "s" if o.num_iterations > 1 else "", s.micro_batches // self.accumulation,
                    "s" if s.micro_batches > self.accumulation else "", s.buffers,
                    "computed after each generation (updates can be off-policy)" if self.keeps_old_logps else
                    "not needed (each update is on-policy: ratio 1)",
                    f"beta {o.beta}" if self.uses_reference else "none (beta 0)", o.loss_type,
                    o.importance_sampling_level, o.scale_rewards)
        return s

    def micro_batch_tokens(self, config) -> int:
        longest = min(config.data.cutoff_len, 2048) + self.opts.max_completion_length
        return config.training.per_device_train_batch_size * longest

    def generate_together(self, count: int) -> int:
        """Completions sampled in one generate call: the process's whole generation, as TRL does."""
        return count

    def count_items(self, batch: dict):
        from trainer.model import grpo_losses as gl

        return gl.items_of(self._mask(self._samples_of(batch), "cpu"), self.opts.loss_type)

    def _mask(self, samples: list, device):
        """[completions, longest]: 1 on each completion's tokens that train (a truncated one's none under
        mask_truncated_completions)."""
        import torch

        lengths = torch.tensor([len(s.response) for s in samples], device=device)
        mask = (torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None]).float()
        return mask * torch.tensor([float(self._trained(s)) for s in samples], device=device)[:, None]

    def _trained(self, sample) -> bool:
        """mask_truncated_completions leaves out a completion that never reached a stop token."""
        return not (self.opts.mask_truncated_completions and sample.response and
                    sample.response[-1] not in self.stop_ids)

    # ---- rollouts ------------------------------------------------------------------------------
    def sample_buffer(self, trainer, keys: list[tuple]) -> tuple[dict, dict]:
        from trainer.stages.grpo_rollouts import grpo_rollout

        return grpo_rollout(self, trainer, keys)

    # ---- loss ----------------------------------------------------------------------------------
    def compute(self, wrapper, model, batch: dict) -> StageOutput:
        import torch

        from trainer.model import grpo_losses as gl
        from trainer.stages.rollouts import collate

        o = self.opts
        samples = self._samples_of(batch)
        device = batch["rollout_keys"].device
        built = collate(samples, device, self.shares_prompts)
        out = wrapper.policy_outputs(model, built, None, self.temperature, entropy=True)
        lengths = [len(s.response) for s in samples]
        flat = out["mask"]
        logps, entropy = _rows(out["logps"][flat], lengths), _rows(out["entropy"][flat], lengths)
        mask = self._mask(samples, device).to(logps.dtype)

        def rows_of(name):
            return _rows(torch.cat([getattr(s, name) for s in samples]).to(device, logps.dtype), lengths)

        old = rows_of("old_logps") if self.keeps_old_logps else logps.detach()
        advantages = torch.cat([s.advantages for s in samples]).to(device, logps.dtype)
        terms = gl.policy_terms(logps, old, advantages, mask, o.epsilon, o.epsilon_high, o.delta,
                                o.importance_sampling_level)
        per_token = terms.loss
        if o.top_entropy_quantile < 1.0:
            pool = _everywhere(entropy.detach()[mask.bool()].float())
            per_token = per_token * gl.high_entropy_mask(entropy.detach(), mask, 1 - o.top_entropy_quantile, pool)
        tokens = mask.sum()
        stats = {"entropy": ((entropy.detach() * mask).sum().view(1), tokens.view(1))}
        if self.uses_reference:
            kl = gl.kl_k3(logps, rows_of("ref_logps"))
            if o.use_bias_correction_kl:
                kl = kl * terms.weight
            per_token = per_token + o.beta * kl
            stats["kl"] = ((kl.detach() * mask).sum().view(1), tokens.view(1))
        loss_sum, items = gl.aggregate(per_token, mask, o.loss_type, o.max_completion_length)
        sequence = terms.ratio.shape[-1] == 1  # GSPO: one ratio a completion, counted per completion (as TRL)
        weight, count = (torch.ones_like(mask[:, :1]), float(len(samples))) if sequence else (mask, tokens)
        low, high = terms.low_clipped.detach(), terms.high_clipped.detach()
        for name, clipped in (("low", low), ("high", high), ("region", torch.maximum(low, high))):
            stats[f"clip_ratio/{name}_mean"] = ((clipped * weight).sum().view(1),
                                                torch.as_tensor(count, device=device).view(1))
        stats["loss"] = (loss_sum.detach().view(1), items.view(1))
        for name, value in self.pending.items():  # a generation's statistics, counted once
            stats[name] = tuple(None if v is None else v.to(device) for v in value)
        self.pending = {}
        return StageOutput(loss_sum=loss_sum, items=items, stats=stats, batch=built,
                           head_tokens=torch.tensor(float(sum(lengths))))


def _rows(flat, lengths: list[int]):
    """The values of consecutive completions (flat, in order) as rows [completions, longest], 0 past each one's end;
    differentiable in the values."""
    import torch

    device = flat.device
    row = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    col = torch.cat([torch.arange(n, device=device) for n in lengths])
    return flat.new_zeros(len(lengths), max(lengths)).index_put((row, col), flat)


def _everywhere(values):
    """These values and every other process's, end to end (top_entropy_quantile's threshold is over all of them, as
    TRL takes it)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(values)], device=values.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.cat([values, values.new_zeros(longest - len(values))])
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(n.item())] for g, n in zip(gathered, sizes)])

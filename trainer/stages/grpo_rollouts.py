"""One grpo generation: sample num_generations completions of each of this process's prompts, score them, and what
the updates then need.

For this process's share of a buffer (whole groups, stages/rollout_sampler.py GroupSampler): completions from the one
generation function in one batched call (as TRL generates its whole local generation batch at once), the rewards of
every reward function and model (grpo_rewards.py), combined with reward_weights and turned into advantages within each
group (model/grpo_losses.py, scale_rewards), then in no-grad forwards over exactly the micro-batches the updates will
run (so that before the first update the log-probs agree to the bit): the reference's log-probs when beta > 0, the
policy's own (old) log-probs only when an update can be off-policy (num_iterations > 1, or a generation spanning
several optimizer steps; otherwise the ratio is exactly 1 and TRL skips them too), and the reward models' scores.

Statistics, under TRL's names, are over the whole generation batch (every process): means as sums and counts, the
standard deviations and length extremes computed once over every process and logged as that value.
"""

from __future__ import annotations

import json
import math
import time

import torch

from trainer.model import grpo_losses as gl
from trainer.stages.grpo_data import COLUMN
from trainer.stages.rollouts import Sample, no_grad_passes, precision, sampling_seed, summed


def _extremes(trainer, values: list[float]) -> list[float]:
    """Maxima over every process (pass -x for a minimum)."""
    totals = torch.tensor(values, dtype=torch.float64, device=trainer.args.device)
    if trainer.accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.all_reduce(totals, op=dist.ReduceOp.MAX)
    return totals.tolist()


def _global_std(trainer, values: torch.Tensor) -> float:
    """The unbiased standard deviation of the non-NaN values of every process."""
    kept = values[~torch.isnan(values)].double()
    n, total, squares = summed(trainer, [float(len(kept)), float(kept.sum()), float((kept ** 2).sum())])
    if n < 2:
        return float("nan")
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1))


def _texts(stage, tokenizer, samples: list[Sample], rows: list[dict]) -> tuple[list, list]:
    """(prompts, completions) as TRL hands them to reward functions: messages for a conversational dataset, else
    strings (the dataset's prompt text; the completion decoded without its stop token and special tokens)."""
    stops = set(stage.stop_ids)

    def text(ids):
        ids = ids[:-1] if ids and ids[-1] in stops else ids
        return tokenizer.decode(ids, skip_special_tokens=True)

    completions = [text(s.response) for s in samples]
    prompts = [row["prompt"] for row in rows]
    if rows and not isinstance(rows[0]["prompt"], str):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    return prompts, completions


def _reward_kwargs(trainer, prompts: list, completions: list, samples: list[Sample], rows: list[dict]) -> dict:
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": [list(s.response) for s in samples]}
    names = []
    for row in rows:
        names += [n for n in row["columns"] if n not in names]
    for name in names:  # the dataset's other columns, one value per completion (None where a row lacks it)
        kwargs.setdefault(name, [row["columns"].get(name) for row in rows])
    kwargs["trainer_state"] = trainer.state
    return kwargs


def completion_seed(args, key: tuple) -> int:
    """A completion's own sampling seed: the run's seed, the generation and the completion's slot in it (never the
    process), so a completion is the same whichever process samples it and in whatever company."""
    return hash((args.seed, key[0], key[1], key[2])) % (2 ** 31)


def grpo_rollout(stage, trainer, keys: list[tuple]) -> tuple[dict, dict]:
    """(experience: key -> [its sample], the generation's statistics as (sums, counts) for the log)."""
    from trainer.generation import generate

    start = time.perf_counter()
    a, g, o = trainer.args, stage.config.generation, stage.opts
    tokenizer, model = trainer.processing_class, trainer.model
    world = trainer.accelerator.num_processes
    samples, rows = [], []
    for key in keys:
        item = stage.items[key[-1]]
        prompt = list(item["input_ids"])
        if o.max_prompt_length:  # TRL's (before 0.26) left truncation
            prompt = prompt[-o.max_prompt_length:]
        samples.append(Sample(prompt, [], []))
        rows.append(json.loads(item[COLUMN][0]))
    with precision(trainer), sampling_seed(a, keys[0], trainer.accelerator.process_index):
        generated = time.perf_counter()
        group = o.num_generations  # the share holds whole groups, each prompt's completions consecutive
        responses = generate(model, [s.prompt for s in samples[::group]], stage.stop_ids, tokenizer.pad_token_id,
                             g, batch_size=stage.generate_together(len(samples)), group=group,
                             shared_prefill=o.grpo_shared_prefill, seeds=[completion_seed(a, key) for key in keys])
        generated = time.perf_counter() - generated
    for s, r in zip(samples, responses):
        s.response = r
    # the micro-batches the updates will run, in order (GroupSampler: consecutive slices of the share)
    batch = a.per_device_train_batch_size
    chunks = [samples[i:i + batch] for i in range(0, len(samples), batch)]
    models = [r for r in stage.rewards if r.kind == "model"]
    found, _ = no_grad_passes(stage, trainer, chunks, policy=stage.keeps_old_logps, scorers=models)
    prompts, completions = _texts(stage, tokenizer, samples, rows)
    kwargs = _reward_kwargs(trainer, prompts, completions, samples, rows)
    from trainer.stages.grpo_rewards import score

    per_function = score(stage.rewards, kwargs, len(samples), {r.name: f for r, f in zip(models, found)},
                         lambda i: f"{rows[i]['source']} (prompt {prompts[i]!r:.300}, completion "
                                   f"{completions[i]!r:.300})")
    rewards = gl.combine_rewards(per_function, stage.reward_weights)
    batch_std = _global_std(trainer, rewards) if o.scale_rewards == "batch" else None
    advantages, group_std = gl.advantages(rewards, o.num_generations, o.scale_rewards, batch_std)
    for s, adv in zip(samples, advantages.tolist()):
        s.advantages = torch.tensor([adv])
    stats = _statistics(stage, trainer, samples, per_function, rewards, group_std)
    stats["time/generation"] = (generated / world, None)
    stats["time/rollout"] = ((time.perf_counter() - start) / world, None)
    experience = {key: [s] for key, s in zip(keys, samples)}
    as_tensors = {name: (torch.as_tensor(float(s), dtype=torch.float64).view(1),
                         None if c is None else torch.as_tensor(float(c), dtype=torch.float64).view(1))
                  for name, (s, c) in stats.items()}
    return experience, as_tensors


def _statistics(stage, trainer, samples: list[Sample], per_function: torch.Tensor, rewards: torch.Tensor,
                group_std: torch.Tensor) -> dict:
    """TRL's figures of one generation: means as (sum, count) over this process (the engine adds every process's),
    standard deviations and extremes over every process as (value, 1) on each (their mean is the value)."""
    stops = set(stage.stop_ids)
    n = len(samples)
    lengths = torch.tensor([float(len(s.response)) for s in samples])
    truncated = torch.tensor([bool(s.response) and s.response[-1] not in stops for s in samples])
    ended = lengths[~truncated]
    stats = {}
    stds = [_global_std(trainer, per_function[:, i]) for i in range(per_function.shape[1])]
    for i, reward in enumerate(stage.rewards):
        column = per_function[:, i]
        kept = column[~torch.isnan(column)]
        stats[f"rewards/{reward.name}/mean"] = (float(kept.sum()), len(kept))
        stats[f"rewards/{reward.name}/std"] = (stds[i], 1)
    kept = rewards[~torch.isnan(rewards)]
    stats["reward"] = (float(kept.sum()), len(kept))
    stats["reward_std"] = (_global_std(trainer, rewards), 1)
    zero = torch.isclose(group_std, torch.zeros_like(group_std))
    stats["frac_reward_zero_std"] = (float(zero.sum()), n)
    longest, minus_shortest, longest_ended, minus_shortest_ended = _extremes(trainer, [
        float(lengths.max()), -float(lengths.min()),
        float(ended.max()) if len(ended) else -1.0, -float(ended.min()) if len(ended) else -math.inf])
    stats["completions/mean_length"] = (float(lengths.sum()), n)
    stats["completions/min_length"] = (-minus_shortest, 1)
    stats["completions/max_length"] = (longest, 1)
    stats["completions/clipped_ratio"] = (float(truncated.sum()), n)
    stats["completions/mean_terminated_length"] = (float(ended.sum()), len(ended))
    if longest_ended >= 0:  # some completion of the generation ended with a stop token
        stats["completions/min_terminated_length"] = (-minus_shortest_ended, 1)
        stats["completions/max_terminated_length"] = (longest_ended, 1)
    stats["generation_tokens"] = (float(lengths.sum()), None)
    return stats

"""One buffer of ppo experience: sample responses, score them, and everything the updates then need.

For this process's share of a buffer (prompts of the sampler's keys): responses from the one generation function
(batched, left-padded, KV cache, the template's stop tokens; under ZeRO-3 or FSDP every process runs the same
number of generate calls and transformers keeps them in step); scores from the reward function or model; then in
no-grad forwards of the training layout (padding-free, a micro-batch's worth at a time) the policy's log-probs at
the sampling temperature, the critic's values and the entropy, and the reference's log-probs (the LoRA base with
the adapters off, or the frozen copy). gae turns scores and the per-token KL into rewards and advantages; grpo
normalises each prompt's scores within its group.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from trainer.model import rl_losses as rl
from trainer.model.losses import IGNORE_INDEX


@dataclass
class Sample:
    """One sampled response and, per response token, what the updates read."""
    prompt: list[int]
    response: list[int]
    reference: list[int]  # the dataset's answer to the prompt (reward functions may compare with it)
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def collate(samples: list[Sample], device, share_groups: bool = False) -> dict:
    """Prompt + response of each sample in the padding-free layout, the response tokens labelled; share_groups:
    consecutive samples of one prompt compute it once (collators.shared_group_prompts)."""
    from trainer.data.collators import Collator

    items = [{"input_ids": s.prompt + s.response, "labels": [IGNORE_INDEX] * len(s.prompt) + s.response,
              "lengths": [len(s.prompt) + len(s.response)]} for s in samples]
    batch = Collator(pad_token_id=0, padding_free=True, share_groups=share_groups)(items)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def precision(trainer):
    """Generation calls the causal LM's own forward, not the one accelerate wrapped in autocast: bf16/fp16 runs
    outside DeepSpeed (whose weights are already in that dtype) generate under autocast too."""
    a = trainer.args
    if trainer.is_deepspeed_enabled or not (a.bf16 or a.fp16):
        return contextlib.nullcontext()
    from trainer.engine.hardware import half_dtype

    return torch.autocast(a.device.type, dtype=half_dtype(a))


@contextlib.contextmanager
def sampling_seed(args, key: tuple, rank: int):
    """Sample a buffer's responses from its own seed (the run's seed, the buffer, the process), leaving the global
    RNG as it was: a resumed run samples exactly what the uninterrupted one did (the Trainer restores its RNG
    only after fetching the first batches, where the rollout already ran)."""
    devices = [torch.cuda.current_device()] if args.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(hash((args.seed, key[0], key[1], rank)) % (2 ** 31))
        yield


def reference_of(stage, model):
    """(model, wrapper-or-None, context) to compute the reference's log-probs with."""
    from trainer.model.adapters import reference_context
    from trainer.model.reference import sharded_module

    if stage.reference is not None:
        ref = stage.reference
        if not sharded_module(ref):
            ref.to(next(model.parameters()).device)
        return ref, stage.reference_wrapper, contextlib.nullcontext()
    return model, None, reference_context(model, stage.reference_adapter)


def _split(values: torch.Tensor, mask: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(values[mask].float().cpu().split(lengths))


def no_grad_passes(stage, trainer, chunks: list[list[Sample]], policy: bool = True, scorers=()) -> tuple[list, float]:
    """In no-grad forwards of the training layout, one chunk of samples at a time: the policy's log-probs into each
    sample's old_logps and, with a value head, its values into old_values (policy: True), the reference's log-probs
    into ref_logps (when the stage uses a reference), and each reward model's scores. Returns (each scorer's scores,
    one tensor over all chunks; the policy's entropy summed over the response tokens, 0 without policy)."""
    if not (policy or stage.uses_reference or scorers):
        return [], 0.0
    model, wrapper, device = trainer.model, trainer.wrapper, trainer.args.device
    temperature, scores, entropy = stage.temperature, [[] for _ in scorers], 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for part in chunks:
                lengths = [len(s.response) for s in part]
                batch = collate(part, device, stage.shares_prompts)
                if policy:
                    out = wrapper.policy_outputs(model, batch, stage.head, temperature, entropy=True)
                    mask = out["mask"]
                    entropy += float(out["entropy"][mask].sum())
                    for s, lp in zip(part, _split(out["logps"], mask, lengths)):
                        s.old_logps = lp
                    if stage.head is not None:
                        for s, v in zip(part, _split(out["values"], mask, lengths)):
                            s.old_values = v
                if stage.uses_reference:
                    ref_model, ref_wrapper, switched = reference_of(stage, model)
                    with switched, precision(trainer):  # a plain copy's forward has no autocast of its own
                        out = (ref_wrapper or wrapper).policy_outputs(ref_model, batch, None, temperature)
                    for s, lp in zip(part, _split(out["logps"], out["mask"], lengths)):
                        s.ref_logps = lp
                for found, scorer in zip(scores, scorers):
                    found.append(scorer.score_batch(model, wrapper, batch))
    finally:
        model.train(was_training)
    return [torch.cat(found) for found in scores], entropy


def _forwards(stage, trainer, samples: list[Sample], chunk: int) -> tuple[list[torch.Tensor], float]:
    """ppo's passes: old log-probs, values and reference log-probs into each sample, in chunks of a micro-batch's
    sequences; the reward model's scores and the entropy sum back."""
    scorers = [stage.reward] if hasattr(stage.reward, "score_batch") else []
    chunks = [samples[start:start + chunk] for start in range(0, len(samples), chunk)]
    scores, entropy = no_grad_passes(stage, trainer, chunks, policy=True, scorers=scorers)
    return scores, entropy


def _function_scores(stage, tokenizer, samples: list[Sample], stops: set[int]) -> torch.Tensor:
    def text(ids):  # up to the reply's stop token (a dataset answer carries its format's suffix after it)
        ids = ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]
        return tokenizer.decode(ids, skip_special_tokens=True)

    return stage.reward.score_texts([tokenizer.decode(s.prompt, skip_special_tokens=True) for s in samples],
                                    [text(s.response) for s in samples], [text(s.reference) for s in samples])


def _padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def summed(trainer, values: list[float]) -> list[float]:
    """Sums over every process (one all-reduce)."""
    totals = torch.tensor(values, dtype=torch.float64, device=trainer.args.device)
    if trainer.accelerator.num_processes > 1:
        totals = trainer.accelerator.reduce(totals, reduction="sum")
    return totals.tolist()


def _moments(trainer, values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """(count, sum, sum of squares) of the masked values over every process."""
    return summed(trainer, [float(mask.sum()), float((values * mask).sum()), float((values ** 2 * mask).sum())])


def _advantages(stage, trainer, samples: list[Sample], scores: torch.Tensor) -> torch.Tensor | None:
    """Advantages and returns into each sample; each response's KL to the reference (sum over its tokens)."""
    o = stage.opts
    lengths = [len(s.response) for s in samples]
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
    logps = _padded([s.old_logps for s in samples], width)
    ref = _padded([s.ref_logps for s in samples], width) if stage.uses_reference else None
    kl = ((logps - ref) * mask).sum(1) if ref is not None else None
    if stage.grpo:
        group = rl.group_advantages(scores, stage.samples)
        for s, a in zip(samples, group.tolist()):
            s.advantages = torch.full((len(s.response),), a)
        return kl
    values = _padded([s.old_values for s in samples], width)
    rewards, _ = rl.token_rewards(scores, logps, ref, mask, stage.kl_control.value)
    if o.ppo_whiten_rewards:
        rewards = rl.whiten(rewards, mask, shift_mean=False, moments=_moments(trainer, rewards, mask)) * mask
    advantages, returns = rl.gae(rewards, values, mask, o.ppo_gamma, o.ppo_lam, whitened=False)
    # whitened over the whole buffer, every process's tokens, so the process count does not change the update
    advantages = rl.whiten(advantages, mask, moments=_moments(trainer, advantages, mask)) * mask
    for i, s in enumerate(samples):
        s.advantages, s.returns = advantages[i, :lengths[i]].clone(), returns[i, :lengths[i]].clone()
    return kl


def rollout(stage, trainer, keys: list[tuple]) -> tuple[dict, dict]:
    """(experience: key -> its samples, the rollout's statistics as (sums, counts) for the log)."""
    from trainer.generation import generate
    from trainer.predict import prompt_and_label

    start = time.perf_counter()
    a, g = trainer.args, stage.config.generation
    tokenizer, model = trainer.processing_class, trainer.model
    world = trainer.accelerator.num_processes
    stops = stage.stop_ids
    samples = []
    for key in keys:
        item = stage.items[key[-1]]
        prompt, reference = prompt_and_label(item["input_ids"], item["labels"])
        samples += [Sample(prompt, [], reference) for _ in range(stage.samples)]
    chunk = a.per_device_train_batch_size * stage.samples  # a micro-batch's sequences
    together = stage.opts.generation_batch_size or chunk * a.gradient_accumulation_steps
    with precision(trainer), sampling_seed(a, keys[0], trainer.accelerator.process_index):
        generated = time.perf_counter()
        # a prompt's stage.samples responses (advantage_estimator grpo) share its prefill
        responses = generate(model, [s.prompt for s in samples[::stage.samples]], stops, tokenizer.pad_token_id,
                             g, batch_size=together, group=stage.samples)
        generated = time.perf_counter() - generated
    for s, r in zip(samples, responses):
        s.response = r
    model_scores, entropy = _forwards(stage, trainer, samples, chunk)
    if model_scores:
        raw = torch.cat(model_scores)
    else:
        raw = _function_scores(stage, tokenizer, samples, set(stops))
    scores = raw
    if stage.opts.ppo_score_norm:  # TRL's use_score_norm over every score so far, on every process
        stage.score_moments.update(*summed(trainer, [len(raw), float(raw.sum()), float((raw ** 2).sum())]))
        scores = (raw - stage.score_moments.mean) / (stage.score_moments.std + 1e-8)
    kl = _advantages(stage, trainer, samples, scores)
    n, tokens = len(samples), sum(len(s.response) for s in samples)
    stats = {"reward": (raw.sum(), n), "reward_sq": ((raw ** 2).sum(), n), "response_length": (tokens, n),
             "entropy": (entropy, tokens), "time/generation": (generated / world, None),
             "generation_tokens": (tokens, None)}
    if kl is not None:
        stats["kl"] = (kl.sum(), n)
    if not stage.grpo:
        stats["kl_coef"] = (stage.kl_control.value, 1)
        total_kl, responses = summed(trainer, [float(kl.sum()), n])
        stage.kl_control.update(total_kl / responses, int(responses))
    stats["time/rollout"] = ((time.perf_counter() - start) / world, None)
    experience = {}
    for i, key in enumerate(keys):
        experience[key] = samples[i * stage.samples:(i + 1) * stage.samples]
    as_tensors = {name: (torch.as_tensor(float(s), dtype=torch.float64).view(1),
                         None if c is None else torch.as_tensor(float(c), dtype=torch.float64).view(1))
                  for name, (s, c) in stats.items()}
    return experience, as_tensors

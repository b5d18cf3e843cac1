"""The one generation function: batched, left-padded prompts, the KV cache on, the template's stop tokens.

The demo, predict (trainer/predict.py), chat (trainer/inference.py), ppo and grpo rollouts (stages/rollouts.py,
stages/grpo_rollouts.py) call it. Prompts of different lengths are left-padded into one batch with an attention
mask, which every attention path honours (zerotune_segments registers a mask function for exactly this;
FlashAttention-2 unpads), so each prompt's answer is the one it would get alone. Defaults are LLaMA-Factory's
generation defaults. Two decoders run the steps: transformers' generate, and zerotune's loop (_decode), which
drops each row from the batch when it stops; greedy and per-row-seeded sampling on CPU take the loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass


@dataclass
class GenerationSettings:
    max_new_tokens: int = 1024
    do_sample: bool = True
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    num_beams: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0


def generate(model, prompts: list[list[int]], stop_ids: list[int], pad_id: int,
             settings: GenerationSettings | None = None, batch_size: int = 16, streamer=None, group: int = 1,
             shared_prefill: bool = True, seeds: list[int] | None = None,
             merge_lora: bool | None = None, own_loop: bool | None = None) -> list[list[int]]:
    """Token ids of each prompt's continuation, cut after its first stop token (which is kept). A transformers
    streamer (one prompt at a time) receives the tokens as they come (zerotune chat).

    group: sample each prompt `group` times (grpo's num_generations); the outputs are then each prompt's `group`
    continuations, consecutive. With shared_prefill each prompt is run through the model once and its KV cache
    repeated for the group's samples (batch_size then counts samples); without, the prompt is repeated before
    the forward, as transformers' num_return_sequences does. Either way one batch of len(chunk) x group rows
    samples every step, so the random draws, and the tokens, are the same.

    seeds: one per returned sample (len(prompts) x group); each sample then draws from its own generator, so its
    tokens do not depend on which samples share its batch, chunk or process (grpo: a completion's seed is its slot
    in the generation).

    merge_lora: decode with each plain LoRA layer's delta merged into a copy of its base weight (one matmul a layer
    instead of three; model/merged_lora.py), the parameters untouched; off, PEFT's own forward. None: on CPU,
    where it was measured faster; not on a GPU until measured there, where the copy of every adapted weight held
    while decoding (a 7B model's 13 GB in bf16) weighs against fewer kernel launches. On CPU the fp32 linears then
    run through oneDNN where this CPU runs them faster than MKL (model/cpu_linear.py).

    own_loop: decode with zerotune's loop (_decode), in which a row that has stopped leaves the batch, instead of
    transformers' generate, which computes every row until the last one stops (a group's shortest completions
    then pay for its longest). It serves greedy and per-seed sampling without a streamer, beams, a repetition
    penalty or processes kept in step (ZeRO-3, FSDP); the same tokens (tests/test_generation_loop.py). None: on
    CPU where it fits, where it was measured; True where it does not fit raises."""
    from trainer.model.cpu_linear import decoding_linears
    from trainer.model.merged_lora import merged_for_decoding

    settings = settings or GenerationSettings()
    kwargs = asdict(settings)
    own_draws = seeds is not None and settings.do_sample
    if seeds is not None and len(seeds) != len(prompts) * group:
        raise ValueError(f"{len(seeds)} seeds for {len(prompts) * group} samples")
    if not settings.do_sample or own_draws:  # greedy (or sampled by _OwnDraws): sampling knobs only raise warnings
        for key in ("temperature", "top_p", "top_k"):
            kwargs.pop(key)
        kwargs["do_sample"] = False
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_call = max(1, batch_size // group)  # prompts a generate call
    unfit = _loop_unfit(model, settings, streamer, own_draws)
    if own_loop and unfit:
        raise ValueError(f"own_loop: zerotune's decode loop does not serve {unfit}")
    loop = own_loop if own_loop is not None else (device.type == "cpu" and unfit is None)
    try:
        merge = merge_lora if merge_lora is not None else device.type == "cpu"
        with merged_for_decoding(model) if merge else contextlib.nullcontext(), decoding_linears(model):
            outputs = _generate(model, prompts, stop_ids, pad_id, kwargs, settings, per_call, streamer, group,
                                shared_prefill, seeds if own_draws else None, device, loop)
    finally:
        model.train(was_training)
    return outputs


def _loop_unfit(model, settings: GenerationSettings, streamer, own_draws: bool) -> str | None:
    """What zerotune's decode loop does not do that this generation asks for, else None."""
    if streamer is not None:
        return "a streamer"
    if settings.num_beams != 1:
        return "beam search"
    if settings.repetition_penalty != 1.0:
        return "repetition_penalty"
    if settings.do_sample and not own_draws:
        return "sampling from one generator for the batch (it samples with a seed a row)"
    if _in_step(model):
        return "processes kept in step (ZeRO-3, FSDP: synced_gpus)"
    return None


def _generate(model, prompts, stop_ids, pad_id, kwargs, settings, per_call, streamer, group, shared_prefill, seeds,
              device, loop: bool) -> list[list[int]]:
    """generate's calls, per_call prompts each (seeds: each sample's own generator, else generate's sampling);
    loop: zerotune's decode loop instead of transformers' generate."""
    import torch

    outputs: list[list[int]] = []
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, prompt in enumerate(chunk):
            ids[b, width - len(prompt):] = torch.tensor(prompt)
            mask[b, width - len(prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        rows = seeds[start * group:(start + len(chunk)) * group] if seeds is not None else None
        if loop:
            with torch.no_grad():
                outputs += _decode(model, ids, mask, group, shared_prefill, stop_ids, settings, rows, device)
            continue
        with torch.no_grad():
            cache = _prefill(model, ids, mask, group) if shared_prefill and group > 1 else {}
            if rows is not None:
                cache["logits_processor"] = _own_draws(settings, rows, device)
            out = model.generate(input_ids=ids.repeat_interleave(group, 0),
                                 attention_mask=mask.repeat_interleave(group, 0), use_cache=True,
                                 eos_token_id=list(stop_ids), pad_token_id=pad_id, streamer=streamer,
                                 synced_gpus=_in_step(model), **cache, **kwargs)
        for row in out[:, width:].tolist():
            outputs.append(_until_stop(row, set(stop_ids)))
    return outputs


def _own_draws(settings: GenerationSettings, seeds: list[int], device):
    """Sampling with one generator a row: temperature, top-k and top-p as transformers' sampling applies them, then
    the Gumbel-max draw (argmax of the scores plus Gumbel noise is an exact sample of their softmax), run by greedy
    decoding, since transformers' multinomial draw takes one generator for the whole batch."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    class GumbelNoise(LogitsProcessor):
        def __init__(self):
            self.generators = [_generator(s, device) for s in seeds]

        def __call__(self, input_ids, scores):
            return scores.float() - torch.log(-torch.log(_uniform(self.generators, scores.shape[-1], device)))

        def keep(self, rows: list[int]) -> None:
            """Only these rows draw from now on (the others stopped); each keeps its own generator's sequence."""
            self.generators = [self.generators[r] for r in rows]

    steps = [TemperatureLogitsWarper(settings.temperature)] if settings.temperature != 1.0 else []
    if settings.top_k:
        steps.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        steps.append(TopPLogitsWarper(settings.top_p))
    return LogitsProcessorList(steps + [GumbelNoise()])


def _generator(seed: int, device):
    import torch

    return torch.Generator(device=device).manual_seed(int(seed))


def _uniform(generators, width: int, device):
    import torch

    return torch.stack([torch.rand(width, generator=g, device=device, dtype=torch.float32) for g in generators])


def _decode(model, ids, mask, group: int, shared_prefill: bool, stop_ids, settings: GenerationSettings, seeds,
            device) -> list[list[int]]:
    """zerotune's decode loop over one chunk of left-padded prompts, `group` samples each: the prompts but their last
    token prefilled (once a prompt with shared_prefill), then one token a step for the rows still going, greedy or
    drawn by each row's own generator (seeds). A row leaves the batch, its KV cache rows with it, at its first stop
    token; transformers' generate would keep computing it, padded, until every row had stopped. Positions and
    masks are generate's own for left-padded rows, so each row's tokens are the ones it gets alone."""
    import torch

    name, keep_logits = _forward_keywords(model)
    shared = shared_prefill and group > 1  # else each sample's copy of its prompt is prefilled
    cache = _prefill(model, ids, mask, group) if shared else None
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    cache = cache if shared else _prefill(model, ids, mask, 1)
    processors = _own_draws(settings, seeds, device) if seeds is not None else []
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    alive = list(range(len(ids)))
    outputs: list[list[int]] = [[] for _ in alive]
    step, positions = ids[:, -1:], mask.sum(-1, keepdim=True) - 1
    for _ in range(settings.max_new_tokens):
        result = model(input_ids=step, attention_mask=mask, position_ids=positions, use_cache=True, **keep_logits,
                       **cache)
        cache = {name: result[name]}
        scores = result.logits[:, -1].float()
        for processor in processors:
            scores = processor(None, scores)
        tokens = scores.argmax(-1)
        for row, token in zip(alive, tokens.tolist()):
            outputs[row].append(token)
        going = ~torch.isin(tokens, stops)
        if not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            cache[name].batch_select_indices(keep)
            mask, positions, tokens = mask[keep], positions[keep], tokens[keep]
            alive = [alive[i] for i in keep.tolist()]
            if processors:
                processors[-1].keep(keep.tolist())
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], 1)
        step, positions = tokens[:, None], positions + 1
    return outputs


def _forward_keywords(model) -> tuple[str, dict]:
    """The name under which the model's forward takes and returns its KV cache (transformers 5.24 names it `cache`,
    past_key_values deprecated; earlier releases only past_key_values), and logits_to_keep=1 where the forward has
    it (the logits of the last position only, not [rows x tokens x vocab])."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes keywords through
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), ({"logits_to_keep": 1} if "logits_to_keep" in params
                                                                    else {})


def _prefill(model, ids, mask, group: int) -> dict:
    """The KV cache of every prompt token but the last (which generate runs itself, producing the first sampled
    token's logits), computed once a prompt and repeated for its group, as the keyword generate reads it. Positions
    are generate's own for left-padded rows (count of real tokens before, pads at 0), so the cached keys are the
    ones an unshared generation would hold."""
    if ids.shape[1] < 2:  # one-token prompts: nothing before the last token to share
        return {}
    prefix = mask[:, :-1]
    positions = (prefix.cumsum(-1) - 1).clamp(min=0)
    name, keep_logits = _forward_keywords(model)  # only the cache is wanted, not every prompt token's logits
    out = model(input_ids=ids[:, :-1], attention_mask=prefix, position_ids=positions, use_cache=True, **keep_logits)
    cache = out[name]
    if group > 1:
        cache.batch_repeat_interleave(group)
    return {name: cache}


def _in_step(model) -> bool:
    """Whether every process must keep running forwards until all have finished (synced_gpus): the weights are
    gathered collectively in each forward under ZeRO-3, and under the FSDP2 sharding of engine/fsdp.py (which
    transformers does not recognise by itself)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from trainer.engine.fsdp import is_sharded

    return is_deepspeed_zero3_enabled() or any(is_sharded(m) for m in model.modules())


def _until_stop(ids: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i + 1]
    return ids

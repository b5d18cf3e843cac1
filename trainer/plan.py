"""zerotune check CFG: the resolved plan, without training — so a user picks a ZeRO stage before renting GPUs.

World size, effective batch in examples and tokens, packing efficiency on the actual data, and the
per-device memory for model states under each ZeRO stage. The trained parameters go through DeepSpeed's
own estimators (fp32 master weights, Adam moments, gradients); frozen parameters (LoRA, freeze) add
their 16-bit copy, partitioned only under ZeRO-3. Activations are not included.
"""

from __future__ import annotations

import math
import os

import torch

from trainer.config import RunConfig

GB = 2**30


def world_size() -> tuple[int, int, int]:
    """(processes, GPUs per node, nodes) the way `zerotune train` would launch on this machine."""
    nodes = int(os.environ.get("NNODES", "1"))
    if "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        return world, max(world // nodes, 1), nodes
    per_node = int(os.environ.get("NPROC_PER_NODE", torch.cuda.device_count() or 1))
    return per_node * nodes, per_node, nodes


def meta_model(config: RunConfig):
    """The model built from its config alone, on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = AutoConfig.from_pretrained(config.model.model_name_or_path,
                                    trust_remote_code=config.model.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(mc, trust_remote_code=config.model.trust_remote_code)


def trained_shapes(config: RunConfig, model) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the run trains: all of them (full), the chosen decoder layers' (freeze), or
    the LoRA factors A (rank x in) and B (out x rank) of each targeted Linear (lora)."""
    from trainer.model.adapters import all_linear_names, decoder_layers

    f = config.finetuning
    if f.finetuning_type == "full":
        return [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if f.finetuning_type == "freeze":
        layers = list(decoder_layers(model))
        chosen = layers[-f.freeze_trainable_layers:] if f.freeze_trainable_layers > 0 else \
            layers[:-f.freeze_trainable_layers]
        ids = {id(p) for layer in chosen for p in layer.parameters()}
        return [(n, tuple(p.shape)) for n, p in model.named_parameters() if id(p) in ids]
    targets = set(all_linear_names(model)) if f.lora_target == ["all"] else set(f.lora_target)
    shapes = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets:
            shapes += [(f"{name}.lora_A.weight", (f.lora_rank, m.in_features)),
                       (f"{name}.lora_B.weight", (m.out_features, f.lora_rank))]
            if f.use_dora:  # DoRA's magnitude vector, one per output row
                shapes.append((f"{name}.lora_magnitude_vector", (m.out_features,)))
    return shapes


def parameter_counts(config: RunConfig, model=None) -> tuple[int, int, int]:
    """(total, trained, largest layer) from the model's config alone (built on the meta device)."""
    from trainer.model.adapters import decoder_layers

    model = meta_model(config) if model is None else model
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model))
    largest = max(largest, model.get_input_embeddings().weight.numel())
    trained = sum(math.prod(shape) for _, shape in trained_shapes(config, model))
    return total, trained, largest


def optimizer_plan(config: RunConfig, model) -> tuple[float, int, str]:
    """(bytes of optimizer state, parameters that hold gradients at once, what holds the state) for the run's
    optimizer keys and `optim`."""
    from trainer.engine.optimizer_options import chosen_method
    from trainer.engine.optimizer_state import state_plan
    from trainer.model.adapters import decoder_layers

    shapes = trained_shapes(config, model)
    block = None
    if chosen_method(config.engine) == "badam":  # one decoder layer trains at a time
        layer = max(decoder_layers(model), key=lambda lay: sum(p.numel() for p in lay.parameters()))
        block = [(n, tuple(p.shape)) for n, p in layer.named_parameters()]
    state, what = state_plan(config.engine, str(getattr(config.training.optim, "value", config.training.optim)),
                             shapes, block)
    at_once = sum(math.prod(s) for _, s in (block or shapes))
    return state, at_once, what


def quantized_weights(config: RunConfig) -> tuple[int, int, float, str] | None:
    """(Linear layers, weights, bytes, what quantizes them) of the quantized base, from the model's config alone:
    every Linear but those transformers keeps unquantized (the output head, tied weights, the checkpoint's
    modules_to_not_convert), at the bytes a weight of a checkpoint quantized ahead (GPTQ, AWQ, AQLM, bitsandbytes:
    its quantization_config, which wins over quantization_bit as it does at load) or of quantization_bit
    (bitsandbytes), scales included. None for a 16-bit base."""
    m = config.model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    from trainer.model.quantization import bytes_per_weight, checkpoint_bytes_per_weight

    mc = AutoConfig.from_pretrained(m.model_name_or_path, trust_remote_code=m.trust_remote_code)
    ahead = checkpoint_bytes_per_weight(mc)
    if ahead is None and m.quantization_bit is None:
        return None
    if ahead is not None:
        method, per_weight, kind = ahead
        if per_weight is None:  # said, not guessed: the 16-bit figure is the most those weights can take
            per_weight, kind = 2.0, f"{kind}, counted at 16-bit (an upper bound)"
        qc = mc.quantization_config
        skipped = (qc.get("modules_to_not_convert") if isinstance(qc, dict) else
                   getattr(qc, "modules_to_not_convert", None)) or []
        kind = f"{kind} ({method} checkpoint, its quantization_config)"
    else:
        per_weight, skipped = bytes_per_weight(m.quantization_bit, m.double_quantization), []
        kind = f"{m.quantization_bit}-bit" + (f" {m.quantization_type.upper()}" + (
            ", double quantization" if m.double_quantization else "") if m.quantization_bit == 4 else "") + \
            " (bitsandbytes)"
    if hasattr(mc, "quantization_config"):  # the meta model is built 16-bit; the plan counts the bytes itself
        del mc.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mc, trust_remote_code=m.trust_remote_code)
    kept = set(get_keys_to_not_convert(model))
    layers = [module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
              and name not in kept and not any(skip in name.split(".") for skip in skipped)]
    weights = sum(module.weight.numel() for module in layers)
    return len(layers), weights, weights * per_weight, kind


def zero_memory(total: int, trained: int, largest: int, per_node: int, nodes: int, state_bytes: float | None = None,
                frozen_bytes: float | None = None) -> dict[str, tuple[float, float]]:
    """Stage -> (GB per device, GB of CPU memory per node) for model states. DeepSpeed's estimators count Adam's two
    fp32 moments (8 bytes a trained parameter); `state_bytes`, the run's optimizer state, replaces them.
    `frozen_bytes`: what the frozen weights take whole (default: 2 bytes each; a quantized base takes less,
    quantized_weights)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = per_node * nodes
    frozen = (total - trained) if frozen_bytes is None else frozen_bytes / 2  # in 16-bit weights' worth
    saved = 0.0 if state_bytes is None else 8 * trained - state_bytes  # below Adam's moments (negative: above)
    out = {"ZeRO-0 (DDP)": ((16 * trained - saved + 2 * frozen) / GB, 0.0)}
    for label, offload in (("ZeRO-2", False), ("ZeRO-2 + offload", True)):
        cpu, gpu = estimate_zero2_model_states_mem_needs(trained, per_node, nodes, cpu_offload=offload)
        cpu, gpu = (cpu - saved / world, gpu) if offload else (cpu, gpu - saved / world)
        out[label] = ((gpu + 2 * frozen) / GB, cpu / GB)
    for label, offload in (("ZeRO-3", False), ("ZeRO-3 + offload", True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(trained, min(largest, trained) or largest, per_node,
                                                              nodes, cpu_offload=offload, cpu_offload_params=offload)
        cpu, gpu = (cpu - saved * per_node / world, gpu) if offload else (cpu, gpu - saved / world)
        frozen_gpu = 0 if offload else 2 * frozen / world
        frozen_cpu = 2 * frozen * per_node / world if offload else 0
        out[label] = ((gpu + frozen_gpu) / GB, (cpu + frozen_cpu) / GB)
    return out


def activation_gb(model_config, tokens: int, compute_bytes: int, tiled_mlp: bool = False) -> float:
    """Activations a decoder keeps for the backward without checkpointing, per micro-batch.

    Per token and layer: about 10 hidden-sized tensors (norm inputs/outputs, q, k, v, attention output,
    residuals) and 4 intermediate-sized ones (gate, up, their product, activation), in the compute dtype,
    plus the fp32 residual stream. An estimate within a factor of ~1.5, enough to decide checkpointing (the CPU's
    bf16 attention also keeps the probabilities of segments up to 512 keys: at most heads x 640 bytes more).
    `tiled_mlp` (model/tiled_mlp.py): the MLP keeps only its input (one of the 10), so the 4 intermediate-sized
    tensors go; one shard's of them exist at a time in the backward, not counted (a shard is ~hidden_size tokens).
    """
    hidden = getattr(model_config, "hidden_size", 0)
    inter = getattr(model_config, "intermediate_size", 4 * hidden)
    layers = getattr(model_config, "num_hidden_layers", 0)
    per_token_layer = (10 * hidden + (0 if tiled_mlp else 4 * inter)) * compute_bytes + 2 * hidden * 4
    return tokens * layers * per_token_layer / GB


def activation_gb_per_token(model_config, compute_bytes: int, checkpointing: bool, tiled_mlp: bool = False) -> float:
    """Activations kept for the backward per token of a micro-batch (activation_gb's model); with gradient
    checkpointing, each layer's input plus one layer's whole activations (the one being recomputed)."""
    whole = activation_gb(model_config, 1, compute_bytes, tiled_mlp)
    if not checkpointing:
        return whole
    layers = max(getattr(model_config, "num_hidden_layers", 1), 1)
    return layers * getattr(model_config, "hidden_size", 0) * compute_bytes / GB + whole / layers


def longest_cutoffs(model_config, states_gb: float, free_gb: float, compute_bytes: int,
                    sizes=(1, 2, 4, 8), tiled_mlp: bool = False) -> dict[int, tuple[int, int]]:
    """sequence_parallel_size -> the longest cutoff_len (one row a pass) whose activations fit beside the model
    states, (without, with) gradient checkpointing. Sequence parallelism divides a row's activations by N (each
    process holds 1/N of the tokens; attention holds 1/N of the heads over the whole row); the loss head is chunked
    (no [tokens x vocab] logits); `tiled_mlp` drops the MLP's intermediates (activation_gb). 0: the model states
    alone do not fit."""
    room = max(free_gb - states_gb, 0.0)
    return {n: tuple(int(room / (activation_gb_per_token(model_config, compute_bytes, ckpt, tiled_mlp) / n))
                     // 256 * 256 for ckpt in (False, True)) for n in sizes}


def available_gb() -> float:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free / GB
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def decide_checkpointing(model, training_args, tokens_per_microbatch: int, sharded: bool = False) -> tuple[bool, str]:
    """Checkpointing costs ~20-25% of throughput; turn it on only when activations would not fit.

    Decided from the memory every process will have left once its model states sit on the device (a model still on
    the CPU will move to the GPU; model_states_bytes says what each process keeps), and agreed over all processes
    (the least free memory decides), since processes that disagree deadlock under ZeRO-3 and FSDP.
    """
    from trainer.engine.agree import agreed_min

    from trainer.model.tiled_mlp import tiled

    compute_bytes = 2 if (training_args.bf16 or training_args.fp16) else 4
    need = activation_gb(model.config, tokens_per_microbatch, compute_bytes, tiled(model))
    weights, states, buffers, how = model_states_bytes(model, training_args, sharded)
    weights, trained = weights / GB, (states + buffers) / GB
    to_move = torch.cuda.is_available() and not any(p.is_cuda for p in model.parameters())
    free = agreed_min(available_gb() - (weights if to_move else 0.0) - trained)
    on = need > 0.6 * free
    why = (f"activations ~{need:.1f} GB per micro-batch of {tokens_per_microbatch} tokens vs ~{free:.1f} GB free "
           f"after {weights:.1f} GB of weights{' (sharded)' if sharded else ''} and {trained:.1f} GB of gradients and "
           f"optimizer states{how}, the least of all processes")
    return on, why


def model_states_bytes(model, training_args, sharded: bool = False) -> tuple[float, float, float, str]:
    """(weights, gradients + optimizer states, DeepSpeed's buffers) in bytes on each process, and how they were
    counted.

    Without DeepSpeed the weights are counted as stored (fp32 for full fine-tuning, autocast computes in 16 bits) and
    each trained parameter adds its gradient and Adam's two moments, 12 bytes; FSDP (`sharded`) divides all of it.
    Under DeepSpeed with bf16/fp16 (the ZeRO paper's mixed precision: 2 + 2 + 12 bytes a trained parameter) the
    weights become 16-bit, the gradients are 16-bit, and the optimizer keeps fp32 master weights and both moments
    (12 bytes); ZeRO-1 partitions the 12, ZeRO-2 the gradients too, ZeRO-3 the weights too (frozen ones included);
    offload_optimizer / offload_param move those to the CPU. Its communication buckets come on top (DeepSpeed's
    documented sizes: reduce + allgather buckets in 16 bits, x4.5 with overlap_comm; ZeRO-3: reduce + prefetch)."""
    from trainer.engine.options import deepspeed_dict
    from trainer.model.params import parameter_count, stored_bytes

    world = max(int(getattr(training_args, "world_size", 1) or 1), 1)
    params = list(model.parameters())
    trained = parameter_count(p for p in params if p.requires_grad)
    stored = sum(stored_bytes(p) for p in params)
    ds = deepspeed_dict(getattr(training_args, "deepspeed", None))
    if not ds:
        share = world if sharded else 1
        return stored / share, 12 * trained / share, 0.0, ""
    zero = ds.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0) or 0)
    half = bool(training_args.bf16 or training_args.fp16)
    weight_bytes, grad_bytes, optim_bytes = (2, 2, 12) if half else (4, 4, 8)  # fp32: the weights are the master
    frozen = sum(stored_bytes(p) for p in params if not p.requires_grad)
    if half:  # DeepSpeed casts the whole module to the 16-bit dtype (a quantized base stays as stored)
        frozen = sum(stored_bytes(p) if p.element_size() < 2 else 2 * p.numel() for p in params
                     if not p.requires_grad)
    offload_params = stage == 3 and _offloaded(zero, "offload_param")
    weights = 0.0 if offload_params else (trained * weight_bytes + frozen) / (world if stage == 3 else 1)
    grads = trained * grad_bytes / (world if stage >= 2 else 1)
    optimizer = 0.0 if _offloaded(zero, "offload_optimizer") else trained * optim_bytes / (world if stage >= 1 else 1)
    hidden = getattr(model.config, "hidden_size", 0)
    if stage == 3:
        buckets = _bucket(zero, "reduce_bucket_size", hidden * hidden) + \
            _bucket(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden * hidden), default=5e7)
    elif stage in (1, 2):
        buckets = (_bucket(zero, "reduce_bucket_size", hidden * hidden)
                   + _bucket(zero, "allgather_bucket_size", hidden * hidden)) * (4.5 if zero.get("overlap_comm") else 1)
    else:
        buckets = 0.0
    buffers = buckets * (2 if half else 4)
    how = (f" (ZeRO-{stage}: {weight_bytes}+{grad_bytes}+{optim_bytes} bytes a trained parameter, "
           f"{buffers / GB:.1f} GB of DeepSpeed buckets)")
    return weights, grads + optimizer, buffers, how


def _offloaded(zero: dict, key: str) -> bool:
    return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")


def _bucket(zero: dict, key: str, auto: int, default: float = 5e8) -> float:
    """A bucket's size in elements: as set, transformers' value for "auto" (from hidden_size), else DeepSpeed's
    default."""
    value = zero.get(key, default)
    return float(auto) if value == "auto" else float(value)


def labelled_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    """Decoded ids with every run of trained tokens (label = the token) wrapped in [[...]]."""
    out, run, trained = [], [], None
    for token, label in zip(ids, labels):
        flag = label == token
        if run and flag != trained:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if trained else text)
            run = []
        run.append(token)
        trained = flag
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def describe(config: RunConfig, with_data: bool = True, deepspeed=None, sequence_parallel: int = 1) -> str:
    """The plan; `deepspeed` and `sequence_parallel` are the YAML's (the check builds the config without DeepSpeed,
    hence without sequence parallelism)."""
    from trainer.model.loading import load_tokenizer

    t, d = config.training, config.data
    world, per_node, nodes = world_size()
    lines = [f"model            {config.model.model_name_or_path} ({config.finetuning.finetuning_type}, "
             f"stage {config.finetuning.stage})",
             f"processes        {world} ({per_node} per node x {nodes} node(s))"]
    sp = sequence_parallel
    if sp > 1:
        lines.append(f"sequence par.    {sp} processes share each row (DeepSpeed Ulysses): data-parallel degree "
                     f"{world} / {sp} = {world // sp}" + ("" if world % sp == 0 else
                                                          f"; REFUSED: {sp} does not divide {world} processes"))
    dp = max(world // sp, 1)
    if config.finetuning.finetuning_type == "lora":
        from trainer.model.lora_variants import plan

        lines.insert(1, f"adapter          {plan(config.finetuning, config.model.adapters)}")
    if config.fsdp:
        mode = "full_shard" if config.fsdp.reshard_after_forward else "shard_grad_op"
        lines.append(f"sharding         FSDP2 {mode} over {world} processes (model states: the ZeRO-3 row below)"
                     if world > 1 else "sharding         fsdp is set, but one process has nothing to shard")
    deepspeed = deepspeed or t.deepspeed
    if deepspeed:
        from trainer.engine.options import deepspeed_dict, zero_stage

        ds = deepspeed_dict(deepspeed).get("zero_optimization", {})
        offload = [k.replace("offload_", "") for k in ("offload_optimizer", "offload_param")
                   if (ds.get(k) or {}).get("device", "none") not in ("none", None)]
        lines.append(f"deepspeed        {deepspeed}: ZeRO-{zero_stage(deepspeed)}"
                     + (f" with {' and '.join(offload)} offload" if offload else "")
                     + " (its row below is what each device holds)")
    rows_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * dp
    unit = "packed rows" if d.packing else "examples"
    per, passes = t.per_device_train_batch_size * config.passes, config.passes
    lines.append(f"global batch     {per} x {t.gradient_accumulation_steps // passes} accumulation x {dp}"
                 f"{' data-parallel groups' if sp > 1 else ''} = {rows_per_step} {unit} a step"
                 + (f" (each group runs its {per * (t.gradient_accumulation_steps // passes)} as passes of one row)"
                    if sp > 1 else ""))
    what_if = "NPROC_PER_NODE" in os.environ or "NNODES" in os.environ
    auto = str(config.engine.forward_batch_size).lower() == "auto"
    if what_if and auto and passes > 1 and not torch.cuda.is_available():
        lines.append(f"passes           forward_batch_size auto: on GPUs each device's batch of {per} runs in one pass "
                     f"(on this CPU it would run as {per} passes of 1)")
    elif passes > 1:
        lines.append(f"passes           each device's batch of {per} runs as {passes} forward/backward passes of "
                     f"{t.per_device_train_batch_size} (forward_batch_size: {config.engine.forward_batch_size})")
    if with_data and d.dataset:
        from trainer.data import packing, processing
        from trainer.data.templates import get_template
        from trainer.stages import build_stage

        stage = build_stage(config)
        tok = load_tokenizer(config.model)
        template = get_template(d.template, tok, d) if stage.needs_template else None
        data, report = processing.tokenized_dataset(d.dataset, d, stage.data_kind, tok, template, False)
        lengths = processing.column_values(data, "length")
        mean = sum(lengths) / len(lengths)
        if d.packing:
            bins = packing.best_fit_bins(lengths, d.cutoff_len)
            eff = sum(lengths) / (len(bins) * d.cutoff_len)
            items = len(bins)
            per_step = min(rows_per_step, items) * d.cutoff_len * eff
            lines.append(f"data             {len(lengths)} examples, {sum(lengths)} tokens, mean {mean:.0f}; "
                         f"packed into {len(bins)} rows of {d.cutoff_len}: packing efficiency {100 * eff:.1f}%")
            lines.append(f"tokens a step    ~{per_step:.0f} real tokens ({per_step / mean:.1f} examples)")
        else:
            items = len(lengths)
            lines.append(f"data             {len(lengths)} examples, {sum(lengths)} tokens, mean {mean:.0f} (no packing)")
            lines.append(f"tokens a step    ~{min(rows_per_step, items) * mean:.0f} real tokens")
        steps = stage.steps_per_epoch(items, t.per_device_train_batch_size, t.gradient_accumulation_steps, dp)
        lines.append(f"steps an epoch   {steps} optimizer steps over {items} {unit}")
        if rows_per_step > items:
            lines.append(f"WARNING          one step takes {rows_per_step} {unit} but the data has only {items}: every "
                         "epoch is a single, partly empty step. Lower the batch, the accumulation or the processes.")
        if report.truncated:
            lines.append(f"truncated        {report.truncated} examples longer than cutoff_len={d.cutoff_len}")
        if len(data):
            first = data.select_columns(["input_ids", "labels"])[0]
            lines.append(f"example          the first one as the model sees it (template {d.template}); "
                         "[[...]]: tokens that carry labels")
            lines += ["  " + line for line in labelled_text(tok, first["input_ids"], first["labels"]).split("\n")]
    model = meta_model(config)
    total, trained, largest = parameter_counts(config, model)
    lines.append(f"parameters       {total / 1e6:.1f}M, trained {trained / 1e6:.2f}M")
    state, at_once, what = optimizer_plan(config, model)
    lines.append(f"optimizer        {what}")
    from trainer.engine.optimizer_options import METHOD_KEYS, SHARDING_REFUSED, chosen_method

    refused = chosen_method(config.engine) in SHARDING_REFUSED
    frozen_bytes = None
    quantized = quantized_weights(config)
    if quantized:
        layers, weights, stored, kind = quantized
        lines.append(f"quantized        {kind}: {layers} Linear layers, {weights / 1e6:.1f}M weights in "
                     f"{stored / GB:.2f} GB (16-bit: {2 * weights / GB:.2f} GB); the other "
                     f"{(total - weights) / 1e6:.1f}M weights in 16-bit")
        frozen_bytes = stored + 2 * (total - weights)  # every base weight is frozen under LoRA
    lines.append("model states per device (DeepSpeed estimators, with this optimizer's state; activations not "
                 "included):")
    states = zero_memory(total, at_once, largest, per_node, nodes, state, frozen_bytes)
    for stage_name, (gpu, cpu) in states.items():
        cpu_text = f", CPU {cpu:.2f} GB per node" if cpu else ""
        if refused and stage_name != "ZeRO-0 (DDP)":
            lines.append(f"  {stage_name:18s} refused with {METHOD_KEYS[chosen_method(config.engine)]}")
            continue
        lines.append(f"  {stage_name:18s} {gpu:8.2f} GB{cpu_text}")
    lines += _long_context(config, model, states, deepspeed, sp)
    return "\n".join(lines)


def _long_context(config: RunConfig, model, states: dict, deepspeed, sp: int) -> list[str]:
    """The longest cutoff_len one device fits under the run's ZeRO stage for sequence_parallel_size 1, 2, 4, 8."""
    from trainer.engine.options import deepspeed_dict, zero_stage

    stage = zero_stage(deepspeed) if deepspeed else 0
    ds = deepspeed_dict(deepspeed).get("zero_optimization", {})
    offload = (ds.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    row = "ZeRO-0 (DDP)" if stage == 0 else f"ZeRO-{3 if stage == 3 else 2}" + (" + offload" if offload else "")
    free = available_gb()
    where = "free GPU memory" if torch.cuda.is_available() else "this machine's available RAM"
    t = config.training
    tiled = config.model.tiled_mlp
    fits = longest_cutoffs(model.config, states[row][0], free, 2 if (t.bf16 or t.fp16) else 4, tiled_mlp=tiled)
    lines = [f"long context     longest cutoff_len a device fits, one row a pass ({row} states, ~{free:.0f} GB "
             f"{where}; sequence parallelism divides activations by N"
             + ("; tiled_mlp keeps no MLP intermediates" if tiled else "") + "; an estimate):"]
    for n, (plain, ckpt) in fits.items():
        mark = "  <- this run" if n == sp else ""
        lines.append(f"  sequence_parallel_size {n}: {plain:>9,d} tokens, {ckpt:>10,d} with gradient checkpointing"
                     + mark)
    return lines

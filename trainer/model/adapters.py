"""finetuning_type lora | freeze | full: which parameters train."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.model.lean_ops import lean_lora
from trainer.model.lora_variants import check_dora_rows, check_pissa_weights, describe, saved_adapter, \
    variant_fields, warn_unconverted
from trainer.model.params import parameter_count
from trainer.model.quantization import is_quantized

logger = logging.getLogger(__name__)

OUTPUT_LAYERS = ("lm_head", "embed_out", "output_layer", "v_head", "score")


def all_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of every Linear layer inside the decoder (the 'all' of lora_target)."""
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear) and full.split(".")[-1] not in OUTPUT_LAYERS:
            names.add(full.split(".")[-1])
    return sorted(names)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"finetuning_type: freeze cannot find the decoder layers of {type(model).__name__}.")


def merge_adapter(model, path: str, key: str = "adapter_name_or_path"):
    """The model with the LoRA adapter at `path` merged into its weights."""
    from peft import PeftModel

    _check_adapter(path, key)
    path, variant = saved_adapter(path, key=key)
    with _adapter_fits(model, path, key):
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    logger.info("Merged the %s adapter %s.", variant, path)
    return model


def attach_adapter(model, path: str, key: str = "adapter_name_or_path"):
    """The model with the LoRA adapter at `path` beside its weights, unmerged: over a quantized base, as it was trained
    (merging would round the adapter into the quantized weights)."""
    from peft import PeftModel

    _check_adapter(path, key)
    with _adapter_fits(model, path, key):
        model = PeftModel.from_pretrained(model, path)
    logger.info("Loaded the adapter %s beside the quantized base (unmerged).", path)
    return model


def _check_adapter(path: str, key: str) -> None:
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ConfigError(f"{key} {path!r} holds no adapter_config.json (a LoRA run's output_dir or checkpoint holds "
                          "one).")


@contextlib.contextmanager
def _adapter_fits(model, path: str, key: str):
    """An adapter trained on another base model fails deep in PEFT with torch's 'size mismatch' for every weight:
    say instead which base it was trained on (its adapter_config.json names it) and which one it met."""
    try:
        yield
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        try:
            with open(os.path.join(path, "adapter_config.json")) as f:
                named = json.load(f).get("base_model_name_or_path")
            trained_on = repr(named) if named else "an unnamed base model"
        except (OSError, ValueError):
            trained_on = "an unknown base model"
        given = getattr(model, "name_or_path", "")  # the folder or hub id it was loaded from
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
        raise ConfigError(f"{key} {path!r} was trained on {trained_on}, and its weights do not fit the model it is "
                          f"applied to, {given!r} (model_name_or_path): {first} Use the base model the adapter was "
                          "trained on.") from None


def apply_lora(model, args, adapters: list[str], is_trainable: bool, watched: WatchedTokens | None = None):
    """New adapters, or adapter_name_or_path as LLaMA-Factory reads a comma list: all but the last merged into the
    base, the last one loaded to train further (or to evaluate); with create_new_adapter, all of them merged and a new
    adapter trained. New adapters also train the rows of `watched`'s tokens that look never trained
    (new_token_rows)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapters and is_trainable and args.create_new_adapter:
        for path in adapters:
            model = merge_adapter(model, path)
        logger.info("create_new_adapter: %s merged into the base; a new adapter trains on it.", ", ".join(adapters))
    elif adapters:
        for path in adapters[:-1]:
            model = merge_adapter(model, path)
        _check_adapter(adapters[-1], "adapter_name_or_path")
        last, variant = saved_adapter(adapters[-1], args if is_trainable else None)
        with _adapter_fits(model, last, "adapter_name_or_path"):
            model = PeftModel.from_pretrained(model, last, is_trainable=is_trainable)
        lean_lora(model)
        logger.info("Loaded the %s adapter from %s (to %s).", variant, last,
                    "train further" if is_trainable else "evaluate")
        return model
    targets = all_linear_names(model) if args.lora_target == ["all"] else list(args.lora_target)
    known = set(all_linear_names(model)) | {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in known]
    if missing:
        raise ConfigError(f"lora_target: {missing} match no module of this model; its linear layers are "
                          f"{all_linear_names(model)} (or use all).")
    rows = new_token_rows(model, args, watched) if is_trainable else None
    if args.pissa_init:
        check_pissa_weights(model, targets)
        if is_trainable:
            warn_unconverted(args)
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, modules_to_save=args.additional_target, task_type="CAUSAL_LM",
                        trainable_token_indices=rows, **variant_fields(args))
    model = get_peft_model(model, config)
    if args.use_dora:
        check_dora_rows(model)
    lean_lora(model)
    logger.info("LoRA adapter: %s (%s).", describe(model, args), ",".join(targets))
    return model


def apply_freeze(model, args) -> None:
    layers = decoder_layers(model)
    n = args.freeze_trainable_layers
    if n == 0:
        raise ConfigError("freeze_trainable_layers: 0 trains nothing; a positive n trains the last n layers, a negative "
                          "n the first n.")
    if abs(n) > len(layers):  # as LLaMA-Factory: more layers than the model has means all of them
        logger.warning("freeze_trainable_layers: %d, but the model has %d layers; training all of them.", n,
                       len(layers))
        n = len(layers) if n > 0 else -len(layers)
    chosen = range(len(layers) - n, len(layers)) if n > 0 else range(-n)
    modules = args.freeze_trainable_modules
    for p in model.parameters():
        p.requires_grad_(False)
    matched = 0
    for i in chosen:
        for name, p in layers[i].named_parameters():
            if modules == ["all"] or any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", name) for m in modules):
                p.requires_grad_(True)
                matched += 1
    for sub in _extra_modules(model, layers, args.freeze_extra_modules or []):
        for p in sub.parameters():
            p.requires_grad_(True)
            matched += 1
    if not matched:
        raise ConfigError(f"freeze_trainable_modules: {modules} match no parameter of the chosen layers.")
    logger.info("Freeze tuning: training layers %s (%s).", list(chosen), ",".join(modules))


def _extra_modules(model, layers, names: list[str]) -> list:
    """freeze_extra_modules: full module names (model.embed_tokens) or LLaMA-Factory's short ones (embed_tokens,
    lm_head, norm): the last part of the name of a module outside the decoder layers."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    outside = {name: m for name, m in model.named_modules() if name and id(m) not in inside
               and any(True for _ in m.parameters(recurse=False))}
    chosen = []
    for extra in names:
        found = [m for name, m in outside.items() if name == extra or name.split(".")[-1] == extra]
        if not found:
            short = sorted({name.split(".")[-1] for name in outside})
            raise ConfigError(f"freeze_extra_modules: {extra!r} is not a module of this model outside its layers; "
                              f"choose from: {', '.join(short)} (or their full names: {', '.join(sorted(outside))}).")
        chosen += found
    return chosen


def prepare_trainable(model, finetuning_args, model_args, is_trainable: bool, watched: WatchedTokens | None = None):
    """`watched`: the tokens a training run teaches (WatchedTokens), whose new rows a LoRA run trains."""
    kind = finetuning_args.finetuning_type
    if is_trainable and kind != "lora" and is_quantized(model):  # quantized ahead (quantization_bit: config.py)
        raise ConfigError(f"finetuning_type: {kind}: {model_args.model_name_or_path} is a quantized checkpoint, and "
                          "quantized models can only be trained with LoRA (their packed weights take no update). "
                          "Set finetuning_type: lora, or use the 16-bit checkpoint.")
    if kind == "lora":
        model = apply_lora(model, finetuning_args, model_args.adapters, is_trainable, watched)
    elif kind == "freeze":
        apply_freeze(model, finetuning_args)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    # The optimizer keeps fp32 copies only of what it trains; keep those in fp32 even on a bf16 base.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    trainable = parameter_count(p for p in model.parameters() if p.requires_grad)
    total = parameter_count(model.parameters())
    logger.info("Trainable parameters: %d of %d (%.3f%%).", trainable, total, 100 * trainable / max(total, 1))
    return model


def _embeddings(model) -> dict[str, nn.Module]:
    """{"input": the input embedding, "output": the head} of a model, inside PEFT's wrapper (a PEFT-wrapped
    module's .weight is the weight it computes with: the trained rows put in)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"input": base.get_input_embeddings(), "output": base.get_output_embeddings()}


def untrained_rows(model, token_ids) -> dict[tuple[str, int], torch.Tensor]:
    """{(which embedding, "input" or "output", token id): a copy of the row} for the rows of `token_ids` that look
    never trained.

    A model can ship tokens it never saw in pre-training (a base model's chat tokens, tokens added to a
    tokenizer later). Their rows are zeros, tiny, or the mean of all rows. If such a token is the
    template's stop token and the rows stay frozen (LoRA, freeze), the model never learns to stop.
    """
    found = {}
    ids = sorted({int(i) for i in token_ids if i is not None and i >= 0})
    for which, emb in _embeddings(model).items():
        weight = getattr(emb, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2 or weight.shape[0] < 8:  # meta: no values to read
            continue
        valid = [i for i in ids if i < weight.shape[0]]
        if not valid:
            continue
        with torch.no_grad():  # vectorized: the labels of a run can hold most of the vocabulary
            w = weight.float()
            norms = w.norm(dim=1)
            near_mean = torch.nn.functional.cosine_similarity(w[valid], w.mean(dim=0)[None], dim=1) > 0.999
            tiny = norms[valid] < 0.1 * norms.median()
            for tid, bad in zip(valid, (near_mean | tiny).tolist()):
                if bad:
                    found[(which, tid)] = weight[tid].detach().clone()
    return found


def untrained_token_rows(model, token_ids) -> list[int]:
    """Token ids whose input or output embedding row looks never trained (untrained_rows)."""
    return sorted({tid for _, tid in untrained_rows(model, token_ids)})


def rows_left_as_they_were(model, base_rows: dict[tuple[str, int], torch.Tensor]) -> list[int]:
    """Token ids some of whose rows that looked untrained in the base model (untrained_rows of it) are exactly as
    they were in `model` (the base with adapters merged). A row that changed at all was trained: after a few steps
    at a small learning rate it can still look like the mean row, so the look of the trained row cannot tell."""
    embs = _embeddings(model)
    with torch.no_grad():
        return sorted({tid for (which, tid), row in base_rows.items()
                       if torch.equal(embs[which].weight[tid].to(row.device, row.dtype), row)})


@dataclasses.dataclass
class WatchedTokens:
    """The tokens a training run teaches the model to emit: the template's stop tokens and every token id in the
    training labels (None: not known ahead, a stream; then the stop tokens alone). `from_rank0`: the processes other
    than rank 0 hold meta weights (model/rank0_load.py), so which rows look untrained is read on rank 0."""
    tokenizer: object
    stop_ids: list[int]
    label_ids: list[int] | None = None
    from_rank0: bool = False

    @property
    def ids(self) -> list[int]:
        return sorted(set(self.stop_ids) | set(self.label_ids or []))

    def names(self, ids) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(ids))


def new_token_rows(model, args, watched: WatchedTokens | None) -> dict[str, list[int]] | None:
    """trainable_token_indices for a new LoRA adapter: the rows of the input embedding and the head (those that
    additional_target does not already train whole) of the watched tokens that look never trained. LoRA leaves
    those rows frozen, so a template token new to the model (SmolLM2 with llama3's <|eot_id|>) would never be
    emitted: the tuned model would not stop. PEFT trains just those rows and saves them with the adapter, and
    PeftModel.from_pretrained puts them back. None: nothing to train that way (or train_new_token_rows: false)."""
    if watched is None or not args.train_new_token_rows:
        return None
    ids = untrained_token_rows(model, watched.ids)
    if watched.from_rank0:
        from trainer.model.rank0_load import from_rank0

        ids = from_rank0(ids)
    if not ids:
        return None
    whole = set(args.additional_target or [])
    modules = [name.split(".")[-1] for name, module in model.named_modules()
               if any(module is emb for emb in _embeddings(model).values())]
    modules = [m for m in dict.fromkeys(modules) if m not in whole]  # PEFT refuses a module both ways
    if not modules:
        return None
    logger.info("Training the %s rows of %s (new tokens whose rows look untrained: LoRA alone would leave them "
                "frozen, and the model could not learn to emit them), saved with the adapter as PEFT's "
                "trainable_token_indices. train_new_token_rows: false turns this off.",
                " and ".join(modules), ", ".join(watched.names(ids)))
    return {m: ids for m in modules}


def _rows_train(module: nn.Module, tid: int) -> bool:
    """Does this embedding's row of token `tid` train: the whole weight (full, additional_target), or the token is
    among the rows PEFT trains (trainable_token_indices)?"""
    adapter = getattr(module, "token_adapter", None)
    if adapter is not None:
        return any(tid in ids for name, ids in adapter.token_indices.items() if name in adapter.active_adapters)
    weight = getattr(module, "weight", None)
    return weight is not None and weight.requires_grad


def warn_untrained_stop_tokens(model, tokenizer, stop_ids: list[int], finetuning_args) -> None:
    """After the trained parameters are chosen: the stop tokens whose rows look untrained, and whether they train."""
    bad = untrained_token_rows(model, stop_ids)
    if not bad:
        return
    names = tokenizer.convert_ids_to_tokens(bad)
    embs = _embeddings(model).values()
    if all(_rows_train(emb, tid) for emb in embs for tid in bad):
        logger.warning("Stop token(s) %s have untrained embedding rows; this run trains those rows.", names)
    else:
        logger.warning(
            "STOP TOKEN NOT TRAINED: %s ends every reply in this template, but its embedding rows look untrained "
            "and %s keeps them frozen, so the tuned model may never stop generating. Use "
            "finetuning_type: full, or lora with train_new_token_rows: true (the default) or additional_target: "
            "embed_tokens,lm_head, or a template whose stop token the model knows.", names,
            finetuning_args.finetuning_type)


# ---- several adapters on one model: the frozen ones a stage switches to (ppo's reward model, a reference) ----------
REFERENCE_ADAPTER = "reference"


def peft_model(model):
    """The PeftModel inside DDP / DeepSpeed / FSDP wrappers (None: no adapters)."""
    while True:
        if hasattr(model, "disable_adapter"):
            return model
        inner = getattr(model, "module", None)
        if inner is None:
            return None
        model = inner


def load_frozen_adapter(model, folder: str, name: str, key: str = "adapter_name_or_path") -> None:
    """A LoRA adapter as another, frozen adapter of the model (switched on with use_adapter); `key` names the YAML
    key it came from, for errors."""
    peft = peft_model(model)
    folder, _ = saved_adapter(folder, key=key, beside=True)
    with _adapter_fits(peft, folder, key):
        peft.load_adapter(folder, adapter_name=name, is_trainable=False)
    for key, p in peft.named_parameters():
        if f".{name}." in key:
            p.requires_grad_(False)


@contextlib.contextmanager
def use_adapter(model, name: str):
    """Run the model with another of its adapters active, then switch back, leaving every parameter's
    requires_grad as it was (PEFT's set_adapter marks the adapter it activates trainable)."""
    peft = peft_model(model)
    flags = {p: p.requires_grad for p in peft.parameters()}
    active = peft.active_adapter
    peft.base_model.set_adapter(name)
    try:
        yield
    finally:
        peft.base_model.set_adapter(active)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def keep_starting_adapter(model, config) -> str | None:
    """A LoRA run that trains adapter_name_or_path further starts from base + that adapter: its reference model is
    that, not the bare base that switching the adapters off gives. Loads a frozen copy of the adapter and returns
    its name (None: no adapter to continue, the base with adapters off is the start)."""
    adapters = config.model.adapters
    if not adapters or config.finetuning.finetuning_type != "lora" or config.finetuning.create_new_adapter:
        return None  # create_new_adapter: the given adapters are merged into the base, which is the start
    load_frozen_adapter(model, adapters[-1], REFERENCE_ADAPTER)
    logger.info("Reference model: the base with %s (a frozen copy of the adapter this run starts from and trains).",
                adapters[-1])
    return REFERENCE_ADAPTER


def reference_context(model, adapter: str | None):
    """The model as its reference: the frozen starting adapter switched on, else every adapter off."""
    if adapter:
        return use_adapter(model, adapter)
    peft = peft_model(model)
    if peft is None:
        raise ConfigError("the reference model is the LoRA base; the model has no adapters.")
    return peft.disable_adapter()

"""One YAML (LLaMA-Factory key vocabulary) + key=value overrides -> one validated RunConfig.

Every key belongs to exactly one of: ModelArguments, DataArguments, FinetuningArguments (ours) or
transformers.TrainingArguments. Values are coerced by the field's declared type, so `1.0e-4`, `1e-4`
and `"1e-4"` are all floats and `lora_target: q_proj,v_proj` is a list. Anything unknown or
ill-typed fails here, before a model or dataset is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer import lf_compat
from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

STAGES = ("pt", "sft", "rm", "ppo", "dpo", "kto", "orpo")  # LLaMA-Factory's stages (and orpo): planned or built
FINETUNING_TYPES = ("lora", "freeze", "full")
FLASH_ATTN = ("auto", "fa2", "sdpa", "eager", "disabled")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Local folder or hub id."})
    adapter_name_or_path: str | None = field(default=None, metadata={"help": "LoRA adapter to load."})
    trust_remote_code: bool = False
    cache_dir: str | None = None
    model_revision: str = "main"
    hf_hub_token: str | None = None
    flash_attn: str = field(default="auto", metadata={"choices": FLASH_ATTN})
    enable_liger_kernel: bool = False
    chunked_loss: bool = field(default=True, metadata={"help": "Loss without full logits (chunked head)."})
    use_fast_tokenizer: bool = True


@dataclass
class DataArguments:
    dataset: list[str] | None = None
    eval_dataset: list[str] | None = None
    dataset_dir: str = "data"
    template: str | None = None
    cutoff_len: int = 2048
    max_samples: int | None = None
    val_size: float = 0.0
    packing: bool | None = field(default=None, metadata={
        "help": "Pack examples across batches into rows of cutoff_len (fewer, fuller steps). Default: true for pt, "
                "false otherwise, as in LLaMA-Factory."})
    neat_packing: bool = field(default=False, metadata={"help": "Alias of packing: true (never contaminated)."})
    padding_free: bool = field(default=True, metadata={
        "help": "Lay each micro-batch's examples end to end in one row, without padding (the steps hold the same "
                "examples either way). false: one right-padded example a row (needs packing: false)."})
    train_on_prompt: bool = False
    mask_history: bool = False
    overwrite_cache: bool = False
    streaming: bool = field(default=False, metadata={"help": "Read, tokenize and pack on the fly (needs max_steps)."})
    preprocessing_num_workers: int | None = None
    preprocessing_batch_size: int = 1000
    default_system: str | None = None
    max_bad_rows: float = field(
        default=0.1, metadata={"help": "Malformed rows tolerated per dataset: a fraction (< 1) or a count (>= 1)."})
    cutoff_policy: str = field(default="truncate", metadata={
        "choices": ("truncate", "drop"), "help": "Examples longer than cutoff_len: truncate them or drop them."})
    tokenized_path: str | None = field(default=None, metadata={
        "help": "As in LLaMA-Factory: load the tokenized training data saved here, or tokenize and save it here."})
    tokenized_cache_dir: str | None = field(
        default=None, metadata={"help": "Where tokenized data is cached (default ~/.cache/zerotune/tokenized)."}
    )


@dataclass
class FinetuningArguments:
    stage: str = field(default="sft", metadata={"help": "A registered stage plugin (trainer/stages)."})
    finetuning_type: str = field(default="lora", metadata={"choices": FINETUNING_TYPES})
    lora_target: list[str] = field(default_factory=lambda: ["all"])
    lora_rank: int = 8
    lora_alpha: int | None = field(default=None, metadata={"help": "Default: 2 * lora_rank."})
    lora_dropout: float = 0.0
    additional_target: list[str] | None = None
    freeze_trainable_layers: int = 2
    freeze_trainable_modules: list[str] = field(default_factory=lambda: ["all"])
    freeze_extra_modules: list[str] | None = None
    plot_loss: bool = False
    disable_gradient_checkpointing: bool = False
    forward_batch_size: str = field(default="auto", metadata={"help": (
        "Rows per forward/backward pass: per_device_train_batch_size is run as passes of this many rows whose "
        "gradients are accumulated (the same optimizer steps and gradient, less activation memory). auto: the "
        "whole batch on GPU and for padding-free batches (one row already); on CPU, one packed or padded row a "
        "pass, which measured both faster and leaner there.")})
    overwrite_output_dir: bool = False
    skip_nonfinite_batches: bool = field(
        default=False, metadata={"help": "Skip batches whose loss is nan/inf instead of stopping the run."})


INFER_DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass
class InferenceArguments:
    """Predict, chat and export (LLaMA-Factory's keys). Generation settings are trainer.generation's."""
    predict_with_generate: bool = field(default=False, metadata={
        "help": "do_predict: generate an answer for every eval example and score it (BLEU-4, ROUGE)."})
    infer_backend: str = field(default="huggingface", metadata={"choices": ("huggingface", "vllm", "sglang")})
    infer_dtype: str = field(default="auto", metadata={"choices": INFER_DTYPES})
    skip_special_tokens: bool = True


@dataclass
class ExportArguments:
    export_dir: str | None = None
    export_size: int = field(default=5, metadata={"help": "GB per weights shard."})
    export_device: str = field(default="cpu", metadata={"choices": ("cpu", "auto")})
    export_legacy_format: bool = field(default=False, metadata={"help": "true: .bin files instead of safetensors."})
    export_dtype: str | None = field(default=None, metadata={
        "choices": INFER_DTYPES, "help": "The exported weights' dtype (default: infer_dtype's choice)."})


@dataclass
class FSDPOptions:
    """torch FSDP2 as zerotune applies it (engine/fsdp.py), read from `fsdp` and `fsdp_config`."""
    reshard_after_forward: bool = True  # full_shard; shard_grad_op keeps each layer gathered until its backward
    cpu_offload: bool = False
    layer_classes: list[str] | None = None  # decoder layer classes; default: the model's _no_split_modules


# `fsdp` words of TrainingArguments (and LLaMA-Factory), and the fsdp_config keys FSDP2 has no use for.
FSDP_STRATEGIES = {"full_shard": True, "shard_grad_op": False}
FSDP_CONFIG_IGNORED = ("backward_prefetch", "forward_prefetch", "use_orig_params", "sync_module_states",
                       "limit_all_gathers", "cpu_ram_efficient_loading", "state_dict_type", "min_num_params",
                       "auto_wrap_policy", "xla_fsdp_v2", "xla_fsdp_grad_ckpt", "xla_fsdp_settings")
FSDP_CONFIG_KEYS = ("transformer_layer_cls_to_wrap", "reshard_after_forward", "cpu_offload", "offload", "version",
                    "xla", "activation_checkpointing") + FSDP_CONFIG_IGNORED


def _fsdp_config_dict(value: Any) -> dict:
    """fsdp_config: a mapping, a JSON file, or a JSON/YAML string from the command line; `fsdp_` prefixes dropped."""
    if isinstance(value, str) and Path(value).is_file():
        value = read_yaml(value)  # JSON is YAML
    elif isinstance(value, str) and not value.lstrip().startswith("{"):
        raise ConfigError(f"fsdp_config: {value!r} is neither a mapping nor an existing JSON file.")
    value = _coerce("fsdp_config", value or {}, dict)
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in value.items()}


def parse_fsdp(value: Any, fsdp_config: Any = None) -> FSDPOptions | None:
    """`fsdp: full_shard auto_wrap` (a string, list or true) + fsdp_config -> FSDPOptions, or None when off."""
    if isinstance(value, str):
        text = value.strip().lower()
        off, words = text in _FALSE | {"", "none", "null"}, [] if text in _TRUE else text.replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        off, words = not value, [str(v).strip().lower() for v in value]
    else:
        off, words = not value, []
    if off:
        if fsdp_config:
            logger.warning("Ignoring fsdp_config: fsdp is not set.")
        return None
    options = FSDPOptions()
    for word in words:
        if word == "offload":
            options.cpu_offload = True
        elif word not in FSDP_STRATEGIES and word != "auto_wrap":
            raise ConfigError(f"fsdp: {word!r} is not supported; use full_shard or shard_grad_op, optionally with "
                              "auto_wrap and offload (FSDP2 shards over every process; no_shard and hybrid_shard "
                              "are FSDP1 modes).")
    strategies = [w for w in words if w in FSDP_STRATEGIES]
    if len(set(strategies)) > 1:
        raise ConfigError("fsdp: choose one of full_shard and shard_grad_op, not both.")
    if strategies:
        options.reshard_after_forward = FSDP_STRATEGIES[strategies[0]]
    extra = _fsdp_config_dict(fsdp_config)
    for key in extra:
        if key not in FSDP_CONFIG_KEYS:
            close = difflib.get_close_matches(key, FSDP_CONFIG_KEYS, n=2, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"fsdp_config: unknown key {key!r}.{hint}")
        if key in FSDP_CONFIG_IGNORED:
            logger.warning("Ignoring fsdp_config.%s (an FSDP1/accelerate setting; zerotune's FSDP2 shards each "
                           "decoder layer and saves full weights plus resumable shards).", key)
    if _coerce("fsdp_config.version", extra.get("version", 2), int) != 2:
        raise ConfigError(f"fsdp_config.version: {extra['version']!r}; zerotune runs FSDP2 only (version 2).")
    if _coerce("fsdp_config.xla", extra.get("xla", False), bool):
        raise ConfigError("fsdp_config.xla: XLA FSDP is not supported.")
    if _coerce("fsdp_config.activation_checkpointing", extra.get("activation_checkpointing", False), bool):
        raise ConfigError("fsdp_config.activation_checkpointing: set gradient_checkpointing: true instead "
                          "(checkpointing each decoder layer composes with FSDP2).")
    if "reshard_after_forward" in extra:
        options.reshard_after_forward = _coerce("fsdp_config.reshard_after_forward", extra["reshard_after_forward"],
                                                bool)
    for key in ("cpu_offload", "offload"):
        if key in extra:
            options.cpu_offload = _coerce(f"fsdp_config.{key}", extra[key], bool)
    if extra.get("transformer_layer_cls_to_wrap"):
        options.layer_classes = _coerce("fsdp_config.transformer_layer_cls_to_wrap",
                                        extra["transformer_layer_cls_to_wrap"], list[str])
    return options


# Keys of LLaMA-Factory's vocabulary that have been renamed in transformers 5 or that zerotune maps.
def _map_warmup_ratio(value: Any, raw: dict) -> dict:
    ratio = _coerce("warmup_ratio", value, float)
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"warmup_ratio: {value!r} must be in [0, 1).")
    if "warmup_steps" in raw:
        raise ConfigError("Set either warmup_ratio or warmup_steps, not both.")
    # transformers 5 reads a float in [0, 1) in warmup_steps as a ratio of the total steps.
    return {"warmup_steps": ratio}


RENAMED_KEYS = {"warmup_ratio": _map_warmup_ratio}

@dataclass
class RunConfig:
    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    training: Any  # transformers.TrainingArguments
    fsdp: FSDPOptions | None = None  # kept from TrainingArguments, which would hand it to accelerate
    source: str = ""
    raw: dict = field(default_factory=dict)  # the merged YAML + overrides, as the user wrote them
    passes: int = 1  # forward/backward passes each per-device batch is split into (forward_batch_size)
    stage_options: Any = None  # the stage's own keys (its `options` dataclass, trainer/stages)
    generation: Any = None  # trainer.generation.GenerationSettings
    inference: InferenceArguments = field(default_factory=InferenceArguments)
    export: ExportArguments = field(default_factory=ExportArguments)

    @property
    def checkpointing_auto(self) -> bool:
        """Neither gradient_checkpointing nor disable_gradient_checkpointing was given: decide from memory."""
        keys = ("gradient_checkpointing", "activation_checkpointing", "disable_gradient_checkpointing")
        return not any(k in self.raw for k in keys)

    @property
    def packing(self) -> bool:
        return bool(self.data.packing)


def _training_arguments_class():
    from transformers import TrainingArguments

    return TrainingArguments


def _fields(cls) -> dict[str, tuple[Any, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints.get(f.name, Any), f) for f in dataclasses.fields(cls) if f.init}


def _owners() -> dict[str, tuple[str, Any, dataclasses.Field]]:
    from trainer.generation import GenerationSettings

    owners: dict[str, tuple[str, Any, dataclasses.Field]] = {}
    for group, cls in (
        ("model", ModelArguments),
        ("data", DataArguments),
        ("finetuning", FinetuningArguments),
        ("generation", GenerationSettings),
        ("inference", InferenceArguments),
        ("export", ExportArguments),
        ("training", _training_arguments_class()),
    ):
        for name, (tp, f) in _fields(cls).items():
            owners.setdefault(name, (group, tp, f))
    return owners


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _describe(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, choices: tuple | None = None) -> Any:
    """Coerce a YAML or command-line value to the field's type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() == "null" and type(None) in args):
            if type(None) in args:
                return None
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:  # e.g. SchedulerType | str: the string must still be one of the enum's values
            return _coerce(key, value, enums[0], choices)
        errors = []
        # Try the most specific types first so "5" becomes 5 for int|str, not "5".
        order = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
        for arg in order:
            try:
                return _coerce(key, value, arg, choices)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a valid {_describe(tp)} ({'; '.join(errors)})")
    if tp is Any or tp is object:
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        item_tp = (typing.get_args(tp) or (Any,))[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(key, v, item_tp) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not a mapping (dict expected)")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        raw = value.value if isinstance(value, enum.Enum) else value
        if isinstance(raw, bool) and {"no", "yes"} & set(allowed):
            raw = "yes" if raw else "no"  # YAML 1.1 reads a bare `no` as false
        if isinstance(raw, str):
            raw = raw.strip()
        if raw not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
        return raw
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: {value!r} is not a boolean (use true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a number (float expected, e.g. 1.0e-4)")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: {value!r} is not a string")
        value = str(value)
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(choices)}")
        return value
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML so lists and numbers keep their type."""
    if "=" not in item:
        raise ConfigError(f"Override {item!r} must look like key=value (e.g. learning_rate=1e-5).")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value pairs.")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    raw: dict = read_yaml(path) if path else {}
    if isinstance(overrides, dict):
        raw.update(overrides)
    else:
        for item in overrides or []:
            key, value = parse_override(item)
            raw[key] = value
    return build_config(raw, source=str(path or ""))


def build_config(raw: dict, source: str = "") -> RunConfig:
    owners = _owners()
    original, raw = dict(raw), dict(raw)
    expanded: dict[str, Any] = {}
    for key in list(raw):
        if key in RENAMED_KEYS:
            expanded.update(RENAMED_KEYS[key](raw.pop(key), raw))
    raw.update(expanded)

    from trainer.stages import stage_keys

    lf_compat.check_values(raw)
    groups: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "finetuning": {}, "generation": {}, "inference": {},
                                         "export": {}, "training": {}}
    staged = stage_keys()
    unknown, refused, stage_given = [], [], {}
    for key, value in raw.items():
        if key in ("fsdp", "fsdp_config"):
            continue  # zerotune applies FSDP itself (engine/fsdp.py); accelerate's FSDP does not run on CPU
        if key in lf_compat.IGNORED:
            logger.warning("Ignoring %s (%s).", key, lf_compat.IGNORED[key])
            continue
        if key in staged and key not in owners:
            stage_given[key] = value
            continue
        if key not in owners:
            (refused if lf_compat.refusal(key) else unknown).append(key)
            continue
        group, tp, f = owners[key]
        groups[group][key] = _coerce(key, value, tp, f.metadata.get("choices"))
    if refused:
        raise ConfigError("\n".join(lf_compat.refusal(k) for k in refused))
    if unknown:
        _refuse_unknown(unknown, list(owners) + list(RENAMED_KEYS) + list(staged), source)

    fsdp = parse_fsdp(raw.get("fsdp"), raw.get("fsdp_config"))
    if fsdp and groups["training"].get("deepspeed"):
        raise ConfigError("Set fsdp or deepspeed, not both: each shards the model its own way.")
    model = ModelArguments(**groups["model"])
    data = DataArguments(**groups["data"])
    finetuning = FinetuningArguments(**groups["finetuning"])
    stage_options = _stage_options(finetuning.stage, stage_given, staged)
    _check_ranges(groups["training"], finetuning)
    from trainer.stages import get_stage_class

    packed = data.neat_packing or (data.packing if data.packing is not None else
                                   get_stage_class(finetuning.stage).packing_default)
    # A padding-free micro-batch is one row already (its examples end to end): splitting it only adds passes.
    one_row = packed or not data.padding_free
    training = _training_arguments(groups["training"], finetuning, streaming=data.streaming, split_rows=one_row)
    passes = int(groups["training"].get("per_device_train_batch_size", 8)) // training.per_device_train_batch_size
    from trainer.generation import GenerationSettings

    config = RunConfig(model=model, data=data, finetuning=finetuning, training=training, fsdp=fsdp, source=source,
                       raw=original, passes=passes, stage_options=stage_options,
                       generation=GenerationSettings(**groups["generation"]),
                       inference=InferenceArguments(**groups["inference"]), export=ExportArguments(**groups["export"]))
    _validate(config, groups)
    return config


def _refuse_unknown(unknown: list[str], valid: list[str], source: str) -> None:
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        lines.append(f"Unknown key {key!r}{' in ' + source if source else ''}.{hint}")
    raise ConfigError("\n".join(lines))


@dataclass
class InferenceConfig:
    """What zerotune chat and zerotune export read: the model (+ adapters), template and generation or export
    settings. A training YAML works too: its training keys simply do not apply."""
    model: ModelArguments
    finetuning_type: str
    template: str | None
    default_system: str | None
    generation: Any
    inference: InferenceArguments
    export: ExportArguments
    source: str = ""


INFERENCE_GROUPS = ("model", "generation", "inference", "export")
INFERENCE_KEYS = ("template", "default_system", "finetuning_type")


def load_inference_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> InferenceConfig:
    from trainer.generation import GenerationSettings
    from trainer.stages import stage_keys

    raw: dict = read_yaml(path) if path else {}
    for item in overrides or []:
        key, value = parse_override(item)
        raw[key] = value
    source = str(path or "")
    owners, staged = _owners(), stage_keys()
    lf_compat.check_values(raw)
    groups: dict[str, dict[str, Any]] = {g: {} for g in INFERENCE_GROUPS}
    chosen: dict[str, Any] = {}
    unknown, refused = [], []
    for key, value in raw.items():
        if key in owners:
            group, tp, f = owners[key]
            if group in INFERENCE_GROUPS:
                groups[group][key] = _coerce(key, value, tp, f.metadata.get("choices"))
            elif key in INFERENCE_KEYS:
                chosen[key] = _coerce(key, value, tp, f.metadata.get("choices"))
            # Any other training key: a training YAML reused here; it does not apply.
        elif key in staged or key in lf_compat.IGNORED or key in RENAMED_KEYS or key in ("fsdp", "fsdp_config"):
            continue
        elif lf_compat.refusal(key):
            refused.append(key)
        else:
            unknown.append(key)
    if refused:
        raise ConfigError("\n".join(lf_compat.refusal(k) for k in refused))
    if unknown:
        _refuse_unknown(unknown, list(owners) + list(RENAMED_KEYS) + list(staged), source)
    model = ModelArguments(**groups["model"])
    if not model.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a local model folder or a hub id).")
    config = InferenceConfig(model=model, finetuning_type=chosen.get("finetuning_type", "lora"),
                             template=chosen.get("template"), default_system=chosen.get("default_system"),
                             generation=GenerationSettings(**groups["generation"]),
                             inference=InferenceArguments(**groups["inference"]),
                             export=ExportArguments(**groups["export"]), source=source)
    check_backend(config.inference)
    if model.adapter_name_or_path and config.finetuning_type != "lora":
        raise ConfigError("adapter_name_or_path needs finetuning_type: lora.")
    return config


def _stage_options(stage: str, given: dict, staged: dict[str, list[str]]):
    """The stage's own keys, coerced into its options dataclass; a key of another stage is refused by name."""
    from trainer.stages import get_stage_class

    cls = get_stage_class(stage)
    fields = _fields(cls.options)
    foreign = [k for k in given if k not in fields]
    if foreign:
        raise ConfigError("\n".join(
            f"{k} is a key of stage {' / '.join(staged[k])}; this run's stage is {stage}. Remove it, or set the "
            "stage it belongs to." for k in foreign))
    values = {k: _coerce(k, v, fields[k][0], fields[k][1].metadata.get("choices")) for k, v in given.items()}
    try:
        return cls.options(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"stage {stage}: {err}") from None


def _check_ranges(training: dict, finetuning: FinetuningArguments) -> None:
    """Values transformers would accept and then divide by, or train nothing with: refused here, by key."""
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if key in training and training[key] < 1:
            raise ConfigError(f"{key}: {training[key]} must be at least 1.")
    if training.get("do_train", False) and training.get("max_steps", -1) <= 0 and \
            training.get("num_train_epochs", 3.0) <= 0:
        raise ConfigError(f"Nothing to train: num_train_epochs is {training.get('num_train_epochs')} and max_steps "
                          f"{training.get('max_steps', -1)}. Set num_train_epochs > 0 or max_steps > 0 (or do_train: "
                          "false to only evaluate).")
    if finetuning.lora_alpha is not None and finetuning.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha: {finetuning.lora_alpha} must be positive (default: 2 x lora_rank).")
    if finetuning.lora_rank <= 0:
        raise ConfigError(f"lora_rank: {finetuning.lora_rank} must be positive.")


# report_to names -> the package each integration needs (transformers' integrations, 5.x).
INTEGRATION_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "mlflow": "mlflow", "neptune": "neptune",
                        "tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb",
                        "codecarbon": "codecarbon", "clearml": "clearml", "dagshub": "dagshub", "flyte": "flytekit",
                        "dvclive": "dvclive", "swanlab": "swanlab", "kubeflow": "kubeflow"}


def _check_report_to(value) -> None:
    """Unknown integrations with did-you-mean; known ones whose package is missing with the pip command to run."""
    if value is None:
        return
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    if names in (["none"], ["all"]):
        return
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, \
        get_available_reporting_integrations

    known = list(INTEGRATION_TO_CALLBACK)
    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"report_to: {name!r} is not an integration.{hint} Known: {', '.join(known)}, none.")
        if name not in available:
            package = INTEGRATION_PACKAGES.get(name, name)
            raise ConfigError(f"report_to: {name} needs the {package} package, which is not installed: "
                              f"pip install {package}")


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 (AVX512-BF16 or AMX): there autocast is faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def _training_arguments(values: dict, finetuning: FinetuningArguments, streaming: bool = False,
                        split_rows: bool = True):
    import torch

    values = dict(values)
    values.setdefault("output_dir", "saves/zerotune")
    # Our collators read columns the model never sees; the Trainer must not drop them.
    values["remove_unused_columns"] = False
    cuda = torch.cuda.is_available()
    if not cuda:
        # Without a GPU, transformers (and DeepSpeed through it) only run with use_cpu=True.
        values.setdefault("use_cpu", True)
        if values.get("bf16") and not cpu_supports_bf16():
            logger.warning("bf16: true, but this CPU has no native bf16; training in fp32 instead.")
            values["bf16"] = False
        if values.get("fp16"):
            logger.warning("fp16: true has no effect without a GPU; training in fp32 (or set bf16: true).")
            values["fp16"] = False
    # LLaMA-Factory says gradient_checkpointing; transformers 5 renamed it activation_checkpointing.
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in values:
            values.setdefault(new, values.pop(old))
    if values.get("activation_checkpointing") is None and finetuning.disable_gradient_checkpointing:
        values["activation_checkpointing"] = False
    # Left unset, it is decided from the memory estimate once the model is known (plan.decide_checkpointing).
    values.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    values.setdefault("ddp_find_unused_parameters", False)
    if values.get("report_to") is None:
        values["report_to"] = "none"
    _check_report_to(values["report_to"])
    if streaming:
        # accelerate would read a stream on the main process only and split each batch along its rows; padding-free
        # batches are one row, so every process reads the stream and keeps its own share of the items instead.
        values.setdefault("accelerator_config", {"dispatch_batches": False})
    _split_batch(values, finetuning.forward_batch_size, cuda or not split_rows)
    if values.get("deepspeed"):
        _single_process_rendezvous()
    cls = _training_arguments_class()
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"Invalid training arguments: {err}") from None


def _split_batch(values: dict, forward_batch_size: str, whole: bool) -> None:
    """Run per_device_train_batch_size as passes of forward_batch_size rows, accumulating gradients (auto: the
    whole batch when `whole`, one row a pass otherwise).

    The engine normalises the loss by the tokens of the whole accumulated batch, so the optimizer sees the
    same gradient either way; only the activations held at once shrink. Done here, before TrainingArguments
    exist, so DeepSpeed's "auto" batch values and accelerate's accumulation are filled from the split.
    """
    per = int(values.get("per_device_train_batch_size", 8))  # TrainingArguments' default
    text = str(forward_batch_size).strip().lower()
    if text == "auto":
        rows, explicit = (per if whole else 1), False
    elif text.isdigit() and int(text) > 0:
        rows, explicit = int(text), True
    else:
        raise ConfigError(f"forward_batch_size: {forward_batch_size!r} is neither auto nor a positive integer.")
    if rows >= per:
        return
    if per % rows:
        raise ConfigError(f"forward_batch_size: {rows} does not divide per_device_train_batch_size: {per}; "
                          "pick a divisor so every pass holds the same number of rows.")
    ds = _deepspeed_dict(values.get("deepspeed"))
    fixed = [k for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
             if ds.get(k, "auto") != "auto"]
    if fixed:
        if explicit:
            raise ConfigError(f"forward_batch_size: {rows} needs the DeepSpeed config's {', '.join(fixed)} set to "
                              '"auto" (zerotune fills them from the split batch).')
        return  # the user's DeepSpeed config fixes the batch shape: leave it as written
    values["per_device_train_batch_size"] = rows
    values["gradient_accumulation_steps"] = int(values.get("gradient_accumulation_steps", 1)) * (per // rows)


def _single_process_rendezvous() -> None:
    """DeepSpeed without a launcher looks for MPI; give it a one-process torch rendezvous instead."""
    if "WORLD_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _deepspeed_dict(deepspeed) -> dict:
    """The DeepSpeed config as a dict ({} when unset or unreadable; DeepSpeed itself reports a bad file)."""
    import json

    if not deepspeed:
        return {}
    try:
        cfg = deepspeed if isinstance(deepspeed, dict) else json.loads(Path(deepspeed).read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _zero_stage(deepspeed) -> int:
    return int(_deepspeed_dict(deepspeed).get("zero_optimization", {}).get("stage", 0) or 0)


def _validate(config: RunConfig, given: dict[str, dict]) -> None:
    m, d, f, t = config.model, config.data, config.finetuning, config.training
    if not m.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a local model folder or a hub id).")
    if (t.do_train or t.do_eval) and not d.dataset and not d.eval_dataset:
        raise ConfigError("dataset is required to train or evaluate (a comma list of names in dataset_info.json).")
    if d.cutoff_len < 2:
        raise ConfigError(f"cutoff_len: {d.cutoff_len} must be at least 2.")
    if d.val_size < 0 or (d.val_size >= 1 and not float(d.val_size).is_integer()):
        raise ConfigError(f"val_size: {d.val_size} must be a fraction in [0, 1) or a whole number of examples.")
    if d.val_size and d.eval_dataset:
        raise ConfigError("Set val_size or eval_dataset, not both: val_size would hold examples out of training "
                          "that eval_dataset then replaces.")
    if d.max_samples is not None and d.max_samples <= 0:
        raise ConfigError(f"max_samples: {d.max_samples} must be positive.")
    if d.neat_packing:
        d.packing = True
    from trainer.stages import get_stage_class

    if d.packing is None:
        d.packing = get_stage_class(f.stage).packing_default
    if not d.padding_free and get_stage_class(f.stage).needs_padding_free:
        raise ConfigError(f"padding_free: false lays one sequence a row; stage {f.stage} keeps each item's two "
                          "sequences together in the padding-free layout. Remove padding_free: false.")
    if d.packing and not d.padding_free:
        raise ConfigError("padding_free: false lays one example a row, and packing: true puts several in one; "
                          "set packing: false for padded batches.")
    if f.lora_alpha is None:
        f.lora_alpha = 2 * f.lora_rank
    if not 0.0 <= f.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout: {f.lora_dropout} must be in [0, 1).")
    if f.skip_nonfinite_batches and t.deepspeed and _zero_stage(t.deepspeed) == 3:
        raise ConfigError("skip_nonfinite_batches is not supported with ZeRO-3 (its parameters are partitioned "
                          "outside the forward pass); leave it off to stop on a non-finite loss.")
    if config.fsdp and f.skip_nonfinite_batches:
        raise ConfigError("skip_nonfinite_batches is not supported with fsdp (its parameters are sharded outside "
                          "the forward pass); leave it off to stop on a non-finite loss.")
    if m.adapter_name_or_path and f.finetuning_type != "lora":
        raise ConfigError("adapter_name_or_path needs finetuning_type: lora.")
    check_backend(config.inference)
    if t.do_predict:
        if not get_stage_class(f.stage).predicts:
            raise ConfigError(f"do_predict generates answers for stage sft (as in LLaMA-Factory); this run's stage is "
                              f"{f.stage}. Use do_eval for its metrics.")
        if not config.inference.predict_with_generate:
            raise ConfigError("do_predict needs predict_with_generate: true (answers are generated, then scored).")
        if d.train_on_prompt:
            raise ConfigError("do_predict reads each example's prompt as the tokens before its last trained answer; "
                              "with train_on_prompt: true every token is trained. Predict in a run without it "
                              "(do_train: false, adapter_name_or_path: the trained run).")
        from trainer.engine.similarity import check_available

        check_available()  # before any training: the metric libraries are an extra
        if not (d.eval_dataset or d.val_size or (not t.do_train and d.dataset)):
            raise ConfigError("do_predict needs eval_dataset or val_size (the examples to answer).")
    if not t.do_train and not t.do_eval and not t.do_predict:
        raise ConfigError("Nothing to do: set do_train: true, or do_train: false with do_eval or do_predict: true.")
    if t.do_train and not d.dataset:
        raise ConfigError("do_train: true needs dataset (a comma list of names in dataset_info.json).")
    if not t.do_train and t.do_eval and not (d.eval_dataset or d.dataset):
        raise ConfigError("do_eval needs eval_dataset (or dataset).")
    if t.do_train:
        check_output_dir(t.output_dir, f.overwrite_output_dir, t.resume_from_checkpoint)
        check_resume_folder(t.resume_from_checkpoint)
    from trainer.stages import build_stage

    build_stage(config)  # the stage's own checks of the whole config, before anything loads


def check_backend(inference: InferenceArguments) -> None:
    if inference.infer_backend != "huggingface":
        raise ConfigError(f"infer_backend: {inference.infer_backend} is not supported: zerotune generates with "
                          "transformers (infer_backend: huggingface, the default). To serve with "
                          f"{inference.infer_backend}, export the model (zerotune export) and point "
                          f"{inference.infer_backend} at export_dir.")


RUN_MARKERS = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors", "model.safetensors",
               "all_results.json", "train_results.json")


def wants_resume(value) -> bool:
    """resume_from_checkpoint arrives as a string (YAML false becomes 'False'): read it as the user meant it."""
    return value not in (None, "", False) and str(value).lower() not in ("false", "none", "null", "no")


def check_output_dir(output_dir: str, overwrite: bool, resume: Any) -> None:
    path = Path(output_dir)
    if not path.is_dir() or overwrite or wants_resume(resume):
        return
    held = sorted(p.name for p in path.iterdir() if p.name in RUN_MARKERS or p.name.startswith("checkpoint-"))
    if held:
        raise ConfigError(
            f"output_dir {output_dir!r} already holds a run ({', '.join(held[:4])}). Set overwrite_output_dir: true "
            "to train over it, resume_from_checkpoint: true to continue it, or choose another output_dir."
        )


def check_resume_folder(value) -> None:
    """A resume_from_checkpoint folder must be a checkpoint: said before the model loads (true is resolved later)."""
    if not wants_resume(value) or str(value).lower() in ("true", "auto", "last", "latest"):
        return
    from trainer.engine.checkpoints import describe_unresumable

    why = describe_unresumable(str(value))
    if why:
        raise ConfigError(f"resume_from_checkpoint: {why}")

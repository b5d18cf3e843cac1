"""One YAML (LLaMA-Factory key vocabulary) + key=value overrides -> one validated RunConfig.

Every group's keys live with their owner: model and adapter keys in model/options.py, data keys in
data/options.py, the engine's and FSDP's in engine/options.py, generation in generation.py, each stage's in its
stage file, and the rest are transformers.TrainingArguments fields (engine/training_args.py builds them). This
module only reads the YAML, applies overrides and LLaMA-Factory's renames, composes the groups and checks what
spans groups. It never imports the stages: the caller hands it the stage registry (trainer.run does).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from trainer import lf_compat
from trainer.data.options import DataArguments
from trainer.engine import checkpoints
from trainer.engine.optimizer_options import check_optimizer
from trainer.engine.options import EngineArguments, FSDPOptions, parse_fsdp, shards_weights, zero_stage
from trainer.engine.training_args import training_arguments
from trainer.errors import ConfigError
from trainer.generation import GenerationSettings
from trainer.model.options import ExportArguments, FinetuningArguments, InferenceArguments, ModelArguments, \
    check_backend, check_lora_variants, check_quantization
from trainer.options import coerce, coerce_field, did_you_mean, fields_of, parse_override, read_yaml

logger = logging.getLogger(__name__)

# group name -> its options class; a key belongs to the first group that declares it. TrainingArguments is last.
GROUPS = {"model": ModelArguments, "data": DataArguments, "finetuning": FinetuningArguments,
          "engine": EngineArguments, "generation": GenerationSettings, "inference": InferenceArguments,
          "export": ExportArguments}
FSDP_KEYS = ("fsdp", "fsdp_config")  # zerotune applies FSDP itself (engine/fsdp.py); accelerate's does not run on CPU


def _map_warmup_ratio(value: Any, raw: dict) -> dict:
    ratio = coerce("warmup_ratio", value, float)
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"warmup_ratio: {value!r} must be in [0, 1).")
    if "warmup_steps" in raw:
        raise ConfigError("Set either warmup_ratio or warmup_steps, not both.")
    # transformers 5 reads a float in [0, 1) in warmup_steps as a ratio of the total steps.
    return {"warmup_steps": ratio}


# Keys of LLaMA-Factory's vocabulary that have been renamed in transformers 5 or that zerotune maps.
RENAMED_KEYS = {"warmup_ratio": _map_warmup_ratio}


@dataclass
class RunConfig:
    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    training: Any  # transformers.TrainingArguments
    engine: EngineArguments = field(default_factory=EngineArguments)
    fsdp: FSDPOptions | None = None  # kept from TrainingArguments, which would hand it to accelerate
    source: str = ""
    raw: dict = field(default_factory=dict)  # the merged YAML + overrides, as the user wrote them
    passes: int = 1  # forward/backward passes each per-device batch is split into (forward_batch_size)
    stage_options: Any = None  # the stage's own keys (its `options` dataclass, trainer/stages)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
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


@dataclass
class InferenceConfig:
    """What zerotune chat and zerotune export read: the model (+ adapters), template and generation or export
    settings. A training YAML works too: its training keys simply do not apply."""
    model: ModelArguments
    finetuning_type: str
    template: str | None
    default_system: str | None
    generation: GenerationSettings
    inference: InferenceArguments
    export: ExportArguments
    source: str = ""
    enable_thinking: bool = True  # the data keys that shape a rendered conversation (as get_template reads them)
    preserve_thinking: bool = False
    tool_format: str | None = None


def owners() -> dict[str, tuple[str, Any, Any]]:
    """Every key of a group -> (group, type, field)."""
    from transformers import TrainingArguments

    found: dict[str, tuple[str, Any, Any]] = {}
    for group, cls in [*GROUPS.items(), ("training", TrainingArguments)]:
        for name, (tp, f) in fields_of(cls).items():
            found.setdefault(name, (group, tp, f))
    return found


def stage_keys(stages) -> dict[str, list[str]]:
    """Every stage-owned key -> the stages that own it."""
    found: dict[str, list[str]] = {}
    for name, cls in stages.items():
        for key in fields_of(cls.options):
            found.setdefault(key, []).append(name)
    return found


def read_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> dict:
    """The YAML with the command line's key=value overrides on top, as the user wrote them."""
    raw: dict = read_yaml(path) if path else {}
    if isinstance(overrides, dict):
        raw.update(overrides)
    else:
        raw.update(parse_override(item) for item in overrides or [])
    return raw


def _sort(raw: dict, known: dict, staged: dict, source: str, wanted=lambda group: True):
    """(group -> {key: coerced value} for the wanted groups, stage keys given). Ignored keys are logged, refused
    and unknown keys stop the run by name."""
    groups: dict[str, dict[str, Any]] = {g: {} for g in [*GROUPS, "training"]}
    stage_given, unknown, refused = {}, [], []
    for key, value in raw.items():
        if key in FSDP_KEYS or key in RENAMED_KEYS:
            continue
        if key in lf_compat.IGNORED:
            logger.warning("Ignoring %s (%s).", key, lf_compat.IGNORED[key])
        elif key in staged and key not in known:
            stage_given[key] = value
        elif key in known:
            group, tp, f = known[key]
            if wanted(group):
                groups[group][key] = coerce_field(key, value, tp, f)
        else:
            (refused if lf_compat.refusal(key) else unknown).append(key)
    if refused:
        raise ConfigError("\n".join(lf_compat.refusal(k) for k in refused))
    if unknown:
        valid = [*known, *RENAMED_KEYS, *staged]
        raise ConfigError("\n".join(f"Unknown key {k!r}{' in ' + source if source else ''}.{did_you_mean(k, valid)}"
                                    for k in unknown))
    return groups, stage_given


def build_config(raw: dict, stages, source: str = "") -> RunConfig:
    """The RunConfig of a merged YAML; `stages` is the stage registry (trainer.stages.STAGES)."""
    original, raw = dict(raw), dict(raw)
    for key in [k for k in raw if k in RENAMED_KEYS]:
        raw.update(RENAMED_KEYS[key](raw[key], raw))
    lf_compat.check_values(raw)
    staged = stage_keys(stages)
    groups, stage_given = _sort(raw, owners(), staged, source)
    fsdp = parse_fsdp(raw.get("fsdp"), raw.get("fsdp_config"))
    if fsdp and groups["training"].get("deepspeed"):
        raise ConfigError("Set fsdp or deepspeed, not both: each shards the model its own way.")
    model, data = ModelArguments(**groups["model"]), DataArguments(**groups["data"])
    finetuning, engine = FinetuningArguments(**groups["finetuning"]), EngineArguments(**groups["engine"])
    stage_class = stages.lookup(finetuning.stage)
    stage_options = _stage_options(finetuning.stage, stage_class, stage_given, staged)
    _check_ranges(groups["training"], finetuning)
    check_optimizer(engine, finetuning.finetuning_type, groups["training"], fsdp is not None)  # before DeepSpeed starts
    packed = data.neat_packing or (data.packing if data.packing is not None else stage_class.packing_default)
    # A padding-free micro-batch is one row already (its examples end to end): splitting it only adds passes.
    one_row = packed or not data.padding_free
    training = training_arguments(groups["training"], engine, streaming=data.streaming, split_rows=one_row)
    passes = int(groups["training"].get("per_device_train_batch_size", 8)) // training.per_device_train_batch_size
    config = RunConfig(model=model, data=data, finetuning=finetuning, training=training, engine=engine, fsdp=fsdp,
                       source=source, raw=original, passes=passes, stage_options=stage_options,
                       generation=GenerationSettings(**groups["generation"]),
                       inference=InferenceArguments(**groups["inference"]), export=ExportArguments(**groups["export"]))
    _validate(config, stage_class)
    return config


INFERENCE_GROUPS = ("model", "generation", "inference", "export")
TEMPLATE_KEYS = ("enable_thinking", "preserve_thinking", "tool_format")
INFERENCE_KEYS = ("template", "default_system", "finetuning_type", *TEMPLATE_KEYS)


def build_inference_config(raw: dict, stages, source: str = "") -> InferenceConfig:
    """What chat and export read of a YAML; a training YAML's other keys do not apply and are passed over."""
    lf_compat.check_values(raw)
    known = owners()
    groups, _ = _sort(raw, known, stage_keys(stages), source,
                      wanted=lambda group: group in INFERENCE_GROUPS)
    chosen = {k: coerce_field(k, raw[k], *known[k][1:]) for k in INFERENCE_KEYS if k in raw}
    model = ModelArguments(**groups["model"])
    if not model.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a local model folder or a hub id).")
    config = InferenceConfig(model=model, finetuning_type=chosen.get("finetuning_type", "lora"),
                             template=chosen.get("template"), default_system=chosen.get("default_system"),
                             generation=GenerationSettings(**groups["generation"]),
                             inference=InferenceArguments(**groups["inference"]),
                             export=ExportArguments(**groups["export"]), source=source,
                             **{k: chosen[k] for k in TEMPLATE_KEYS if k in chosen})
    check_backend(config.inference)
    if model.adapter_name_or_path and config.finetuning_type != "lora":
        raise ConfigError("adapter_name_or_path needs finetuning_type: lora.")
    return config


def _stage_options(stage: str, cls, given: dict, staged: dict[str, list[str]]):
    """The stage's own keys, coerced into its options dataclass. A key of another stage is ignored with a warning (as
    LLaMA-Factory accepts it: one YAML toggled between stages keeps its pref_beta), and kept in the saved config."""
    fields = fields_of(cls.options)
    for k in [k for k in given if k not in fields]:
        logger.warning("Ignoring %s: a key of stage %s, and this run's stage is %s (kept in the run's saved config as "
                       "given).", k, " / ".join(staged[k]), stage)
    values = {k: coerce_field(k, v, *fields[k]) for k, v in given.items() if k in fields}
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


def _validate(config: RunConfig, stage_class) -> None:
    """What spans groups, then the stage's own checks of the whole config, before anything loads."""
    m, d, f, t = config.model, config.data, config.finetuning, config.training
    if not m.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a local model folder or a hub id).")
    if (t.do_train or t.do_eval) and not d.dataset and not d.eval_dataset:
        raise ConfigError("dataset is required to train or evaluate (a comma list of names in dataset_info.json).")
    d.check()
    m.model_max_length = m.model_max_length or (d.cutoff_len if m.rope_scaling and t.do_train else None)  # as LF
    if d.neat_packing:
        d.packing = True
    if d.packing is None:
        d.packing = stage_class.packing_default
    if not d.padding_free and stage_class.needs_padding_free:
        raise ConfigError(f"padding_free: false lays one sequence a row; stage {f.stage} keeps each item's two "
                          "sequences together in the padding-free layout. Remove padding_free: false.")
    if d.packing and not d.padding_free:
        raise ConfigError("padding_free: false lays one example a row, and packing: true puts several in one; "
                          "set packing: false for padded batches.")
    if f.lora_alpha is None:
        f.lora_alpha = 2 * f.lora_rank
    if not 0.0 <= f.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout: {f.lora_dropout} must be in [0, 1).")
    if config.engine.skip_nonfinite_batches and t.deepspeed and zero_stage(t.deepspeed) == 3:
        raise ConfigError("skip_nonfinite_batches is not supported with ZeRO-3 (its parameters are partitioned "
                          "outside the forward pass); leave it off to stop on a non-finite loss.")
    if config.fsdp and config.engine.skip_nonfinite_batches:
        raise ConfigError("skip_nonfinite_batches is not supported with fsdp (its parameters are sharded outside "
                          "the forward pass); leave it off to stop on a non-finite loss.")
    check_lora_variants(f, m, zero3=zero_stage(t.deepspeed) == 3 if t.deepspeed else False, fsdp=bool(config.fsdp))
    check_backend(config.inference)
    check_quantization(m, f, t.do_train, sharded=shards_weights(config))
    if t.do_predict:
        if not stage_class.predicts:
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
        checkpoints.check_output_dir(t.output_dir, config.engine.overwrite_output_dir, t.resume_from_checkpoint)
        checkpoints.check_resume_folder(t.resume_from_checkpoint)
    stage_class(config, config.stage_options)  # the stage's own checks of the whole config

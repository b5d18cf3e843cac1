"""The whole job, in the order data flows: config -> data -> model -> stage -> engine -> saved results."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from trainer import config as configuration
from trainer.config import InferenceConfig, RunConfig
from trainer.engine.options import shards_weights
from trainer.errors import ConfigError
from trainer.stages import STAGES, build_stage

logger = logging.getLogger("trainer")


def build_config(raw: dict, source: str = "") -> RunConfig:
    """A merged YAML's RunConfig, validated against the registered stages."""
    return configuration.build_config(raw, STAGES, source)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    return build_config(configuration.read_config(path, overrides), source=str(path or ""))


def load_inference_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> InferenceConfig:
    return configuration.build_inference_config(configuration.read_config(path, overrides), STAGES,
                                                source=str(path or ""))


def setup_logging(main_process: bool) -> None:
    level = logging.INFO if main_process else logging.WARNING
    root = logging.getLogger("trainer")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[zerotune] %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def resolve_resume(value, output_dir: str) -> str | None:
    """resume_from_checkpoint: a checkpoint folder, or true/auto for the newest one in output_dir."""
    from trainer.engine.checkpoints import wants_resume

    if not wants_resume(value):
        return None
    if str(value).lower() in ("true", "auto", "last", "latest"):
        from trainer.engine.checkpoints import latest_checkpoint

        last = latest_checkpoint(output_dir)
        if last is None:
            raise ConfigError(f"resume_from_checkpoint: {value} but {output_dir!r} holds no checkpoint-* folder.")
        logger.info("Resuming from %s (the newest complete checkpoint).", last)
        return last
    from trainer.engine.checkpoints import describe_unresumable

    why = describe_unresumable(str(value))
    if why:
        raise ConfigError(f"resume_from_checkpoint: {why}")
    return str(value)


def save_config(config: RunConfig) -> None:
    """The run's YAML + overrides, secrets blanked, beside its outputs (to rerun it exactly)."""
    import yaml

    from trainer.engine.secrets import is_secret

    out = Path(config.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: ("<redacted>" if is_secret(k) and v else v) for k, v in config.raw.items()}
    (out / "zerotune_config.yaml").write_text(yaml.safe_dump(clean, sort_keys=False))


def build_datasets(config: RunConfig, stage, tokenizer, template):
    """(train rows, eval rows, packing efficiency) ready for the collator."""
    from trainer.data import packing, processing
    from trainer.data.kinds import DATA_KINDS

    d, t = config.data, config.training
    rebuild = d.overwrite_cache and t.process_index == 0

    def tokenized(names, saved_at=None):
        if saved_at:
            return processing.tokenized_path_dataset(saved_at, names, d, stage.data_kind, tokenizer, template,
                                                     rebuild)[0]
        return processing.tokenized_dataset(names, d, stage.data_kind, tokenizer, template, rebuild)[0]

    train = evaluation = None
    if t.do_train and d.streaming:
        from trainer.data.streaming import streaming_dataset

        if d.val_size:
            raise ConfigError("val_size cannot split a stream; with streaming: true use eval_dataset instead.")
        train = streaming_dataset(d.dataset, d, stage.data_kind, tokenizer, template, t.max_steps)
        evaluation = tokenized(d.eval_dataset) if d.eval_dataset else None
        if evaluation is not None:
            evaluation = packing.pack_dataset(evaluation, d.cutoff_len)[0] if d.packing else \
                packing.unpacked_dataset(evaluation, DATA_KINDS.lookup(stage.data_kind).partners)
        return train, evaluation, None
    kind = DATA_KINDS.lookup(stage.data_kind)
    by_document = kind.documents  # all pieces of a document on one side
    if t.do_train:
        train = tokenized(d.dataset, d.tokenized_path)
        train, evaluation = processing.split_validation(train, d.val_size, t.seed, by_document)
    elif d.val_size and not d.eval_dataset:
        data = tokenized(d.dataset, d.tokenized_path)
        _, evaluation = processing.split_validation(data, d.val_size, t.seed, by_document)
    elif not d.eval_dataset:
        evaluation = tokenized(d.dataset, d.tokenized_path)
    if d.eval_dataset:
        evaluation = tokenized(d.eval_dataset)

    efficiency = None
    if d.packing:
        if train is not None:
            train, efficiency = packing.pack_dataset(train, d.cutoff_len)
        if evaluation is not None:
            evaluation, _ = packing.pack_dataset(evaluation, d.cutoff_len)
    else:
        train = packing.unpacked_dataset(train, kind.partners) if train is not None else None
        evaluation = packing.unpacked_dataset(evaluation, kind.partners) if evaluation is not None else None
    return train, evaluation, efficiency


def log_layout(config: RunConfig, train, stage) -> None:
    """Which batch layout runs, and what one optimizer step holds: the numbers a LLaMA-Factory user compares."""
    d, t = config.data, config.training
    layout = ("packed: examples packed across batches into rows of cutoff_len, each row's examples kept apart"
              if d.packing else "padding-free: each micro-batch's examples laid end to end, kept apart, no padding"
              if d.padding_free else "padded: one right-padded example a row")
    unit = "packed rows" if d.packing else stage.item_name
    sp = config.engine.sequence_parallel_size
    dp = t.world_size // sp  # data-parallel degree: each sequence-parallel group of sp processes shares its rows
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * dp
    what = "batch x accumulation x processes" + (f" / sequence_parallel_size {sp}" if sp > 1 else "")
    if hasattr(train, "__len__"):
        steps = stage.steps_per_epoch(len(train), t.per_device_train_batch_size, t.gradient_accumulation_steps, dp)
        logger.info("Batches %s; %d %s a step (%s): %d optimizer steps an epoch over %d %s.", layout, per_step,
                    stage.batch_item_name or unit, what, steps, len(train), unit)
    else:
        logger.info("Batches %s; %d %s a step (%s).", layout, per_step, stage.batch_item_name or unit, what)


def shard_model(model, config: RunConfig):
    """FSDP2 over every process, once the adapters are in place and before the Trainer builds the optimizer."""
    import torch

    from trainer.engine import fsdp
    from trainer.engine.hardware import half_dtype

    t = config.training
    if t.world_size == 1:
        logger.warning("fsdp is set but this is a single process, so there is nothing to shard; training without "
                       "FSDP. Launch several processes (torchrun --nproc_per_node N, or zerotune train on a "
                       "multi-GPU machine) to shard.")
        return model
    return fsdp.shard(model, config.fsdp, half_dtype(t) or torch.float32)


def run(config: RunConfig) -> dict:
    import torch
    from transformers import set_seed

    from trainer.data.templates import get_template
    from trainer.engine import checkpoints
    from trainer.engine.plot import plot_loss
    from trainer.engine.signals import GracefulStop, LauncherWatch, Preempted
    from trainer.engine.trainer import ZeroTrainer
    from trainer.model.adapters import WatchedTokens, prepare_trainable, warn_untrained_stop_tokens
    from trainer.model import rank0_load
    from trainer.model.loading import load_model, load_tokenizer
    from trainer.model.wrapper import ModelWrapper
    m, d, f, t = config.model, config.data, config.finetuning, config.training
    setup_logging(t.process_index == 0)
    if t.n_gpu > 1:
        raise ConfigError("Several GPUs in one process: launch with `zerotune train` (it starts one process per "
                          "GPU) or with deepspeed/torchrun.")
    set_seed(t.seed)
    if t.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # ZeRO-3 partitions weights as they load (zero.Init), which needs DeepSpeed's view of the process group.
        import deepspeed

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
            from trainer.engine.shm_buffers import release_allreduce_buffer

            release_allreduce_buffer()
    stage = build_stage(config)
    tokenizer = load_tokenizer(m)
    template = get_template(d.template, tokenizer, d) if stage.needs_template else None
    with t.main_process_first(local=False, desc="tokenizing the data"):
        train, evaluation, efficiency = build_datasets(config, stage, tokenizer, template)
    rank0_weights = config.fsdp is not None and t.world_size > 1 and rank0_load.chosen(f, m, t.world_size,
                                                                                       config.fsdp.rank0_load)
    watched = None
    if t.do_train:  # what the run teaches the model to emit: a LoRA run trains these tokens' rows if they are new
        labels = train.label_ids() if hasattr(train, "label_ids") else None  # None: a stream, not known ahead
        watched = WatchedTokens(tokenizer, template.stop_token_ids(tokenizer) if template else [], labels,
                                from_rank0=rank0_weights)
    if train is not None:
        train = stage.train_items(train)
    if t.eval_strategy != "no" and evaluation is None:
        raise ConfigError(f"eval_strategy: {t.eval_strategy} needs eval data: set val_size or eval_dataset.")

    # Sequence parallelism needs the attention that reads the segment layout (engine/sequence_parallel.py).
    model = load_model(m, t, f.finetuning_type,
                       segments_wanted=stage.wants_segments or config.engine.sequence_parallel_size > 1,
                       sharded=shards_weights(config), rank0_weights=rank0_weights)
    if template is not None:
        stops = template.stop_token_ids(tokenizer)
        model.generation_config.eos_token_id = sorted(set(stops + [tokenizer.eos_token_id]))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Loading consumes the RNG differently under ZeRO-3 (zero.Init initialises weights before loading them) than
    # in one process: seed again, so the new adapters start the same however the model was loaded.
    set_seed(t.seed)
    model = prepare_trainable(model, f, m, is_trainable=t.do_train, watched=watched)
    callbacks = []
    if f.pissa_convert and t.do_train:  # copies the initial adapter now, before a checkpoint can be loaded
        from trainer.model.pissa import PissaConversion

        callbacks.append(PissaConversion(model))
    model = stage.extend_model(model)
    if watched is not None:
        warn_untrained_stop_tokens(model, tokenizer, watched.stop_ids, f)
    from trainer.engine.agree import agreed_choice

    agreed_choice("forward_batch_size", (t.per_device_train_batch_size, t.gradient_accumulation_steps))
    if t.do_train and config.passes > 1:
        logger.info("Each batch of %d rows a device runs as %d passes of %d with accumulated gradients (the same "
                    "gradient, less memory held); forward_batch_size: %s.", t.per_device_train_batch_size * config.passes,
                    config.passes, t.per_device_train_batch_size, config.engine.forward_batch_size)
    if t.do_train and config.checkpointing_auto:
        from trainer.plan import decide_checkpointing

        t.activation_checkpointing, why = decide_checkpointing(model, t, stage.micro_batch_tokens(config),
                                                               sharded=shards_weights(config))
        logger.info("Gradient checkpointing %s: %s. Set gradient_checkpointing: true/false to choose.",
                    "on" if t.activation_checkpointing else "off", why)
    if config.fsdp is not None:
        model = shard_model(model, config)
    from trainer.model.kernels import liger_available

    wrapper = ModelWrapper(model, chunked=m.chunked_loss, liger=m.enable_liger_kernel and liger_available())
    stage.prepare(model, wrapper)
    from trainer.engine.host_memory import keep_freed_memory

    # Only once the models are loaded: quantizing a 1.5B base on load under it kept ~4 GB of freed temporaries
    # (benchmarks/RESULTS.md, "QLoRA memory").
    keep_freed_memory(on_cpu=t.use_cpu or not torch.cuda.is_available(), quantized=m.quantization_bit is not None)
    collator = stage.collator(tokenizer.pad_token_id, padding_free=d.padding_free)
    if t.do_train:
        log_layout(config, train, stage)
    stop = GracefulStop()
    trainer = ZeroTrainer(model=model, args=t, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
                          processing_class=tokenizer, stage=stage, wrapper=wrapper, callbacks=[stop, *callbacks],
                          skip_nonfinite=config.engine.skip_nonfinite_batches, optimizer_options=config.engine,
                          mfu_peak_tflops=config.engine.mfu_peak_tflops)
    stop.accelerator = trainer.accelerator
    results: dict = {}
    if efficiency is not None:
        results["packing_efficiency"] = round(efficiency, 4)
    if t.do_train:
        resume = resolve_resume(t.resume_from_checkpoint, t.output_dir)
        done = resume and checkpoints.run_is_complete(resume, t.max_steps, t.num_train_epochs)
        if done:
            logger.warning("%s; nothing to train. Raise max_steps or num_train_epochs to train further.", done)
            return results
        if trainer.is_world_process_zero():
            checkpoints.clear_stale_staging(t.output_dir)
            if config.engine.overwrite_output_dir and not resume:
                checkpoints.set_aside_previous_run(t.output_dir)
            save_config(config)
        if resume:
            stage.load_state(resume)
        stop.install()
        watch = LauncherWatch().start()
        try:
            outcome = trainer.train(resume_from_checkpoint=resume)
        finally:
            watch.stop()
            stop.uninstall()
        if stop.signum:
            raise Preempted(stop.signum, checkpoints.latest_checkpoint(t.output_dir))
        trainer.save_model()
        trainer.save_state()
        metrics = dict(outcome.metrics, **results)
        if trainer.padding_fraction() is not None:
            metrics["padding_fraction"] = round(trainer.padding_fraction(), 4)
        if config.engine.skip_nonfinite_batches:
            metrics["skipped_nonfinite_batches"] = trainer.skipped_batches
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        results.update(metrics)
        if config.engine.plot_loss and trainer.is_world_process_zero():
            plot_loss(t.output_dir, stage.plotted)
    if t.do_eval and evaluation is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if t.do_predict and evaluation is not None:
        from trainer.predict import predict

        results.update(predict(trainer, config, evaluation.data, tokenizer, template))
    return results

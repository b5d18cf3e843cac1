"""The one Trainer every stage shares: a transformers.Trainer whose loss comes from the stage plugin.

What it adds to transformers.Trainer:
- the loss is normalised by the trained tokens of the whole accumulated (and, with
  average_tokens_across_devices, global) batch, so batch 1 x accumulation 8 and batch 8 x 1 give the
  same loss and gradients, and the logged loss does not depend on the accumulation;
- eval_loss is the token-weighted mean over every eval token (not a mean of per-batch means), so it
  is the same for any eval batch size, packing or number of processes;
- real (non-pad) tokens/s and MFU are logged with the loss, to the console, trainer_state.json and W&B.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import SCHEDULER_NAME

from trainer.data.collators import BOOKKEEPING
from trainer.engine import checkpoints, fsdp, sequence_parallel
from trainer.engine.metrics import device_peak_flops, flops_per_token, forward_flops_per_token, peak_memory_gb
from trainer.engine.optimizer_options import OptimizerArguments, deepspeed_optimizer
from trainer.engine.optimizers import build_optimizer, default_labels, describe_groups
from trainer.engine.secrets import redacted_args
from trainer.errors import ConfigError, TrainingHalted
from trainer.model.tiled_mlp import check_engine as check_tiled_mlp
from trainer.model.tiled_mlp import tiled as has_tiled_mlp
from trainer.upstream import check_trainer_api

logger = logging.getLogger(__name__)


class ZeroTrainer(Trainer):
    def __init__(self, *args, stage, wrapper, skip_nonfinite: bool = False,
                 optimizer_options: OptimizerArguments | None = None, mfu_peak_tflops: float | None = None,
                 **kwargs):
        kwargs.setdefault("compute_metrics", _summed_statistics)
        check_trainer_api()
        super().__init__(*args, **kwargs)
        self.stage = stage
        self.wrapper = wrapper
        self.skip_nonfinite = skip_nonfinite
        self.mfu_peak_tflops = mfu_peak_tflops
        self.optimizer_options = optimizer_options or OptimizerArguments()
        self.skipped_batches = 0
        self._staging = False
        # compute_loss divides by the accumulated item count that _get_num_items_in_batch gives (from the stage,
        # never transformers' guess from a `labels` key): the Trainer must not divide again by the accumulation.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._linear_flops, self._pair_flops, self._head_flops = flops_per_token(self.model)
        self._forward_linear, self._forward_head = forward_flops_per_token(self.model)
        # Accounting stays on the device until a log line reads it (a host read a micro-batch would stall the GPU):
        # [real tokens, FLOPs] of the logging window and of the whole run; batch slots are host integers anyway.
        self._window, self._window_slots = None, 0.0
        self._window_stats: dict[str, torch.Tensor] = {}  # name -> [sum, count] of the stage's statistics
        self._stat_names: list[str] = []
        self._run_tokens, self._run_slots = None, 0.0  # for the run's padding fraction
        self._step_nonfinite = None  # [non-finite micro-batches, the first one's loss] of the optimizer step so far
        # transformers' nan/inf logging filter reads every micro-batch's loss on the host; zerotune stops on (or skips)
        # a non-finite loss itself, so the filter has nothing left to filter.
        self.args.logging_nan_inf_filter = False
        self._window_start = None
        self._excluded = 0.0  # seconds spent in eval/save inside the current logging window
        self.add_callback(_StageHooks(self))
        if has_tiled_mlp(self.model):
            check_tiled_mlp(bool(self.args.deepspeed), fsdp.is_sharded(self.model), self.accelerator.num_processes)
        self.sp = sequence_parallel.size_of(self.args)  # processes that share each sequence (1: off)
        if self.sp > 1:
            sequence_parallel.attach(self.accelerator, self.model, self.sp)
            if stage.sequence_parallel == "rows":  # the wrapper runs shards and hands the stage whole rows
                wrapper.sequence_parallel = sequence_parallel.WholeRows(self.sp)
        # Each process of a group computes the same whole-row loss (WholeRows): counted once.
        self._replicas = self.sp if stage is not None and stage.sequence_parallel == "rows" else 1
        self._grad_divisor = sequence_parallel.gradient_divisor(self.args.deepspeed, self.accelerator.num_processes,
                                                                self.sp)
        if self.neftune_noise_alpha is not None:  # zerotune's, per example (model/neftune.py), not transformers'
            wrapper.use_neftune(self.model, self.neftune_noise_alpha)
            self.neftune_noise_alpha = None

    # ---- loss -----------------------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Items of the loss in the whole accumulated batch, counted by the stage; summed over every process when
        average_tokens_across_devices (the default), so each item weighs the same wherever it was computed."""
        if not batch_samples:
            return None
        self.stage.before_step(self, batch_samples)  # ppo samples its responses here, before any of them trains
        count = sum(self.stage.count_items(b) for b in batch_samples)
        count = torch.as_tensor(count, device=device).reshape(())
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
            if self.sp > 1:  # every process of a sequence-parallel group counted the same whole batches
                count = count // self.sp
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        book = {k: inputs.pop(k) for k in BOOKKEEPING if k in inputs}
        if self.sp > 1 and model.training and self._replicas == 1:  # counted whole, computed as this shard of it
            inputs = sequence_parallel.shard(inputs, sequence_parallel.group()[1], self.sp)
        out = self.stage.compute(self.wrapper, model, inputs)
        if out.batch is not None:  # the stage built the batch it ran (ppo: prompts with their sampled responses)
            inputs = dict(out.batch)
            book = {k: inputs.pop(k) for k in BOOKKEEPING if k in inputs}
        loss_sum, count = out.loss_sum, out.items
        if model.training and self._replicas > 1:
            loss_sum = loss_sum / self._replicas
        if model.training and self.skip_nonfinite:
            # Skipping just this micro-batch needs the answer before its backward: one host read a micro-batch,
            # the price of skip_nonfinite_batches.
            if self._any_nonfinite(loss_sum):
                loss_sum = self._nonfinite(model, loss_sum)
        elif model.training:
            self._note_nonfinite(loss_sum)
            if self.accelerator.sync_gradients:  # the step's last micro-batch, before its backward and the step
                self._stop_if_nonfinite()
        if model.training:
            self._account(book, inputs, out)
        if num_items_in_batch is not None and model.training:
            loss = loss_sum / num_items_in_batch.clamp(min=1)
            if self.args.average_tokens_across_devices:
                # DDP, DeepSpeed and FSDP average gradients over processes (sequence parallelism: see
                # gradient_divisor); the divisor above is already global.
                loss = loss * self._grad_divisor
        else:
            loss = loss_sum / count.clamp(min=1)
        return (loss, None) if return_outputs else loss

    def _account(self, book: dict, inputs: dict, out) -> None:
        """Throughput and the stage's statistics of a training micro-batch, for the next log line: device tensors
        added up, never read here."""
        for name, (sums, counts) in out.stats.items():
            if name == "loss":  # the Trainer logs the loss itself (exactly: each step is normalised globally)
                continue
            counted = sums.new_full((), float("nan")) if counts is None else counts.detach().sum()
            pair = torch.stack([sums.detach().sum().double(), counted.double()]) / self._replicas
            self._window_stats[name] = self._window_stats[name] + pair if name in self._window_stats else pair
        if not book:
            return
        # Under sequence parallelism a group's processes share each row (self.sp) or each hold it whole
        # (self._replicas, WholeRows): each counts its share, so the sums over processes count every token once.
        tokens = book["real_tokens"].sum().double() / self.sp
        slots = float(inputs["input_ids"].numel()) / self._replicas  # a shape: known on the host
        pairs = book["attn_square"].sum().double().to(tokens.device) / self.sp  # 1/N of the heads, whole rows
        head = out.items if out.head_tokens is None else out.head_tokens
        head_tokens = torch.as_tensor(head, dtype=torch.float64).to(tokens.device) / self._replicas
        flops = tokens * self._linear_flops + pairs * self._pair_flops + head_tokens * self._head_flops
        if out.reference_passes:  # a reference model's forward over the same tokens
            flops = flops + out.reference_passes * (tokens * self._forward_linear + pairs * self._pair_flops / 3
                                                    + head_tokens * self._forward_head)
        both = torch.stack([tokens, flops])
        self._window = both if self._window is None else self._window + both
        self._run_tokens = tokens if self._run_tokens is None else self._run_tokens + tokens
        self._window_slots += slots
        self._run_slots += slots

    # ---- optimizer ----------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The method the optimizer keys ask for (engine/optimizers.py), else transformers' `optim`; either way the
        log says what each group holds. Under DeepSpeed this is the client optimizer ZeRO wraps."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        built = build_optimizer(opt_model, self.args, self.optimizer_options,
                                set(self.get_decay_parameter_names(opt_model)))
        if built is None:
            super().create_optimizer(model)
            labels = default_labels(self.optimizer)
            if "paged" in str(self.args.optim) and not torch.cuda.is_available():
                logger.warning("optim: %s pages optimizer states between GPU and CPU memory; without CUDA "
                               "bitsandbytes runs it unpaged (the same update, ordinary memory).", self.args.optim)
        else:
            self.optimizer, labels = built
        for line in describe_groups(self.optimizer, labels, opt_model):
            logger.info("Optimizer group %s", line)
        return self.optimizer

    def floating_point_ops(self, inputs):
        """transformers' total_flos count, 6 x input tokens x non-embedding parameters, with the parameter count taken
        once per model: transformers walks every module and parameter for it on every step (4 ms a step here)."""
        name = getattr(self.model, "main_input_name", "input_ids")
        if name not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if getattr(self, "_counted", (None,))[0] is not self.model:
            self._counted = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[name].numel() * self._counted[1]

    def _get_train_sampler(self, train_dataset=None):
        sampler = self.stage.train_sampler(self, train_dataset if train_dataset is not None else self.train_dataset)
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    def exclude_from_window(self, seconds: float) -> None:
        """Time the stage spent outside training (ppo's rollouts): left out of the logged training tokens/s and MFU,
        which the stage reports for that work separately."""
        self._excluded += seconds

    # ---- evaluation ---------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Per dataset item, the sums and counts of every statistic of the stage; _summed_statistics adds them up
        over the whole eval set (all batches, all processes), so no figure is a mean of means."""
        inputs = self._prepare_inputs(inputs)
        for k in BOOKKEEPING:
            inputs.pop(k, None)
        with torch.no_grad(), self.compute_loss_context_manager():
            out = self.stage.compute(self.wrapper, model, inputs)
        self._stat_names = list(out.stats)
        columns = [(sums.new_full(sums.shape, float("nan")) if t is None else t).double()
                   for name in self._stat_names for sums in [out.stats[name][0]] for t in out.stats[name]]
        stats = torch.stack(columns, dim=-1)
        return (out.loss_sum / out.items.clamp(min=1)).detach(), stats, out.stats["loss"][1]

    def evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._excluded += time.perf_counter() - start

    def evaluation_loop(self, *args, **kwargs):
        self.compute_metrics = lambda pred: _summed_statistics(pred, self._stat_names, self.stage.summarize)
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        exact = output.metrics.pop(f"{prefix}_stat_loss", None)
        if exact is not None:  # replaces the Trainer's mean of per-batch losses
            output.metrics[f"{prefix}_loss"] = exact
            output.metrics[f"{prefix}_tokens"] = output.metrics.pop(f"{prefix}_stat_loss_count")
        for key in [k for k in output.metrics if k.startswith(f"{prefix}_stat_")]:
            value = output.metrics.pop(key)
            if not key.endswith("_count"):
                output.metrics[f"{prefix}_{key[len(prefix) + 6:]}"] = value
        return output

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return checkpoints.staging_dir(run_dir) if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        """Write into the staging folder, then publish it atomically (see engine/checkpoints.py)."""
        start = time.perf_counter()
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        staged = checkpoints.staging_dir(run_dir)
        os.makedirs(f"{staged}/{name}", exist_ok=True)
        self.stage.save_process_state(f"{staged}/{name}", self.accelerator.process_index)
        self.accelerator.wait_for_everyone()
        best = self.state.best_model_checkpoint
        moved = bool(best and best.startswith(staged))
        if moved:  # on every process: each one loads the best model at the end (load_best_model_at_end)
            self.state.best_model_checkpoint = best.replace(staged, run_dir, 1)
        if self.args.should_save:
            if moved:
                self.state.save_to_json(f"{staged}/{name}/trainer_state.json")
            final = checkpoints.publish(run_dir, name)
            checkpoints.rotate(run_dir, self.args.save_total_limit, newest=final, keep=self.state.best_model_checkpoint)
            logger.info("Saved %s.", final)
            if self.args.push_to_hub:
                with redacted_args(self.args):
                    super()._push_from_checkpoint(final)
        self.accelerator.wait_for_everyone()
        self._excluded += time.perf_counter() - start

    def _push_from_checkpoint(self, checkpoint_folder):
        """Called by transformers on the staged folder; the push happens once the checkpoint is published."""
        if not self._staging:
            with redacted_args(self.args):
                super()._push_from_checkpoint(checkpoint_folder)

    def _save(self, output_dir=None, state_dict=None):
        if state_dict is None and fsdp.is_sharded(self.model):
            # Every process joins the gather; rank 0 writes ordinary weights (for LoRA, only the adapter's).
            state_dict = fsdp.full_state_dict(self.model, trainable_only=hasattr(self.model, "peft_config"))
        if self.args.should_save:  # first: saving the model drops _keys_to_ignore_on_save from state_dict in place
            self.stage.save_extra(output_dir or self.args.output_dir, state_dict)
        with redacted_args(self.args):  # training_args.bin must not carry tokens
            super()._save(output_dir, state_dict)

    # ---- FSDP: the model arrives sharded (engine/fsdp.py); the Trainer must neither move nor re-wrap it ------------
    def _move_model_to_device(self, model, device):
        if not fsdp.is_sharded(model):  # fully_shard has already placed each shard
            super()._move_model_to_device(model, device)

    def _wrap_model(self, model, training=True, dataloader=None):
        if not (training and fsdp.is_sharded(model)):
            return super()._wrap_model(model, training, dataloader)
        # accelerate adds autocast (bf16 on CPU) but must not put DDP on top of FSDP: once marked as prepared,
        # the model comes back unchanged when the Trainer prepares it together with the optimizer.
        if model not in self.accelerator._models:
            model = self.accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)
        model._is_accelerate_prepared = True
        return model

    def _save_optimizer_and_scheduler(self, output_dir):
        if not fsdp.is_sharded(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        fsdp.save_shards(self.model, _unwrapped(self.optimizer), output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not fsdp.is_sharded(self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if not self.is_deepspeed_enabled:
                self.stage.load_extra(resume_from_checkpoint)
            return
        fsdp.load_model_shards(self.model, resume_from_checkpoint)

    def _load_best_model(self):
        if not fsdp.is_sharded(self.model):
            super()._load_best_model()
            if not self.is_deepspeed_enabled:  # DeepSpeed's checkpoint restores every parameter itself
                self.stage.load_extra(self.state.best_model_checkpoint)
            return
        fsdp.load_model_shards(self.model, self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or not fsdp.is_sharded(self.model):
            if checkpoint and os.path.isdir(os.path.join(checkpoint, fsdp.SHARDS)):
                # Its optimizer state lives in the shards; resuming without it would silently restart Adam.
                raise ConfigError(f"resume_from_checkpoint: {checkpoint} was written by an fsdp run; resume it "
                                  "with fsdp and several processes.")
            return super()._load_optimizer_and_scheduler(checkpoint)
        fsdp.load_optimizer_shards(self.model, _unwrapped(self.optimizer), checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _any_nonfinite(self, loss_sum) -> bool:
        """One process's nan is every process's problem: agree, so all stop (or skip) together."""
        bad = (~torch.isfinite(loss_sum.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return bool(bad.item())

    def _note_nonfinite(self, loss_sum) -> None:
        """Count a non-finite micro-batch loss on the device (and keep the first such value for the message)."""
        value = loss_sum.detach().double().reshape(())
        bad = (~torch.isfinite(value)).double()
        if self._step_nonfinite is None:
            self._step_nonfinite = torch.stack([bad, value])
            return
        first = torch.where(self._step_nonfinite[0] > 0, self._step_nonfinite[1], value)
        self._step_nonfinite = torch.stack([self._step_nonfinite[0] + bad, first])

    def _stop_if_nonfinite(self) -> None:
        """Once per optimizer step, before its last backward (so before DeepSpeed's step inside it and before the
        Trainer's optimizer step): stop if any micro-batch of any process had a non-finite loss. One all-reduce and
        one host read a step; the earlier micro-batches' non-finite gradients are never applied."""
        noted, self._step_nonfinite = self._step_nonfinite, None
        bad = noted[:1].clone()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item():
            local = noted[1] if noted[0].item() else None
            self._nonfinite(None, float("nan") if local is None else local)

    def _nonfinite(self, model, loss_sum):
        step = self.state.global_step + 1
        if not self.skip_nonfinite:
            last = checkpoints.latest_checkpoint(self.args.output_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
            value = "on another process" if isinstance(loss_sum, float) else float(loss_sum)
            raise TrainingHalted(
                f"non-finite loss ({value}) at step {step} (epoch {self.state.epoch or 0:.2f}); {kept}. "
                "Lower learning_rate, check the data, or set skip_nonfinite_batches: true to skip such batches.")
        self.skipped_batches += 1
        logger.warning("Skipping a batch with non-finite loss at step %d (%d skipped so far).", step,
                       self.skipped_batches)
        # A zero that still reaches every trained parameter, so all processes run the same backward.
        return sum((p.view(-1)[0] * 0.0) for p in model.parameters() if p.requires_grad and p.numel())

    # ---- throughput logging ---------------------------------------------------------------------------
    def log(self, logs: dict, *args, **kwargs) -> None:
        now = time.perf_counter()
        if "loss" in logs and self._window_start is not None:
            elapsed = max(now - self._window_start - self._excluded, 1e-9)
            window = self._window if self._window is not None else torch.zeros(2, dtype=torch.float64)
            names = sorted(self._window_stats)
            # Throughput and the stage's statistics in one all-reduce and one host read for the whole window.
            totals = torch.cat([window.to(self.args.device),
                                torch.tensor([self._window_slots], dtype=torch.float64, device=self.args.device),
                                *(self._window_stats[n].to(self.args.device) for n in names)])
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            totals = totals.tolist()
            tokens, flops, slots = totals[:3]
            peak = device_peak_flops(self._compute_dtype(), self.mfu_peak_tflops) * self.accelerator.num_processes
            logs["tokens_per_second"] = round(tokens / elapsed, 2)
            logs["mfu"] = float(f"{flops / elapsed / peak:.4g}")  # 4 significant digits: tiny runs have tiny MFU
            logs["padding_fraction"] = round(1 - tokens / slots, 4) if slots else 0.0
            logs["peak_memory_gb"] = round(peak_memory_gb(), 3)
            logs.update(self._window_statistics(names, totals[3:]))
        reset = "loss" in logs or self._window_start is None
        super().log(logs, *args, **kwargs)
        if reset:  # the next window starts now: this log line (and the first one's peak measurement) left out
            self._window, self._window_slots = None, 0.0
            self._window_stats = {}
            self._window_start, self._excluded = time.perf_counter(), 0.0

    def _window_statistics(self, names: list[str], totals: list[float]) -> dict:
        """The stage's statistics over the logging window from their (sum, count) pairs, already summed over every
        micro-batch and process."""
        if not names:
            return {}
        pairs = zip(totals[0::2], totals[1::2])
        figures = self.stage.summarize({n: (s, None if math.isnan(c) else c) for n, (s, c) in zip(names, pairs)})
        return {n: round(float(v), 6) for n, v in figures.items()}

    def padding_fraction(self) -> float | None:
        """Share of the batch slots this process trained on that held padding (0 for perfectly packed rows)."""
        if not self._run_slots:
            return None
        return 1.0 - float(self._run_tokens) / self._run_slots

    def _compute_dtype(self) -> str:
        return "bfloat16" if self.args.bf16 else "float16" if self.args.fp16 else "float32"

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._window_start is None:
            self._window_start, self._excluded = time.perf_counter(), 0.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The logged loss is the mean over processes of what each returns, scaled for the gradient average
        # (compute_loss); sequence-parallel processes return shares of one row. The backward has run: this only
        # scales what is logged.
        scale = self.accelerator.num_processes / self._grad_divisor
        return loss * scale if scale != 1 else loss


class _StageHooks(TrainerCallback):
    """Hands the stage the engine once the model is wrapped and restored, before the first step."""

    def __init__(self, trainer: "ZeroTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        own = deepspeed_optimizer(args)
        if own:  # then create_optimizer never ran, so say here what trains the model
            logger.info("Optimizer: DeepSpeed's own %s from the DeepSpeed config (params %s).", own.get("type"),
                        own.get("params", {}))
        self.trainer.stage.before_training(self.trainer)


def _unwrapped(optimizer):
    """The torch optimizer inside accelerate's wrapper (torch's state-dict helpers step it to initialise state)."""
    return getattr(optimizer, "optimizer", optimizer)


def _summed_statistics(eval_pred, names: list[str] | None = None, summarize=None) -> dict:
    """[items, 2K] per-item (sum, count) columns of K statistics -> the figures `summarize` makes of each one's
    totals (the stage's; by default sum / count), and each count. A count column of NaN marks a statistic that is a
    count itself (logged as its sum)."""
    names = names or ["loss"]
    stats = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1, 2 * len(names)).sum(axis=0)
    totals = {name: (float(stats[2 * i]), None if np.isnan(stats[2 * i + 1]) else float(stats[2 * i + 1]))
              for i, name in enumerate(names)}
    figures = summarize(totals) if summarize else {n: s / max(c, 1e-12) for n, (s, c) in totals.items()}
    out = {f"stat_{name}": float(value) for name, value in figures.items()}
    for name, (_, count) in totals.items():
        if count is not None:
            out[f"stat_{name}_count"] = int(round(count))
    return out

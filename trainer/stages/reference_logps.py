"""precompute_ref_log_probs: the reference model's log-probs of every pair (a preference pair, or a kto example
and its mismatched pair, fixed ahead), computed in one pass before training.

Training then runs the policy alone (no reference forward a step, and for full/freeze runs no reference copy of
the weights: the pass runs on the starting weights themselves, which is what makes those runs possible under
ZeRO-3 and FSDP). The table (one row a pair: chosen, rejected) is cached beside the tokenized data, keyed by the
data and by the model files, dtype and attention path that produced it, so a rerun or a resumed run reads it back
(a resumed full/freeze run must: its weights are no longer the reference). The pass is split over the processes,
each running the same number of forwards (ZeRO-3 and FSDP gather weights collectively), and the rows are shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from trainer.errors import ConfigError

logger = logging.getLogger(__name__)


def _model_files(path: str | None) -> list:
    if not path or not os.path.isdir(path):
        return [path]
    return sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in Path(path).iterdir()
                  if f.suffix in (".safetensors", ".bin", ".json") and f.is_file())


def cache_path(config, items, stage) -> Path:
    from trainer.data.processing import default_cache_dir
    from trainer.options import split_list

    m, t = config.model, config.training
    payload = {"stage": stage.name, "partners": items.partners, "data": items.data._fingerprint,
               "examples": len(items.data), "model": m.model_name_or_path,
               "model_files": _model_files(m.model_name_or_path), "adapter": m.adapter_name_or_path,
               "adapter_files": _model_files(m.adapter_name_or_path), "finetuning": config.finetuning.finetuning_type,
               "ref_model": [(p, _model_files(p)) for p in (stage.opts.ref_model, *split_list(
                   stage.opts.ref_model_adapters))] if stage.opts.ref_model else None,
               "dtype": "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32", "attention": m.flash_attn,
               "prefix_sharing": stage.shares_prefix, "chunked_loss": m.chunked_loss}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
    root = Path(config.data.tokenized_cache_dir) if config.data.tokenized_cache_dir else default_cache_dir()
    return root / "reference" / f"{key}.npy"


def reference_table(stage, trainer, items, name: str) -> np.ndarray:
    """[pairs, 2] reference log-probs of `items`' examples, from the cache or from one pass over them."""
    config = stage.config
    path = cache_path(config, items, stage)
    resumed = trainer.state.global_step > 0
    if path.is_file() and (resumed or not config.data.overwrite_cache):
        table = np.load(path)
        if table.shape == (len(items.data), 2):
            logger.info("Reference log-probs of the %s pairs read from %s.", name, path)
            return table
    if resumed and stage.reference_is_policy:
        raise ConfigError(
            f"precompute_ref_log_probs: this resumed {config.finetuning.finetuning_type} run's weights are no longer "
            f"the reference, and its reference log-probs are not in the cache ({path}). Resume with the cache the run "
            "started with, or set precompute_ref_log_probs: false (the reference is then a copy of the starting "
            "weights).")
    table = _one_pass(stage, trainer, items)
    if trainer.is_world_process_zero():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.npy")
        np.save(partial, table)
        os.replace(partial, path)
    logger.info("Reference log-probs of %d %s pairs computed before training (cached in %s).", len(table), name,
                path)
    return table


def _one_pass(stage, trainer, items) -> np.ndarray:
    from trainer.data.collators import BOOKKEEPING
    from trainer.data.packing import Items
    from trainer.engine.shards import gathered, my_rounds

    one_each = Items(items.data, partners=items.partners)  # one item an example, whatever the training rows are
    world = trainer.accelerator.num_processes
    model = trainer.model
    was_training = model.training
    model.eval()
    rows: dict[int, np.ndarray] = {}
    try:
        with torch.no_grad(), trainer.accelerator.autocast():
            for indices, counts in my_rounds(len(one_each), trainer.args.per_device_eval_batch_size, world,
                                             trainer.accelerator.process_index):
                batch = trainer.data_collator([one_each[i] for i in indices])
                for key in BOOKKEEPING:
                    batch.pop(key, None)
                logps = stage.reference_rows(trainer.wrapper, model, trainer._prepare_inputs(batch))
                if counts:
                    rows.update(zip(indices, logps.float().cpu().numpy()))
    finally:
        model.train(was_training)
    rows = gathered(rows, world)
    return np.stack([rows[i] for i in range(len(one_each))]).astype(np.float32)

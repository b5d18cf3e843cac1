"""Checkpoints that are either complete or invisible.

The Trainer writes a checkpoint into output_dir/.staging/checkpoint-N; once every process is done,
the files are fsynced and the folder is renamed to output_dir/checkpoint-N in one atomic step. A kill
at any moment therefore leaves only complete checkpoint-* folders (and maybe a stale .staging, cleared
at the next start), so `resume_from_checkpoint: true` always finds a loadable one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

STAGING = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def staging_dir(output_dir: str) -> str:
    return os.path.join(output_dir, STAGING)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(output_dir: str, name: str) -> str:
    """Make a fully written staged checkpoint visible under its final name; returns the final path."""
    staged = Path(staging_dir(output_dir)) / name
    final = Path(output_dir) / name
    _fsync_tree(staged)
    if final.exists():  # a checkpoint of the same step from an overwritten run
        trash = Path(staging_dir(output_dir)) / f"{name}.old"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(staged, final)
    _fsync_dir(Path(output_dir))
    with contextlib.suppress(OSError):  # leave no empty staging folder behind
        os.rmdir(staging_dir(output_dir))
    return str(final)


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every published checkpoint, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for entry in os.listdir(output_dir):
        match = _CHECKPOINT.match(entry)
        if match and os.path.isdir(os.path.join(output_dir, entry)):
            found.append((int(match.group(1)), os.path.join(output_dir, entry)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def rotate(output_dir: str, limit: int | None, newest: str, keep: str | None = None) -> list[str]:
    """Delete the oldest checkpoints (by write time) beyond `limit`; never `newest` (the one just written,
    whatever its step: an overwritten run may have left higher ones) nor `keep` (the best model)."""
    found = complete_checkpoints(output_dir)
    if not limit or len(found) <= limit:
        return []
    protected = {os.path.abspath(newest), os.path.abspath(keep) if keep else None}
    by_age = sorted((os.path.getmtime(path), step, path) for step, path in found)
    removable = [path for _, _, path in by_age if os.path.abspath(path) not in protected]
    excess = len(found) - max(limit, 1)
    deleted = removable[:max(excess, 0)]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("Deleted old checkpoint %s (save_total_limit=%d).", path, limit)
    return deleted


def clear_stale_staging(output_dir: str) -> None:
    stale = Path(staging_dir(output_dir))
    if stale.exists():
        leftovers = sorted(p.name for p in stale.iterdir())
        shutil.rmtree(stale, ignore_errors=True)
        if leftovers:
            logger.warning("Removed incomplete checkpoint(s) %s left by an interrupted run.", ", ".join(leftovers))


def set_aside_previous_run(output_dir: str) -> str | None:
    """overwrite_output_dir: the earlier run's checkpoints belong to that run. Move them into
    output_dir/previous-run-<time>/, so `resume_from_checkpoint: true` can only pick this run's. Only the run just
    overwritten is kept: the folders that earlier overwrites set aside are deleted (and the log says so), or every
    rerun would keep another full set. Returns the folder, or None when there was nothing to move."""
    found = complete_checkpoints(output_dir)
    if not found:
        return None
    import time

    older = sorted(p for p in Path(output_dir).glob("previous-run-*") if p.is_dir())
    for folder in older:
        shutil.rmtree(folder)
    if older:
        logger.warning("overwrite_output_dir: deleted %s, set aside by an earlier overwrite (only the run just "
                       "overwritten is kept).", ", ".join(p.name for p in older))

    aside = Path(output_dir) / f"previous-run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    aside.mkdir(parents=True, exist_ok=True)
    for _, path in found:
        os.replace(path, aside / os.path.basename(path))
    logger.warning("overwrite_output_dir: moved the earlier run's %d checkpoint(s) (%s) to %s; this run's "
                   "checkpoints start afresh.", len(found), ", ".join(os.path.basename(p) for _, p in found), aside)
    return str(aside)


# What makes a folder resumable: the Trainer's state plus the optimizer's, in one of the forms the engines write.
OPTIMIZER_STATE = ("optimizer.pt", "optimizer.bin", "fsdp_shards")


def describe_unresumable(path: str) -> str | None:
    """Why `path` cannot be resumed (None: it can). Checked before anything loads."""
    folder = Path(path)
    if not folder.is_dir():
        return f"{path!r} is not a folder"
    has_state = (folder / "trainer_state.json").is_file()
    has_optimizer = any((folder / name).exists() for name in OPTIMIZER_STATE) or any(folder.glob("global_step*"))
    if has_state and has_optimizer:
        return None
    what = ("it holds weights and trainer_state.json but no optimizer state: the output of a finished run, or a "
            "checkpoint saved with save_only_model" if has_state and any(folder.glob("*.safetensors"))
            else "it is not a checkpoint (no trainer_state.json and optimizer state)")
    return (f"{path!r} cannot be resumed: {what}. A checkpoint folder (output_dir/checkpoint-N, written every "
            "save_steps) holds the weights, the optimizer, scheduler and RNG states and trainer_state.json, so "
            "training continues exactly. To start a new run from these weights instead, set model_name_or_path to "
            "it (full or freeze runs) or adapter_name_or_path (LoRA), without resume_from_checkpoint.")


def run_is_complete(checkpoint: str, max_steps: int, num_train_epochs: float) -> str | None:
    """A message when the checkpoint already reached the run's end (None: there is training left)."""
    import json

    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    step, epoch = int(state.get("global_step", 0)), float(state.get("epoch") or 0.0)
    if max_steps and max_steps > 0:
        if step >= max_steps:
            return f"{checkpoint} is at step {step} of max_steps {max_steps}: the run is already complete"
        return None
    if epoch >= num_train_epochs - 1e-9:
        return f"{checkpoint} has trained {epoch:g} of num_train_epochs {num_train_epochs:g}: the run is already complete"
    return None


# ---- before a run starts: what output_dir and resume_from_checkpoint hold ------------------------------------------
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
    why = describe_unresumable(str(value))
    if why:
        raise ConfigError(f"resume_from_checkpoint: {why}")

"""pissa_convert: at the end of training, a PiSSA adapter written again as a plain LoRA adapter of the ORIGINAL base.

A PiSSA run trains W_res + s·BA, where W_res = W - s·B0A0 replaced the base weight when the adapter was made. The
adapter in output_dir needs that residual: PEFT rebuilds it while loading (the SVD again; with pissa_iter >= 0 a
randomized one, so the loaded model is close to the trained one, not the same). The converted adapter is the change
itself, s·(BA - B0A0) = s·[B | -B0][A ; A0], a rank-2r LoRA adapter that loads on the unmodified base like any other
and gives the trained model (PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) computes it).

The initial adapter (A0, B0) is copied when the callback is made, right after the adapter is built and before any
step or checkpoint is loaded: a resumed run makes the same adapter again (same seed), and the converted delta must be
relative to that start, not to where a checkpoint left it (a resumed run checks that it made the same start). Layout
as LLaMA-Factory's: output_dir/pissa_init (the initial adapter, written when training starts) and
output_dir/pissa_converted.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

INITIAL, CONVERTED = "pissa_init", "pissa_converted"


def _adapter_state(peft, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's own entries of the model's state dict (LoRA matrices, trained token rows, modules_to_save),
    under the model's keys, copied to the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in peft.state_dict().items()
            if f".{adapter}." in k or k.endswith(f".{adapter}")}


class PissaConversion(TrainerCallback):
    """Made right after the adapter (before the stage extends the model or any checkpoint loads). Writes the initial
    adapter when training starts; a resumed run checks that it has made the same start (its residual base is the one
    the checkpoint's adapter was trained on), then converts at the end."""

    def __init__(self, model):
        from trainer.model.adapters import peft_model

        self.peft = peft_model(model)
        self.initial = _adapter_state(self.peft)

    def on_train_begin(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, INITIAL)
        if state.global_step > 0 and os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
            check_same_start(self.peft, self.initial, folder)  # every process: all stop together on a mismatch
        elif args.should_save:
            save_initial(self.peft, self.initial, folder)

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save:  # the main process alone; the others go on (no collective here)
            convert(self.peft, self.initial, args.output_dir)


def save_initial(peft, initial: dict[str, torch.Tensor], folder: str, adapter: str = "default") -> None:
    """The initial adapter, its config marked as a plain start (init_lora_weights true) so that PEFT loads it without
    another SVD."""
    config = peft.peft_config[adapter]
    start = config.init_lora_weights
    config.init_lora_weights = True
    try:
        peft.save_pretrained(folder, state_dict=initial, selected_adapters=[adapter])
    finally:
        config.init_lora_weights = start


def check_same_start(peft, initial: dict[str, torch.Tensor], folder: str, adapter: str = "default") -> None:
    """A resumed PiSSA run rebuilt its start (the SVD, same seed): it must be the start the run was trained from, or
    the checkpoint's adapter sits on another residual base (a randomized SVD on another device or library release
    draws differently)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from trainer.errors import ConfigError

    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    ours = get_peft_model_state_dict(peft, state_dict=initial, adapter_name=adapter)
    worst = max(((ours[k].float() - v.float()).abs().max().item() for k, v in saved.items() if k in ours),
                default=float("inf"))
    if worst > 1e-4 or saved.keys() != ours.keys():
        raise ConfigError(f"resume_from_checkpoint: this run's PiSSA start differs from the one in {folder} (max "
                          f"difference {worst:.3g}), so the checkpoint's adapter would sit on another residual base. "
                          "Resume with the same seed, pissa_iter and lora_target on the same kind of device, or "
                          "start the run again.")
    logger.info("PiSSA: the resumed run rebuilt the start it was trained from (%s).", folder)


def convert(peft, initial: dict[str, torch.Tensor], output_dir: str, adapter: str = "default") -> str:
    """Write output_dir/pissa_init (again: a run resumed in another folder has none) and output_dir/pissa_converted;
    returns the converted folder. The model is left as it was."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    initial_dir, converted_dir = os.path.join(output_dir, INITIAL), os.path.join(output_dir, CONVERTED)
    save_initial(peft, initial, initial_dir, adapter)
    config = peft.peft_config[adapter]
    with warnings.catch_warnings():  # PEFT loads the initial adapter beside the PiSSA one to convert, and warns
        warnings.filterwarnings("ignore", message="PiSSA changes the base weights")  # against stacking PiSSA adapters
        peft.save_pretrained(converted_dir, selected_adapters=[adapter],
                             path_initial_model_for_weight_conversion=initial_dir)
    # PEFT's conversion keeps the LoRA matrices only; what else the adapter trains (new token rows, modules_to_save)
    # does not depend on the start, and is put back as it was trained.
    weights = os.path.join(converted_dir, "adapter_model.safetensors")
    converted = load_file(weights)
    trained = get_peft_model_state_dict(peft, adapter_name=adapter)
    rest = {k: v.detach().cpu().contiguous() for k, v in trained.items() if k not in converted
            and ".lora_A." not in k and ".lora_B." not in k}
    if rest:
        save_file({**converted, **rest}, weights, metadata={"format": "pt"})
    logger.info("pissa_convert: wrote %s, a plain LoRA adapter (rank %d) of the original base model%s; %s keeps the "
                "PiSSA adapter (zerotune's export, chat and adapter_name_or_path load pissa_converted in its place).",
                converted_dir, 2 * config.r,
                f" with {len(rest)} trained tensors beside its LoRA matrices" if rest else "", output_dir)
    return converted_dir

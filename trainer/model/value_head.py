"""The reward model's value head: one score per token from the final hidden state, and its file.

The head is a Linear(hidden, 1) named `v_head.summary`, the names TRL's value-head models and LLaMA-Factory use,
so `value_head.safetensors` holds `v_head.summary.weight` and `v_head.summary.bias` exactly as their reward
models do (LLaMA-Factory's ppo reads it from reward_model). It hangs off the causal LM (the base model under
LoRA), so DeepSpeed, FSDP and the optimizer see it like any other trained parameter, but it is kept out of the
saved model weights and the LoRA adapter: it is written beside them, in every checkpoint and in output_dir.

Its bias starts at 0 and is not trained (r_chosen - r_rejected cancels it), so the head is also
exactly the `score` layer of transformers' AutoModelForSequenceClassification (which has no bias): README.md,
"Reward models", shows the loading.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FILE = "value_head.safetensors"
KEYS = ("v_head.summary.weight", "v_head.summary.bias")


class _Summary(nn.Module):
    """Linear(hidden, 1) whose bias is a buffer: the pairwise loss is blind to it (r_chosen - r_rejected cancels
    it), yet Adam would turn the float noise of its ~0 gradient into drift. It stays what it was loaded as (0 for a
    new head) and is saved under TRL's name."""

    def __init__(self, hidden_size: int):
        super().__init__()
        probe = nn.Linear(hidden_size, 1)
        self.weight = nn.Parameter(probe.weight.detach().clone())
        self.register_buffer("bias", torch.zeros(1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias.to(self.weight.dtype))


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = _Summary(hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype))


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / DeepSpeed / FSDP wrappers."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attach(model: nn.Module, saved_in: list[str]) -> ValueHead:
    """Give the model a trainable fp32 value head: the one saved in the first of `saved_in` that holds one (an
    earlier reward model's adapter or model folder), else a new one."""
    base = causal_lm(model)
    head = ValueHead(base.config.hidden_size)
    for folder in saved_in:
        path = os.path.join(folder, FILE) if folder else ""
        if path and os.path.isfile(path):
            load_into(head, path)
            logger.info("Value head loaded from %s.", path)
            break
    else:
        logger.info("Value head: new, Linear(%d, 1).", base.config.hidden_size)
    base.v_head = head
    base._keys_to_ignore_on_save = set(base._keys_to_ignore_on_save or ()) | set(KEYS)
    return head


def load_into(head: ValueHead, path: str) -> None:
    from safetensors.torch import load_file

    state = load_file(path)
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} (it holds {', '.join(sorted(state))})")
    with torch.no_grad():
        for key, param in zip(KEYS, (head.summary.weight, head.summary.bias)):
            if getattr(param, "ds_id", None) is not None:  # ZeRO-3 partition: DeepSpeed restores it itself
                return
            param.copy_(state[key].to(param.dtype).view_as(param))


def head_state(head: ValueHead, state_dict: dict | None) -> dict[str, torch.Tensor]:
    """The head's two tensors: each from the gathered state dict when there is one (ZeRO-3 and FSDP gather one for
    saving; its keys carry the wrappers' prefixes; a LoRA run's holds only trained tensors), else from the module."""
    out = {}
    for key, tensor in zip(KEYS, (head.summary.weight, head.summary.bias)):
        found = next((v for name, v in (state_dict or {}).items() if name.endswith(key)), None)
        if found is None:
            if getattr(tensor, "ds_id", None) is not None or hasattr(tensor, "full_tensor"):
                # Only the main process saves: it cannot gather a ZeRO-3 partition or an FSDP shard alone.
                raise RuntimeError(f"{key} is sharded and the Trainer gathered no state dict holding it; under ZeRO-3 "
                                   "set stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config.")
            found = tensor
        out[key] = found.detach().float().cpu().clone()
    return out


# What a saved head scores: a reward model's head scores answers (rm); a critic estimates ppo's values and is no
# reward model. The file names and tensor names are TRL's for both, so the role rides in the file's metadata.
ROLES = ("reward", "critic")


def save(head: ValueHead, folder: str, state_dict: dict | None = None, role: str = "reward") -> None:
    from safetensors.torch import save_file

    assert role in ROLES, role
    os.makedirs(folder, exist_ok=True)
    save_file(head_state(head, state_dict), os.path.join(folder, FILE), metadata={"format": "pt", "role": role})


def saved_role(path: str) -> str:
    """The role a head file was saved with ("reward" for files without one: rm runs and LLaMA-Factory's)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("role", "reward")

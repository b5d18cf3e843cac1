"""Where ppo's scores come from: a reward function, or a reward model with a value head.

- reward_model_type: function: `reward_function: module:callable` (a file path `path/to/file.py:name` works too),
  called as fn(prompts, responses) -> one float each, with prompts and responses as decoded strings (the
  prompt as the model saw it, special tokens left out; the response without its stop token). If the callable
  also takes `references`, it gets each prompt's answer from the dataset (for verifiable rewards).
- reward_model_type: lora (LLaMA-Factory's default): reward_model is an rm-stage LoRA output trained on the same
  base; it is loaded as a second adapter ("reward") of the policy's own model, so no second copy of the base.
- reward_model_type: full: reward_model is a whole model folder (an rm-stage full output, or any causal LM with
  value_head.safetensors), loaded frozen in the compute dtype, placed like the policy (the pair stages' reference
  machinery: partitioned by ZeRO-3 or sharded by FSDP over several processes).

A model's score is its value head at the sequence's last token (the response's stop token), as the rm stage
trained it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import os

import torch

from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

REWARD_ADAPTER = "reward"


def load_function(spec: str, key: str = "reward_function"):
    """`module:callable` or `path/to/file.py:callable` -> the callable, with errors that name the key."""
    if ":" not in spec:
        raise ConfigError(f"{key}: {spec!r} must be module:callable (or path/to/file.py:callable).")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise ConfigError(f"{key}: {where} does not exist.")
            loaded = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as err:  # the user's module failed to import: say which and why
        raise ConfigError(f"{key}: importing {where!r} failed: {type(err).__name__}: {err}") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {where!r} has no callable {name!r}.")
    return fn


class FunctionReward:
    def __init__(self, spec: str):
        self.fn = load_function(spec)
        self.spec = spec
        params = inspect.signature(self.fn).parameters
        self.takes_references = "references" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())

    def score_texts(self, prompts: list[str], responses: list[str], references: list[str]) -> torch.Tensor:
        kwargs = {"references": references} if self.takes_references else {}
        scores = self.fn(prompts, responses, **kwargs)
        try:
            values = [float(s) for s in scores]
        except (TypeError, ValueError) as err:
            raise ValueError(f"reward_function {self.spec} must return one float per response; got {scores!r:.200}") \
                from err
        if len(values) != len(responses):
            raise ValueError(f"reward_function {self.spec} returned {len(values)} scores for {len(responses)} "
                             "responses")
        return torch.tensor(values, dtype=torch.float32)


def load_value_head(folder: str, hidden_size: int):
    from trainer.model import value_head

    path = os.path.join(folder, value_head.FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"reward_model: {folder} has no {value_head.FILE}; give the output_dir of an rm run "
                          "(zerotune or LLaMA-Factory stage: rm).")
    if value_head.saved_role(path) == "critic":
        raise ConfigError(f"reward_model: {folder} holds a ppo run's critic (its value estimates), not a reward "
                          "model; give the output_dir of an rm run (zerotune or LLaMA-Factory stage: rm).")
    head = value_head.ValueHead(hidden_size)
    value_head.load_into(head, path)
    return head.requires_grad_(False).eval()


class ModelReward:
    """A reward model's score of each sequence: the value head at its last token. `model` is a separate frozen
    model (full), or the policy itself with the reward adapter switched on (lora)."""

    def __init__(self, folder: str, head, model=None, wrapper=None, adapter: str = REWARD_ADAPTER):
        self.folder, self.head, self.model, self.wrapper, self.adapter = folder, head, model, wrapper, adapter

    @torch.no_grad()
    def score_batch(self, policy, policy_wrapper, batch: dict) -> torch.Tensor:
        model, wrapper = (self.model, self.wrapper) if self.model is not None else (policy, policy_wrapper)
        device = batch["input_ids"].device
        self.head.to(device)
        if self.model is not None and not _placed(self.model):
            self.model.to(device)  # loaded on the CPU; the engine moved the policy after prepare()
        with self._switched(model):
            values = wrapper.token_values(model, batch, self.head)
        last = batch["cu_seq_lens_q"][1:].to(values.device, torch.long) - 1
        return values[0, last].float().cpu()

    def _switched(self, model):
        from trainer.model.adapters import use_adapter

        if self.model is not None:
            return contextlib.nullcontext()
        return use_adapter(model, self.adapter)


def _placed(model) -> bool:
    from trainer.model.reference import sharded_module

    return sharded_module(model)


def load_reward_adapter(model, folder: str, name: str = REWARD_ADAPTER, key: str = "reward_model"):
    """reward_model_type: lora: the rm run's adapter as a second, frozen adapter of the policy's model (`name`: the
    adapter's name there; `key`: the YAML key it came from, for errors)."""
    from trainer.model.adapters import load_frozen_adapter, peft_model

    if peft_model(model) is None:
        raise ConfigError("reward_model_type: lora loads the reward adapter onto the policy's base; it needs "
                          "finetuning_type: lora (or set reward_model_type: full).")
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise ConfigError(f"reward_model: {folder} holds no LoRA adapter (adapter_config.json); for a whole reward "
                          "model set reward_model_type: full.")
    load_frozen_adapter(model, folder, name, key=key)
    logger.info("Reward model: the adapter in %s on the policy's base (no second copy of the base).", folder)

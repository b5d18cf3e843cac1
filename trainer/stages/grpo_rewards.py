"""grpo's rewards: `reward_funcs`, a comma list whose entries are reward functions or reward models, called TRL's way.

- A function: `module:callable` or `path/to/file.py:callable`, called as TRL's GRPOTrainer calls one:
  fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **the row's other columns), each a list of
  one value per completion. For a conversational dataset (sharegpt, openai) a prompt is its messages
  ([{"role", "content"}, ...]) and a completion [{"role": "assistant", "content": text}]; otherwise both are strings
  (the dataset's prompt text, as TRL's plain prompts are; the completion without its stop token). completion_ids
  are the sampled token ids (with the stop token). A function without **kwargs receives only the arguments it names.
  It returns one float per completion, or None where it does not apply (TRL's convention: left out of that
  function's mean, and a completion no function scored gets no advantage).
- A reward model: the output_dir of an rm run (value_head.safetensors): a LoRA adapter folder is loaded as another
  frozen adapter of the policy (finetuning_type: lora, the same base), a whole model folder as a frozen model; its
  score is the value head at the completion's last token, as the rm stage trained it.

Each is named as TRL names it (the callable's name, the folder's name) in the logged rewards/<name>/mean and /std.
A function that raises is reported with its name and the first row it fails on alone (dataset and row number,
prompt and completion), so a bad row is found without a debugger.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import torch

from trainer.errors import ConfigError

logger = logging.getLogger(__name__)


class RewardFunctionError(RuntimeError):
    """A reward function raised or answered in a form that cannot be used."""


def _callable_name(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


class RewardFunction:
    kind = "function"

    def __init__(self, spec: str):
        from trainer.stages.rewards import load_function

        self.spec = spec
        self.fn = load_function(spec, key="reward_funcs")
        self.name = _callable_name(self.fn)
        params = inspect.signature(self.fn).parameters.values()
        self.takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
        self.params = {p.name for p in params}

    def _call(self, kwargs: dict) -> list:
        given = kwargs if self.takes_all else {k: v for k, v in kwargs.items() if k in self.params}
        return list(self.fn(**given))

    def __call__(self, kwargs: dict, count: int, describe) -> torch.Tensor:
        """One reward per completion (NaN for None). `describe(i)`: row i for an error message."""
        try:
            values = self._call(kwargs)
        except Exception as err:
            raise RewardFunctionError(self._failing_row(kwargs, count, describe, err)) from err
        if len(values) != count:
            raise RewardFunctionError(f"reward function {self.name} ({self.spec}) returned {len(values)} rewards for "
                                      f"{count} completions; it must return one per completion.")
        try:
            return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise RewardFunctionError(f"reward function {self.name} ({self.spec}) must return one float (or None) "
                                      f"per completion; got {values!r:.200}") from err

    def _failing_row(self, kwargs: dict, count: int, describe, err: Exception) -> str:
        """The error's message, with the first row the function fails on alone (it is called once per row until one
        fails: only after the batch failed)."""
        what = f"reward function {self.name} ({self.spec}) raised {type(err).__name__}: {err}"
        for i in range(count):
            one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == count else v) for k, v in kwargs.items()}
            try:
                self._call(one)
            except Exception as alone:  # noqa: BLE001 - the user's function: any error is the one to report
                return f"{what}\n  on {describe(i)}; alone it raises {type(alone).__name__}: {alone}"
        return f"{what}\n  on a batch of {count} completions (no row fails alone)"


class RewardModel:
    """An rm run's output as a reward: `score_batch` is rewards.ModelReward's, set up by the stage (the adapter needs
    the policy, the frozen model the loader)."""
    kind = "model"

    def __init__(self, folder: str, index: int):
        self.spec = folder
        self.name = os.path.basename(os.path.normpath(folder))
        self.lora = os.path.isfile(os.path.join(folder, "adapter_config.json"))
        self.adapter = f"reward_{index}"
        self.scorer = None  # rewards.ModelReward

    def score_batch(self, policy, wrapper, batch: dict) -> torch.Tensor:
        return self.scorer.score_batch(policy, wrapper, batch)


def parse(specs: list[str], weights: list[float] | None, finetuning_type: str) -> list:
    """The reward_funcs entries, checked before anything loads: functions imported, model folders found."""
    from trainer.model import value_head

    if not specs:
        raise ConfigError("stage grpo needs reward_funcs: a comma list of reward functions (module:callable or "
                          "path/to/file.py:callable) and/or rm-run output folders.")
    rewards = []
    for i, spec in enumerate(specs):
        if os.path.isdir(spec):
            if not os.path.isfile(os.path.join(spec, value_head.FILE)):
                raise ConfigError(f"reward_funcs: {spec} is a folder without {value_head.FILE}; give the output_dir of "
                                  "an rm run, or a reward function as module:callable.")
            reward = RewardModel(spec, i)
            if reward.lora and finetuning_type != "lora":
                raise ConfigError(f"reward_funcs: {spec} is a LoRA reward adapter, loaded onto the policy's own base, "
                                  "which needs finetuning_type: lora; with full or freeze give a merged (full) rm.")
            rewards.append(reward)
        else:
            rewards.append(RewardFunction(spec))
    names = [r.name for r in rewards]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"reward_funcs: {', '.join(twice)} named twice; each reward is logged under its name "
                          "(rewards/<name>/mean), so give each a distinct one.")
    if weights is not None and len(weights) != len(rewards):
        raise ConfigError(f"reward_weights: {len(weights)} weights for {len(rewards)} reward_funcs; give one each.")
    return rewards


def load_models(rewards: list, model, config=None, wrapper=None, lora: bool = True) -> None:
    """The reward models' scorers: LoRA ones onto the policy (lora=True, before the engine wraps it), whole ones
    frozen beside it (lora=False)."""
    from trainer.stages.rewards import ModelReward, load_reward_adapter, load_value_head

    for r in rewards:
        if r.kind != "model" or r.lora != lora:
            continue
        if lora:
            from trainer.model.value_head import causal_lm

            load_reward_adapter(model, r.spec, name=r.adapter, key="reward_funcs")
            head = load_value_head(r.spec, causal_lm(model).config.hidden_size)
            r.scorer = ModelReward(r.spec, head, adapter=r.adapter)
        else:
            from trainer.model.reference import frozen_dtype, load_frozen, placed_separately, shard_like_policy
            from trainer.model.wrapper import ModelWrapper

            dtype = frozen_dtype(config)
            scorer = load_frozen(config, r.spec, [], model, dtype or torch.float32, "reward_funcs", "Reward model")
            head = load_value_head(r.spec, scorer.config.hidden_size)
            scorer_wrapper = ModelWrapper(scorer, chunk_size=wrapper.chunk_size)
            if placed_separately(config):
                scorer = shard_like_policy(config, scorer, dtype, "Reward model")
            r.scorer = ModelReward(r.spec, head, scorer, scorer_wrapper)


def score(rewards: list, kwargs: dict, count: int, model_scores: dict, describe) -> torch.Tensor:
    """[completions, rewards]: each reward's scores (NaN where a function answered None)."""
    columns = []
    for r in rewards:
        columns.append(model_scores[r.name].float().cpu() if r.kind == "model" else r(kwargs, count, describe))
    return torch.stack(columns, dim=1)

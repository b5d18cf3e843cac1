"""Reward functions for stage grpo (reward_funcs: examples/grpo_rewards.py:<name>), called TRL's way: the prompts,
the completions (strings; for a conversational dataset, [{"role": "assistant", "content": ...}]), completion_ids and
every other column of the dataset as keyword arguments, one value per completion; one float back per completion
(None: this function does not judge that completion).
"""

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def last_number(text: str) -> float | None:
    """The last number written in the text (thousands commas allowed), or None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact_sum(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1 when the last number of the completion is the row's answer, else 0 (a wrong number, or none at all)."""
    scores = []
    for completion, expected in zip(completions, answer):
        got = last_number(_text(completion))
        scores.append(float(got is not None and got == float(expected)))
    return scores

"""Reward functions for stage ppo (reward_function: examples/rewards.py:<name>).

A reward function takes the prompts and the sampled responses as strings (one each per sample) and returns one
float per response; if it also takes `references`, it gets each prompt's answer from the dataset, for rewards that
can be checked. zerotune calls it on every process for that process's samples.
"""


def concise_sentence(prompts: list[str], responses: list[str]) -> list[float]:
    """Half a point for ending with a period, half for staying under 40 words (less the further over it goes)."""
    scores = []
    for response in responses:
        text = response.strip()
        words = len(text.split())
        ends = 0.5 if text.endswith(".") else 0.0
        short = 0.5 if words <= 40 else max(0.0, 0.5 * (1 - (words - 40) / 40))
        scores.append(ends + short if text else 0.0)
    return scores


def exact_answer(prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
    """1 when the response is the dataset's answer (ignoring case and surrounding spaces), else 0."""
    return [float(r.strip().lower() == ref.strip().lower()) for r, ref in zip(responses, references)]

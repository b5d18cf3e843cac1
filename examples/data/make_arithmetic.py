"""Writes arithmetic_demo.json: addition questions with their sums, for the grpo example (examples/grpo_lora.yaml).

    python examples/data/make_arithmetic.py

Rows are alpaca prompts without an output; `answer` is the column the reward function
(examples/grpo_rewards.py:exact_sum) checks each completion against. Fixed seed: the file is reproducible.
"""

import json
import random
from pathlib import Path

ROWS = 400


def rows(n: int = ROWS, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        out.append({"instruction": f"What is {a} + {b}? Answer with just the number.", "answer": str(a + b)})
    return out


if __name__ == "__main__":
    target = Path(__file__).with_name("arithmetic_demo.json")
    target.write_text(json.dumps(rows(), indent=1) + "\n")
    print(f"wrote {target}")

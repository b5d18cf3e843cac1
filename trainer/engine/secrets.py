"""Keep tokens and keys out of everything zerotune writes (logs, saved args, W&B config)."""

from __future__ import annotations

import contextlib
import dataclasses
import re

SECRET_NAME = re.compile(r"(token|key|secret|password)", re.IGNORECASE)
# Names that match the pattern but hold no secret.
NOT_SECRET = {"max_new_tokens", "include_num_input_tokens_seen", "average_tokens_across_devices",
              "metric_for_best_model", "length_column_name", "label_names", "hub_private_repo",
              "pad_to_multiple_of", "tokenized_cache_dir", "use_fast_tokenizer"}


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and name not in NOT_SECRET


@contextlib.contextmanager
def redacted_args(args):
    """Temporarily blank every string field of a dataclass whose name says it holds a secret."""
    saved = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name, None)
        if is_secret(f.name) and isinstance(value, str) and value:
            saved[f.name] = value
            object.__setattr__(args, f.name, None)
    try:
        yield args
    finally:
        for name, value in saved.items():
            object.__setattr__(args, name, value)

"""streaming: true — corpora larger than memory. Rows are read, formatted, tokenized and packed on the
fly (datasets' IterableDataset), so nothing is cached and training starts at once; it needs max_steps,
since an endless stream has no epoch length."""

from __future__ import annotations

import logging
from typing import Iterator

from trainer.data import formats, registry
from trainer.data.processing import tokenize_document, tokenize_row
from trainer.errors import ConfigError

logger = logging.getLogger(__name__)


def _examples(names: list[str], data_args, data_kind: str, tokenizer, template) -> Iterator[dict]:
    import datasets

    for name in names:
        spec = registry.get_spec(name, data_args.dataset_dir)
        if data_kind == "pretrain":
            spec.formatting = "text"
        if spec.source == "file":
            files = [str(f) for f in spec.files()]
            builder = registry.FILE_BUILDERS[spec.files()[0].suffix]
            rows = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        else:
            rows = datasets.load_dataset(spec.path, name=spec.subset, split=spec.split, streaming=True)
        convert = formats.FORMATTERS[spec.formatting](spec)
        bad = good = 0
        for number, row in enumerate(rows, start=1):
            if data_args.max_samples is not None and number > data_args.max_samples:
                break
            if number == 1:
                formats._check_columns(spec, list(row), spec.formatting)
            example = convert(row)
            if example["_error"]:
                bad += 1
                if bad <= 5:
                    logger.warning("%s (%s) row %d skipped: %s", name, spec.path, number, example["_error"])
                limit = data_args.max_bad_rows if data_args.max_bad_rows >= 1 else data_args.max_bad_rows * number
                if bad > limit and (data_args.max_bad_rows >= 1 or number >= 100):
                    raise ConfigError(f"dataset {name!r} ({spec.path}): {bad} of the first {number} rows are "
                                      f"malformed, more than max_bad_rows={data_args.max_bad_rows} allows.")
                continue
            good += 1
            if data_kind == "pretrain":
                yield from (c for c in tokenize_document(example, tokenizer, data_args.cutoff_len) if not c["_no_labels"])
            else:
                out = tokenize_row(example, template, tokenizer, data_args.cutoff_len, data_args.train_on_prompt,
                                   data_args.mask_history)
                if not out["_no_labels"] and not (out["_truncated"] and data_args.cutoff_policy == "drop"):
                    yield out
        if bad:
            logger.warning("%s: skipped %d malformed rows while streaming.", name, bad)
        if not good:
            raise ConfigError(f"dataset {name!r} ({spec.path}) streamed no usable example ({bad} malformed rows).")


def packed_stream(names: list[str], data_args, data_kind: str, tokenizer, template, pack: bool) -> Iterator[dict]:
    """Greedy on-the-fly packing: examples fill the current row until the next one does not fit."""
    row: dict = {"input_ids": [], "labels": [], "lengths": []}
    for ex in _examples(names, data_args, data_kind, tokenizer, template):
        n = len(ex["input_ids"])
        if row["lengths"] and (not pack or len(row["input_ids"]) + n > data_args.cutoff_len):
            yield row
            row = {"input_ids": [], "labels": [], "lengths": []}
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["lengths"].append(n)
    if row["lengths"]:
        yield row


def streaming_dataset(names: list[str], data_args, data_kind: str, tokenizer, template, max_steps: int):
    import datasets

    if max_steps is None or max_steps <= 0:
        raise ConfigError("streaming: true needs max_steps (a stream has no known length, so epochs are undefined).")
    return datasets.IterableDataset.from_generator(
        packed_stream, gen_kwargs=dict(names=names, data_args=data_args, data_kind=data_kind, tokenizer=tokenizer,
                                       template=template, pack=bool(data_args.packing)))

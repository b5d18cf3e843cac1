"""streaming: true — corpora larger than memory. Rows are read and tokenized on the fly (datasets'
IterableDataset) through the same `process_rows` and `keep_reason` as cached data, so bad rows, truncation and
labels are treated alike; nothing is cached and training starts at once. It needs max_steps, since an endless
stream has no epoch length. With packing, examples are packed greedily as they come (best-fit needs the whole
set, which a stream never has)."""

from __future__ import annotations

import itertools
import logging
from typing import Iterator

from trainer.data import registry
from trainer.data.kinds import DATA_KINDS
from trainer.data.processing import check_rows, keep_reason, process_rows
from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

BATCH = 64  # rows tokenized together: the tokenizer's batch call, without holding back the first step


def _raw_rows(spec: registry.DatasetSpec):
    import datasets

    if spec.source == "file":
        files = [str(f) for f in spec.files()]
        builder = registry.FILE_BUILDERS[spec.files()[0].suffix]
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    return datasets.load_dataset(spec.path, name=spec.subset, split=spec.split, streaming=True)


def _batches(spec, data_args, data_kind: str) -> Iterator[dict[str, list]]:
    """Columnar batches of raw rows with their 1-based `_row` numbers, max_samples applied."""
    buffer: list[dict] = []
    for number, row in enumerate(_raw_rows(spec), start=1):
        if data_args.max_samples is not None and number > data_args.max_samples:
            break
        if number == 1:
            check_rows(DATA_KINDS.lookup(data_kind), spec, list(row))
        buffer.append({**row, "_row": number})
        if len(buffer) == BATCH:
            yield _columns(buffer)
            buffer = []
    if buffer:
        yield _columns(buffer)


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def stream_examples(names: list[str], data_args, data_kind: str, tokenizer, template,
                    quiet: bool = False) -> Iterator[dict]:
    """Trainable examples {input_ids, labels, lengths} in file order, each dataset after the other (quiet: the
    stream's later passes, whose rows were reported on the first)."""
    kind = DATA_KINDS.lookup(data_kind)
    for name in names:
        spec = registry.get_spec(name, data_args.dataset_dir)
        spec.formatting = kind.formatting or spec.formatting
        counts = {"bad": 0, "dropped_long": 0, "no_labels": 0, "": 0}
        read = 0
        for batch in _batches(spec, data_args, data_kind):
            read += len(batch["_row"])
            out = process_rows(batch, spec, data_kind, tokenizer, template, data_args)
            for i, ids in enumerate(out["input_ids"]):
                reason = keep_reason(out["_error"][i], out["_truncated"][i], out["_no_labels"][i],
                                     data_args.cutoff_policy)
                counts[reason] += 1
                if reason == "bad" and counts["bad"] <= 5 and not quiet:
                    logger.warning("%s (%s) row %d skipped: %s", name, spec.path, out["_row"][i], out["_error"][i])
                if not reason:
                    yield {"input_ids": ids, "labels": out["labels"][i],
                           "lengths": out["segments"][i] if "segments" in out else [len(ids)],
                           **{c: [out[c][i]] for c in kind.carried}}
            limit = data_args.max_bad_rows if data_args.max_bad_rows >= 1 else data_args.max_bad_rows * read
            if counts["bad"] > limit and (data_args.max_bad_rows >= 1 or read >= 100):
                raise ConfigError(f"dataset {name!r} ({spec.path}): {counts['bad']} of the first {read} rows are "
                                  f"malformed, more than max_bad_rows={data_args.max_bad_rows} allows.")
        if quiet:
            continue
        if counts["bad"]:
            logger.warning("%s: skipped %d malformed rows while streaming.", name, counts["bad"])
        if counts["dropped_long"] or counts["no_labels"]:
            logger.warning("%s: dropped %d examples longer than cutoff_len (cutoff_policy: drop) and %d without trained "
                           "tokens while streaming.", name, counts["dropped_long"], counts["no_labels"])
        if not counts[""]:
            raise ConfigError(f"dataset {name!r} ({spec.path}) streamed no usable example ({counts['bad']} malformed "
                              "rows).")


def endless(names: list[str], data_args, data_kind: str, tokenizer, template) -> Iterator[dict]:
    """The stream, started again each time it ends. The data loader never sees an end, so no optimizer step is
    ever cut short or made of two passes' leftovers: every step holds the same number of rows (max_steps ends
    the run)."""
    for number in itertools.count(1):
        if number > 1:
            logger.info("Reached the end of the stream; reading it again (pass %d).", number)
        yield from stream_examples(names, data_args, data_kind, tokenizer, template, quiet=number > 1)


def packed_stream(names: list[str], data_args, data_kind: str, tokenizer, template, pack: bool) -> Iterator[dict]:
    """Dataset items for the collator: one example each, or (pack) examples filling a row until the next one does
    not fit in a row (cutoff_len; two for preference pairs)."""
    from trainer.data.processing import row_capacity

    capacity = row_capacity(data_args.cutoff_len, DATA_KINDS.lookup(data_kind).segmented)
    row: dict = {"input_ids": [], "labels": [], "lengths": []}
    examples = endless(names, data_args, data_kind, tokenizer, template)
    if DATA_KINDS.lookup(data_kind).partners:
        from trainer.data.packing import neighbour_partners

        examples = neighbour_partners(examples)
    for ex in examples:
        n = len(ex["input_ids"])
        if row["lengths"] and (not pack or len(row["input_ids"]) + n > capacity):
            yield row
            row = {"input_ids": [], "labels": [], "lengths": []}
        for key, values in ex.items():  # input_ids, labels, lengths, and the kind's per-example columns
            row.setdefault(key, [])
            row[key] += values
    if row["lengths"]:
        yield row


def streaming_dataset(names: list[str], data_args, data_kind: str, tokenizer, template, max_steps: int):
    import datasets

    if max_steps is None or max_steps <= 0:
        raise ConfigError("streaming: true needs max_steps (a stream has no known length, so epochs are undefined).")
    return datasets.IterableDataset.from_generator(
        packed_stream, gen_kwargs=dict(names=names, data_args=data_args, data_kind=data_kind, tokenizer=tokenizer,
                                       template=template, pack=bool(data_args.packing)))

"""Best-fit-decreasing packing of whole examples into rows of at most cutoff_len tokens.

A packed row records where each of its examples starts (`lengths`); the collator turns that into the
segment layout every attention path reads (position_ids restarting at 0, cu_seq_lens) and ignores the
first label of each example, so examples never see or predict each other.
"""

from __future__ import annotations

import bisect
import logging

logger = logging.getLogger(__name__)


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins; longest first, each into the fullest bin it still fits (ties: oldest bin)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"example {i} has {need} tokens, more than the row capacity {capacity}")
        pos = bisect.bisect_left(free, (need, -1))
        if pos < len(free):
            remaining, b = free.pop(pos)
            bins[b].append(i)
            remaining -= need
        else:
            b, remaining = len(bins), capacity - need
            bins.append([i])
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    return bins


def pack_dataset(data, cutoff_len: int):
    """A tokenized dataset (input_ids, labels, length) -> packed rows (input_ids, labels, lengths)."""
    import datasets

    lengths = data["length"]
    bins = best_fit_bins(lengths, cutoff_len)
    input_ids, labels = data["input_ids"], data["labels"]
    rows: dict[str, list] = {"input_ids": [], "labels": [], "lengths": []}
    for members in bins:
        row_ids, row_labels, row_lengths = [], [], []
        for i in members:
            row_ids += input_ids[i]
            row_labels += labels[i]
            row_lengths.append(len(input_ids[i]))
        rows["input_ids"].append(row_ids)
        rows["labels"].append(row_labels)
        rows["lengths"].append(row_lengths)
    packed = datasets.Dataset.from_dict(rows)
    used = sum(lengths)
    efficiency = used / (len(bins) * cutoff_len) if bins else 0.0
    logger.info("Packed %d examples into %d rows of %d tokens: packing efficiency %.1f%% (real tokens / capacity).",
                len(lengths), len(bins), cutoff_len, 100 * efficiency)
    return packed, efficiency


def unpacked_dataset(data):
    """One example per row, in the same columns as packed rows, so one collator serves both."""
    return data.map(lambda x: {"lengths": [x["length"]]}, remove_columns=["length"])

"""Best-fit-decreasing packing plans, and the dataset items the collator lays out.

A packing plan is index lists: which examples share a row of at most cutoff_len tokens. Rows are never
materialised ahead: `Items` assembles each one from the tokenized examples when the data loader asks for it,
so a million-example set costs its plan (a few bytes an example), not a second copy of every token in every
process. The collator turns an item's `lengths` into the segment layout every attention path reads
(position_ids restarting at 0, cu_seq_lens) and ignores the first label of each example, so examples never
see or predict each other.
"""

from __future__ import annotations

import bisect
import logging

import numpy as np
import torch

from trainer.data.processing import OUTCOME_COLUMNS

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


class Items(torch.utils.data.Dataset):
    """Dataset items over tokenized examples: one example each, or the rows of a packing plan.

    Each item is {input_ids, labels, lengths}: the examples' tokens end to end and each example's length, plus,
    for each table in `extra` (name -> array with one row per example, filled in later: the preference stages'
    precomputed reference log-probs), the rows of its examples, flattened, and the data kind's own columns (kto's
    tag), one value an example. With `partners` (a data kind whose examples pair with a neighbour's answer: kto's
    mismatched pairs), an unpacked item also carries the answer of its fixed partner, the neighbouring example in
    dataset order (partner_ids, partner_labels), so the pairs are the same whatever the shuffle and however a step
    is split into micro-batches or processes.
    """

    def __init__(self, data, bins: list[list[int]] | None = None, partners: bool = False):
        # `segments`: an example made of several sequences (a preference pair) lists their lengths. Any column
        # besides the tokens and the tokenizer's bookkeeping is the data kind's own, one value an example (kinds.py).
        self.carried = [c for c in data.column_names if c not in ("input_ids", "labels", "segments", *OUTCOME_COLUMNS)]
        self.data = data.select_columns([c for c in ("input_ids", "labels", "segments") if c in data.column_names]
                                        + self.carried)
        self.segmented = "segments" in self.data.column_names
        self.members = self.offsets = None
        self.partners = partners
        self.extra: dict[str, np.ndarray] = {}
        if bins is not None:
            self.members = np.fromiter((i for b in bins for i in b), dtype=np.int64)
            self.offsets = np.cumsum([0] + [len(b) for b in bins], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data) if self.offsets is None else len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if self.offsets is None:
            ex = self.data[int(i)]
            item = {"input_ids": ex["input_ids"], "labels": ex["labels"],
                    "lengths": ex["segments"] if self.segmented else [len(ex["input_ids"])]}
            item.update({c: [ex[c]] for c in self.carried})
            if self.partners:
                item.update(self._partner_answer(int(i)))
            members = [int(i)]
        else:
            members = self.members[self.offsets[i]:self.offsets[i + 1]].tolist()
            rows = self.data[members]
            lengths = [n for seg in rows["segments"] for n in seg] if self.segmented else \
                [len(ids) for ids in rows["input_ids"]]
            item = {"input_ids": [t for ids in rows["input_ids"] for t in ids],
                    "labels": [t for lab in rows["labels"] for t in lab], "lengths": lengths}
            item.update({c: rows[c] for c in self.carried})
        for name, table in self.extra.items():
            item[name] = table[members].reshape(-1).tolist()
        return item

    def label_ids(self) -> list[int]:
        """Every token id the labels hold, read in one pass over the arrow column (what a run teaches to emit)."""
        import pyarrow.compute as pc

        labels = self.data.select_columns(["labels"]).with_format("arrow")[:]["labels"]
        return sorted(i for i in pc.unique(pc.list_flatten(labels)).to_pylist() if i is not None and i >= 0)

    def _partner_answer(self, i: int) -> dict:
        j = i ^ 1 if (i ^ 1) < len(self.data) else i - 1  # 0 and 1 swap answers, 2 and 3, ...; an odd last one
        return partner_answer(self.data[j] if j >= 0 else None)  # takes the one before (a lone example: none)


def partner_answer(partner: dict | None) -> dict:
    """An example's fixed partner's last answer (and its stop token), as its partner_ids / partner_labels; empty
    without a partner (a mismatched pair with no trained token, left out of the reference point)."""
    from trainer.data.collators import last_trained_span

    if partner is None:
        return {"partner_ids": [], "partner_labels": []}
    start, end = last_trained_span(partner["labels"])
    return {"partner_ids": partner["input_ids"][start:end], "partner_labels": partner["labels"][start:end]}


def neighbour_partners(examples):
    """Items' partners over a stream: its examples in twos, each carrying the other's answer."""
    examples = iter(examples)
    for first in examples:
        second = next(examples, None)
        yield {**first, **partner_answer(second)}
        if second is not None:
            yield {**second, **partner_answer(first)}


def pack_dataset(data, cutoff_len: int) -> tuple[Items, float]:
    """Tokenized examples (input_ids, labels, length) -> packed rows of at most cutoff_len tokens, as a plan.
    An example of several sequences (a preference pair: each sequence within cutoff_len) packs into rows of that
    many cutoff_lens, so every example fits a row."""
    from trainer.data.processing import column_values, row_capacity

    lengths = column_values(data, "length")
    capacity = row_capacity(cutoff_len, "segments" in data.column_names)
    bins = best_fit_bins(lengths, capacity)
    used = sum(lengths)
    efficiency = used / (len(bins) * capacity) if bins else 0.0
    logger.info("Packed %d examples into %d rows of %d tokens: packing efficiency %.1f%% (real tokens / capacity).",
                len(lengths), len(bins), capacity, 100 * efficiency)
    return Items(data, bins), efficiency


def unpacked_dataset(data, partners: bool = False) -> Items:
    """One example an item (partners: each with its fixed partner's answer, the data kind's `partners`)."""
    return Items(data, partners=partners)

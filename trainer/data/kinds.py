"""Data kinds: what processing builds from a stage's datasets. A stage names its kind (Stage.data_kind); the kinds
every data folder knows are registered in data/processing.py, and a stage whose data is its own registers its kind
beside it (stages/kto_data.py). Processing, packing and streaming read what a kind says here, never a stage name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from trainer.registry import Registry


@dataclass(frozen=True)
class DataKind:
    name: str
    # (canonical examples, tokenizer, template, data_args) -> for each example, its pieces {input_ids, labels,
    # trained, _truncated, _no_labels, and the kind's own columns}
    encode: Callable
    # spec -> (raw row -> canonical example); None: the dataset's own formatting (alpaca, sharegpt, openai, text)
    convert: Callable | None = None
    formatting: str | None = None  # every dataset of this kind is read with this formatting (pretrain: text)
    documents: bool = False  # examples are pieces of documents: val_size splits whole documents
    segmented: bool = False  # an example is several sequences end to end (its `segments` column lists them)
    # each example also carries the answer of a partner fixed ahead, its neighbour in dataset (or stream) order (kto's
    # mismatched pairs): the pairs never depend on the shuffle or on how a step is split into micro-batches
    partners: bool = False
    # the kind's own columns besides input_ids and labels: name -> (type, a bad row's value); each one but `segments`
    # travels with its example to the collator (one value an example)
    columns: dict = field(default_factory=dict)
    # (spec, the file's columns) -> None, raising ConfigError before any row is converted; None: formats.check_rows
    check: Callable | None = None

    @property
    def carried(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c != "segments")


DATA_KINDS = Registry("data kind", "Known")

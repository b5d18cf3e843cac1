"""kto's own data: examples tagged desirable or not (the data kind "kto", registered here for data/ to tokenize), and
its collator, which lays each example beside its mismatched pair (KtoPairs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from trainer.data import formats
from trainer.data.collators import Collator, last_trained_span
from trainer.data.kinds import DATA_KINDS, DataKind
from trainer.data.processing import IGNORE_INDEX, labelled
from trainer.errors import ConfigError


def convert_kto(spec) -> Callable[[dict], dict]:
    """An sft row (alpaca, sharegpt or openai) whose last answer carries a desirable / undesirable tag (LLaMA-Factory's
    `columns.kto_tag`): the conversation as for sft, and `kto_tag`. A tag that is missing or not a boolean makes the
    row bad (counted and reported), never a guess."""
    base = formats.FORMATTERS[spec.formatting](spec)
    tag_col = spec.column("kto_tag", "kto_tag")

    def convert(row: dict) -> dict:
        out = base(row)
        tag = row.get(tag_col)
        out["kto_tag"] = bool(tag) if isinstance(tag, bool) else False
        if not out["_error"] and not isinstance(tag, bool):
            out["_error"] = f"kto_tag (column {tag_col!r}) is {'missing' if tag is None else repr(tag)}; it must be " \
                            "true or false"
        if not out["_error"] and (not out["messages"] or out["messages"][-1]["role"] != formats.ASSISTANT):
            out["_error"] = "the conversation does not end with an answer to tag"
        return out

    return convert


def check_kto_rows(spec, columns: list[str]) -> None:
    if spec.ranking:
        raise ConfigError(f"dataset {spec.name!r} is ranking (pairwise) data; kto trains on single examples "
                          "tagged with kto_tag (use dpo or orpo for pairs).")
    tag = spec.column("kto_tag", "kto_tag")
    if tag not in columns:
        raise ConfigError(f"dataset {spec.name!r} ({spec.path}): no kto_tag column ({tag!r}); the file has columns "
                          f"{[c for c in columns if c != '_row']}. Map \"kto_tag\" under columns in "
                          "dataset_info.json.")
    formats.check_rows(spec, columns)


def encode_kto(examples: list[dict], tokenizer, template, data_args) -> list[list[dict]]:
    """Tagged conversations -> one example each, labels on the last answer only (the tagged completion), and the
    tag (1 desirable, 0 undesirable)."""
    encoded = template.encode_batch(tokenizer, [(e["messages"], e["system"]) for e in examples],
                                    train_on_prompt=False, mask_history=True)
    return [[{**labelled(ids, trained, data_args.cutoff_len), "kto_tag": int(e["kto_tag"])}]
            for e, (ids, trained) in zip(examples, encoded)]


DATA_KINDS.register("kto")(DataKind("kto", encode_kto, convert=convert_kto, columns={"kto_tag": ("int8", 0)},
                                    check=check_kto_rows))


@dataclass
class KtoPairs:
    """kto's batches: each example followed by its mismatched pair, its own prompt with a neighbour's answer
    (examples 0 and 1 swap answers, 2 and 3, ...; an odd last one takes the one before), so that the pair shares the
    example's prompt like a preference pair. Pairing within neighbours keeps a batch split over processes pairing
    exactly as it does whole. Items may bring a partner's answer fixed ahead instead (Items' partners). `kl_valid`
    is 0 for a batch of one without one, whose only pair would be the example itself; `kto_tag` carries each
    example's tag."""
    collate: Collator
    cutoff_len: int | None = None

    def __call__(self, items: list[dict]) -> dict:
        spans = [last_trained_span(it["labels"]) for it in items]
        pairs = []
        for i, item in enumerate(items):
            if "partner_ids" in item:  # a partner fixed ahead (kto with precomputed reference log-probs)
                answer, answer_labels = item["partner_ids"], item["partner_labels"]
            else:
                j = i ^ 1 if (i ^ 1) < len(items) else max(i - 1, 0)
                answer = items[j]["input_ids"][spans[j][0]:spans[j][1]]
                answer_labels = items[j]["labels"][spans[j][0]:spans[j][1]]
            prompt = spans[i][0]
            ids = item["input_ids"][:prompt] + answer
            labels = [IGNORE_INDEX] * prompt + answer_labels
            if self.cutoff_len:
                ids, labels = ids[:self.cutoff_len], labels[:self.cutoff_len]
            pairs.append({"input_ids": item["input_ids"] + ids, "labels": item["labels"] + labels,
                          "lengths": [len(item["input_ids"]), len(ids)],
                          **({"ref_logps": item["ref_logps"]} if "ref_logps" in item else {})})
        batch = self.collate(pairs)
        batch["kto_tag"] = torch.tensor([it["kto_tag"][0] for it in items], dtype=torch.bool)
        fixed = "partner_ids" in items[0]
        batch["kl_valid"] = torch.full((len(items),), float(len(items) > 1 or fixed))
        return batch

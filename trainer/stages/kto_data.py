"""kto's own data: examples tagged desirable or not (the data kind "kto", registered here for data/ to tokenize), and
its collator, which batches the examples with their mismatched pairs (KtoPairs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from trainer.data import formats
from trainer.data.collators import Collator, last_trained_span
from trainer.data.kinds import DATA_KINDS, DataKind
from trainer.data.processing import IGNORE_INDEX, budgeted, llama_factory_budget, prompt_and_answer
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
    tag (1 desirable, 0 undesirable). As in LLaMA-Factory (infer_seqlen) and the pair stages, the prompt and the
    answer share cutoff_len: a long prompt is shortened and a short answer kept whole, so an example whose prompt
    alone exceeds cutoff_len still trains (and is counted as truncated) instead of being left with no answer."""
    encoded = template.encode_batch(tokenizer, [(e["messages"], e["system"], e.get("tools") or "") for e in examples],
                                    oneturn=True)
    out = []
    for e, (ids, trained) in zip(examples, encoded):
        prompt, answer, mask = prompt_and_answer(ids, np.asarray(trained, dtype=bool))
        keep_prompt, keep_answer = llama_factory_budget(len(prompt), len(answer), data_args.cutoff_len)
        ids, labels, count = budgeted(prompt, answer, mask, keep_prompt, keep_answer)
        out.append([{"input_ids": ids, "labels": labels, "trained": count, "kto_tag": int(e["kto_tag"]),
                     "_truncated": keep_prompt < len(prompt) or keep_answer < len(answer), "_no_labels": count == 0}])
    return out


DATA_KINDS.register("kto")(DataKind("kto", encode_kto, convert=convert_kto, columns={"kto_tag": ("int8", 0)},
                                    check=check_kto_rows, partners=True))


@dataclass
class KtoPairs:
    """kto's batches: the examples, and under "kl" their mismatched pairs as a batch of their own, each example's
    prompt with the answer of its partner fixed ahead (the data kind's partners: its neighbour in dataset order), so
    that the pairs never depend on the shuffle or on how a step is split. The mismatched pairs run in a pass of their
    own (kto.py: the step's, before its first loss; an eval batch's, beside it). A mismatched sequence shares
    cutoff_len between its prompt and the partner's answer as an example does (LLaMA-Factory's infer_seqlen, which
    LLaMA-Factory applies to its KL sequences too). `kto_tag` carries each example's tag; with precomputed reference
    log-probs each item's pair (example, mismatched) goes to the two batches."""
    collate: Collator
    cutoff_len: int | None = None

    def __call__(self, items: list[dict]) -> dict:
        examples, mismatched = [], []
        for item in items:
            if "partner_ids" not in item:
                raise ValueError("a kto item without its partner's answer: kto's data kind fixes partners ahead "
                                 "(Items(partners=True), or neighbour_partners over a stream)")
            ref = item.get("ref_logps")
            prompt = item["input_ids"][:last_trained_span(item["labels"])[0]]
            answer, trained = item["partner_ids"], np.asarray(item["partner_labels"]) != IGNORE_INDEX
            keep = llama_factory_budget(len(prompt), len(answer), self.cutoff_len) if self.cutoff_len else \
                (len(prompt), len(answer))
            ids, labels, _ = budgeted(prompt, answer, trained, *keep)
            examples.append({"input_ids": item["input_ids"], "labels": item["labels"], "lengths": item["lengths"],
                             **({"ref_logps": ref[:1]} if ref else {})})
            mismatched.append({"input_ids": ids, "labels": labels, "lengths": [len(ids)],
                               **({"ref_logps": ref[1:]} if ref else {})})
        batch = self.collate(examples)
        batch["kl"] = self.collate(mismatched)
        batch["kto_tag"] = torch.tensor([it["kto_tag"][0] for it in items], dtype=torch.bool)
        return batch

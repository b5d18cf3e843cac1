"""Batches for the model, and the segment layout every attention path reads.

A dataset item is one example, or a packed row of several (its `lengths` say where each starts). The
default layout is padding-free: the items of a micro-batch are laid end to end in ONE row, with no
padding at all, and the batch carries its segment layout, computed here once:
- position_ids restart at 0 for every example (RoPE sees each example from position 0);
- cu_seq_lens_q / cu_seq_lens_k (int32 cumulative example lengths) and max_length_q / max_length_k,
  which FlashAttention-2 varlen reads directly and zerotune_segments reads instead of inferring
  boundaries (transformers' FA2 only treats a batch as packed when it has one row or gets these);
- the first label of every example is ignored, so no example is trained to predict the next one's start.

`padding_free=False` gives the classic layout instead: one example a row, right-padded, with an
attention_mask (the reference the padding-free layout is tested against, and the benchmark's padded row).

Preference pairs can share their prompt (`share_prefix`): a pair's rejected sequence then holds only the
prompt's last token and its answer, attends to the prompt tokens at the start of the chosen sequence before it
(`shared_prefix`: how many, per segment) and continues its positions from there, so the prompt is computed once
a pair. The last prompt token is computed twice: its hidden state predicts each answer's first token. A group of
sequences answering one prompt (grpo's completions, consecutive items: `share_groups`) shares it the same way, the
2nd..Gth each reading it from the group's first, so the prompt is computed once a group (the attention path reads
a shared prefix from the nearest segment before that shares none).

Both carry `item_lengths` (tokens of each dataset item: per-item statistics are summed from it, and it is
the first key so that the Trainer reads the batch size from it) and the bookkeeping the engine pops before
the forward pass: the real (non-pad) token count and the sum of squared example lengths (attention FLOPs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from trainer.data.processing import IGNORE_INDEX

BOOKKEEPING = ("real_tokens", "attn_square")
# What the model's forward receives; every other key is for the stage (labels, item_lengths, ...).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k", "shared_prefix", "segment_lengths")


def segment_layout(lengths: list[int]) -> dict:
    """cu_seq_lens and max_length for examples of these lengths laid end to end (FlashAttention's varlen form)."""
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    longest = max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _sums_by_length(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values [1, T] -> the sum of each consecutive run of the given lengths (no host sync)."""
    lengths = lengths.to(values.device)
    index = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths,
                                    output_size=values.shape[1])
    return values.new_zeros(len(lengths)).index_add_(0, index, values[0])


def item_sums(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-token values [rows, T] -> one sum per dataset item of the batch."""
    if "attention_mask" in batch:  # padded: one item a row
        return values.sum(dim=1)
    return _sums_by_length(values, batch["item_lengths"])


def segment_sums(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-token values [1, T] of a padding-free batch -> one sum per sequence (segment), in order."""
    return _sums_by_length(values, batch["cu_seq_lens_q"].diff())


def shared_prompt(item: dict) -> dict:
    """A dataset item of pairs (its segments come as chosen, rejected, chosen, rejected, ...) with each rejected
    sequence cut down to the prompt's last token and its answer; `prefixes` says how many tokens at the start of
    the segment before it each segment also attends to. The shared part is the two sequences' common prefix up to
    the first trained token (the prompt: identical tokens, no labels), so nothing trained is ever shared."""
    ids, labels = item["input_ids"], item["labels"]
    out_ids, out_labels, lengths, prefixes = [], [], [], []
    start = 0
    segments = item["lengths"]
    for a, b in zip(segments[0::2], segments[1::2]):
        first, second = start, start + a
        shared = _untrained_common(ids[first:second], labels[first:second], ids[second:second + b],
                                   labels[second:second + b])
        keep = max(shared - 1, 0)  # the last shared token stays: its hidden state predicts the answer's first token
        out_ids += ids[first:second] + ids[second + keep:second + b]
        out_labels += labels[first:second] + labels[second + keep:second + b]
        lengths += [a, b - keep]
        prefixes += [0, keep]
        start += a + b
    return {**item, "input_ids": out_ids, "labels": out_labels, "lengths": lengths, "prefixes": prefixes}


def _untrained_common(a_ids, a_labels, b_ids, b_labels) -> int:
    """How many leading tokens two sequences have in common, none of them trained."""
    n, limit = 0, min(len(a_ids), len(b_ids))
    while n < limit and a_ids[n] == b_ids[n] and a_labels[n] == IGNORE_INDEX and b_labels[n] == IGNORE_INDEX:
        n += 1
    return n


def shared_group_prompts(items: list[dict]) -> list[dict]:
    """Items of one sequence each, consecutive ones answering the same prompt (a group): the first of a group whole,
    each other cut down to the prompt's last token and its answer, reading the rest of the prompt from the first
    (`prefixes`). As in shared_prompt, only untrained common tokens are shared, and a prompt of one token is not."""
    out, head = [], None
    for it in items:
        if len(it["lengths"]) != 1:
            raise ValueError("a group's items hold one sequence each")
        keep = 0
        if head is not None:
            keep = max(_untrained_common(head["input_ids"], head["labels"], it["input_ids"], it["labels"]) - 1, 0)
        if not keep:
            head = it
            out.append(it)
            continue
        out.append({**it, "input_ids": it["input_ids"][keep:], "labels": it["labels"][keep:],
                    "lengths": [it["lengths"][0] - keep], "prefixes": [keep]})
    return out


def last_trained_span(labels: list[int]) -> tuple[int, int]:
    """[start, end) of the last run of trained tokens: an example's last answer (and its stop token)."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def _prefixes(item: dict) -> list[int]:
    return item.get("prefixes") or [0] * len(item["lengths"])


@dataclass
class Collator:
    pad_token_id: int
    padding_free: bool = True
    share_prefix: bool = False  # pairs: the rejected sequence reuses the chosen one's prompt (shared_prompt)
    share_groups: bool = False  # consecutive items answering one prompt compute it once (shared_group_prompts)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if self.share_prefix:
            items = [shared_prompt(it) for it in items]
        if self.share_groups:
            if not self.padding_free:
                raise ValueError("a group's shared prompt needs the padding-free layout")
            items = shared_group_prompts(items)
        batch = self._flat(items) if self.padding_free else self._padded(items)
        if "ref_logps" in items[0]:  # precomputed reference log-probs, one per sequence, in segment order
            batch["ref_logps"] = torch.tensor([v for it in items for v in it["ref_logps"]], dtype=torch.float32)
        # Attention pairs: n^2 per causal sequence, plus 2 n k for a sequence that also sees k shared tokens.
        batch["attn_square"] = torch.tensor([sum(n * n + 2 * n * k for n, k in zip(it["lengths"], _prefixes(it)))
                                             for it in items], dtype=torch.float64)
        return batch

    @staticmethod
    def _labels(item: dict) -> list[int]:
        labels, start = list(item["labels"]), 0
        for n in item["lengths"]:
            labels[start] = IGNORE_INDEX
            start += n
        return labels

    def _flat(self, items: list[dict]) -> dict:
        ids, labels, positions, segments, prefixes = [], [], [], [], []
        for it in items:
            ids += it["input_ids"]
            labels += self._labels(it)
            for n, k in zip(it["lengths"], _prefixes(it)):
                positions += range(k, k + n)  # a sequence after a shared prompt continues its positions
            segments += it["lengths"]
            prefixes += _prefixes(it)
        batch = {"item_lengths": torch.tensor([len(it["input_ids"]) for it in items]),
                 "item_segments": torch.tensor([len(it["lengths"]) for it in items]),
                 "input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                 "position_ids": torch.tensor([positions])}
        batch.update(segment_layout(segments))
        # Host copies of what the device tensors hold, so no forward reads them back (a GPU stall each time): the
        # segment lengths for zerotune_segments, the labelled positions for the loss head (after the shift).
        batch["segment_lengths"] = tuple(segments)
        batch["target_count"] = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
        if self.share_prefix or self.share_groups:
            batch["shared_prefix"] = torch.tensor(prefixes, dtype=torch.int32)
        batch["real_tokens"] = torch.tensor([len(ids)])
        return batch

    def _padded(self, items: list[dict]) -> dict:
        if any(len(it["lengths"]) > 1 for it in items):
            raise ValueError("the padded layout holds one example a row; packed rows need the padding-free layout")
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        count = 0
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            row = self._labels(it)
            ids[b, :n] = torch.tensor(it["input_ids"])
            labels[b, :n] = torch.tensor(row)
            mask[b, :n] = 1
            count += sum(1 for label in row[1:] if label != IGNORE_INDEX)
        return {"item_lengths": mask.sum(dim=1), "input_ids": ids, "labels": labels, "attention_mask": mask,
                "real_tokens": mask.sum(dim=1), "target_count": count}

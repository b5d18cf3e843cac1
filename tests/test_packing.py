"""Packing keeps examples apart: a packed row's per-token losses equal each example run alone, and
eval_loss is the same packed or padded, with any eval batch size."""

import random

import pytest
import torch

from tiny import base_config, train_with
from trainer.data.collators import Collator
from trainer.data.packing import best_fit_bins, pack_dataset, unpacked_dataset
from trainer.data.processing import tokenized_dataset
from trainer.data.templates import get_template
from trainer.config import DataArguments


def test_best_fit_bins_places_every_example_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)] + [100, 1, 1]
    bins = best_fit_bins(lengths, 100)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    lower_bound = -(-sum(lengths) // 100)
    assert len(bins) <= lower_bound * 1.05 + 1  # best-fit decreasing is near-optimal on such data
    assert best_fit_bins([60, 50, 40], 100) == [[0, 2], [1]]
    with pytest.raises(ValueError):
        best_fit_bins([101], 100)


def _examples(model_dir, data_dir, tokenizer):
    args = DataArguments(dataset_dir=str(data_dir), template="chatml", cutoff_len=128)
    data, _ = tokenized_dataset(["alpaca"], args, "sft", tokenizer, get_template("chatml", tokenizer), True)
    return data


def _per_token_nll(model, wrapper, batch):
    nll, mask = wrapper.token_nll(model, batch)
    return nll, mask


def test_packed_row_loss_equals_each_example_alone(tiny_model_dir, data_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from trainer.model.wrapper import ModelWrapper

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    # Random weights make every position matter (a near-uniform tiny model would hide contamination).
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.eval()
    wrapper = ModelWrapper(model)
    data = _examples(tiny_model_dir, data_dir, tiny_tokenizer).select(range(8))
    packed, _ = pack_dataset(data, 400)
    collate_packed, collate_padded = Collator(0, packed=True), Collator(0, packed=False)
    alone_rows = unpacked_dataset(data)
    alone = {}
    for i in range(len(alone_rows)):
        batch = collate_padded([alone_rows[i]])
        batch.pop("real_tokens"), batch.pop("attn_square")
        nll, mask = _per_token_nll(model, wrapper, batch)
        alone[tuple(alone_rows[i]["input_ids"])] = nll[0][mask[0]]
    checked = 0
    for r in range(len(packed)):
        row = packed[r]
        batch = collate_packed([row])
        batch.pop("real_tokens"), batch.pop("attn_square")
        nll, mask = _per_token_nll(model, wrapper, batch)
        start = 0
        for n in row["lengths"]:
            ids = tuple(row["input_ids"][start:start + n])
            seg_nll, seg_mask = nll[0, start:start + n], mask[0, start:start + n]
            torch.testing.assert_close(seg_nll[seg_mask], alone[ids], rtol=1e-5, atol=1e-5)
            checked += 1
            start += n
        # The same row without position restarts lets examples see each other: the losses change.
        flat = {k: v for k, v in batch.items()}
        flat["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
        if len(row["lengths"]) > 1:
            leaky, _ = _per_token_nll(model, wrapper, flat)
            assert (leaky[mask] - nll[mask]).abs().max() > 1e-3
    assert checked == 8 and len(packed) < 8


def test_eval_loss_same_packed_or_padded_and_any_eval_batch(tiny_model_dir, data_dir, tmp_path):
    losses = {}
    for packing in (True, False):
        for batch in (1, 4):
            cfg = base_config(tiny_model_dir, data_dir, tmp_path / f"o{packing}{batch}", do_train=False,
                              do_eval=True, packing=packing, per_device_eval_batch_size=batch)
            results, _ = train_with(cfg)
            losses[(packing, batch)] = results["eval_loss"]
    values = list(losses.values())
    assert all(v == pytest.approx(values[0], rel=1e-5) for v in values), losses

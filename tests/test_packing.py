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
from trainer.data.options import DataArguments


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
    data, _ = tokenized_dataset(["alpaca"], args, "supervised", tokenizer, get_template("chatml", tokenizer), True)
    return data


def test_packed_rows_losses_equal_each_example_alone(tiny_model_dir, data_dir, tiny_tokenizer):
    """Per-token losses through the loss head: packed rows laid end to end vs each example padded on its own."""
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
    assert len(packed) < 8
    alone_rows = unpacked_dataset(data)
    alone = {}
    for i in range(len(alone_rows)):
        batch = Collator(0, padding_free=False)([alone_rows[i]])
        nll, mask = wrapper.token_nll(model, batch)
        alone[tuple(alone_rows[i]["input_ids"])] = nll[0][mask[0]]
    rows = [packed[r] for r in range(len(packed))]
    batch = Collator(0)(rows)
    nll, mask = wrapper.token_nll(model, batch)
    ids, start, checked = batch["input_ids"][0].tolist(), 0, 0
    for n in (n for row in rows for n in row["lengths"]):
        seg_nll, seg_mask = nll[0, start:start + n], mask[0, start:start + n]
        assert not seg_mask[-1]  # an example's last token never predicts the next example's first
        torch.testing.assert_close(seg_nll[seg_mask], alone[tuple(ids[start:start + n])], rtol=1e-5, atol=1e-5)
        start, checked = start + n, checked + 1
    assert checked == 8


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

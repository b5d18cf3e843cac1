"""Loss arithmetic: the chunked head equals plain cross-entropy, and the engine's normalisation makes
the loss independent of how a global batch is split into micro-batches."""

import pytest
import torch
import torch.nn.functional as F

from tiny import alpaca_rows, base_config, train_with, write_dataset_dir
from trainer.model.losses import IGNORE_INDEX, chunked_token_nll


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_nll_equals_plain_cross_entropy(chunk):
    torch.manual_seed(0)
    n, h, v = 50, 16, 97
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[::3] = IGNORE_INDEX
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="none")
    got = chunked_token_nll(hidden, weight, None, targets, chunk)
    torch.testing.assert_close(got.double(), ref)
    g_ref = torch.autograd.grad(ref.sum(), (hidden, weight))
    g_got = torch.autograd.grad(got.sum(), (hidden, weight))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a.double(), b)


@pytest.mark.parametrize("chunk", [3, 64])
@pytest.mark.parametrize("uniform", [True, False])
def test_chunked_nll_gradients_for_any_token_weights(chunk, uniform):
    """sft/pt weight every token alike (the head gradient is formed in the forward pass); the preference
    stages weight tokens unequally (the head gradient is recomputed): both equal autograd's on a bias head."""
    torch.manual_seed(1)
    n, h, v = 40, 8, 31
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[5:12] = IGNORE_INDEX
    w = torch.full((n,), 0.25, dtype=torch.float64) if uniform else torch.rand(n, dtype=torch.float64)
    ref = F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=IGNORE_INDEX, reduction="none")
    got = chunked_token_nll(hidden, weight, bias, targets, chunk)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (hidden, weight, bias)),
                    torch.autograd.grad((ref * w).sum(), (hidden, weight, bias))):
        torch.testing.assert_close(a, b)


def test_chunked_nll_frozen_head_and_no_labels():
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(9, 4)  # a frozen head (LoRA): only the hidden states get a gradient
    targets = torch.tensor([1, IGNORE_INDEX, 3, 8, IGNORE_INDEX, 0])
    got = chunked_token_nll(hidden, weight, None, targets, 2)
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), hidden)[0], torch.autograd.grad(ref.sum(), hidden)[0])
    none = chunked_token_nll(hidden, weight, None, torch.full((6,), IGNORE_INDEX), 2)
    assert none.tolist() == [0.0] * 6 and torch.autograd.grad(none.sum(), hidden)[0].abs().sum() == 0


def test_chunked_nll_under_bf16_autocast_matches_the_plain_head():
    """Same arithmetic as autocast gives the plain head: bf16 matmul, fp32 softmax."""
    torch.manual_seed(2)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(500, 32, requires_grad=True)
    targets = torch.randint(0, 500, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_token_nll(hidden, weight, None, targets, 16)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got.mean(), (hidden, weight)), torch.autograd.grad(ref.mean(), (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_nll_of_targets_far_below_the_max(bf16):
    """A target 100-300 nats below the row's max: its softmax underflows to 0 in fp32 (so -log p would be inf),
    yet the nll is logsumexp - logit exactly, and its gradient is softmax - onehot (-1 at the target)."""
    torch.manual_seed(3)
    n, h, v = 12, 8, 300
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h) * 0.1
    targets = torch.randint(0, v, (n,))
    weight[targets[:6]] = -hidden[:6] * torch.linspace(100, 300, 6).unsqueeze(1) / hidden[:6].pow(2).sum(1, True)
    weight.requires_grad_(True)
    hidden.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got = chunked_token_nll(hidden, weight, None, targets, 5)
        logits = F.linear(hidden, weight).double()  # what the head computes from (bf16 under autocast), exactly
    ref = F.cross_entropy(logits, targets, reduction="none")
    assert ref[:6].min() > 90 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)
    g_got = torch.autograd.grad(got.sum(), hidden)[0]
    g_ref = torch.autograd.grad(ref.sum(), hidden)[0]
    torch.testing.assert_close(g_got, g_ref, rtol=2e-2 if bf16 else 1e-5, atol=1e-2 if bf16 else 1e-5)


@pytest.fixture()
def many_rows_dir(tmp_path):
    return write_dataset_dir(tmp_path / "data48", alpaca_rows(48))


def _history(state, key):
    return [e[key] for e in state["log_history"] if key in e and "eval_loss" not in e]


@pytest.mark.parametrize("packing", [False, True])
def test_batch_1x8_equals_8x1(tiny_model_dir, many_rows_dir, tmp_path, packing):
    runs = {}
    for bs, ga in ((1, 8), (8, 1), (2, 4)):
        # forward_batch_size = bs: each batch really runs as one pass (auto would split it on CPU).
        cfg = base_config(tiny_model_dir, many_rows_dir, tmp_path / f"o{bs}x{ga}", finetuning_type="full",
                          per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=3,
                          packing=packing, cutoff_len=96, learning_rate=1e-2, forward_batch_size=bs)
        _, state = train_with(cfg)
        runs[(bs, ga)] = (_history(state, "loss"), _history(state, "grad_norm"))
    ref_loss, ref_norm = runs[(8, 1)]
    assert len(ref_loss) == 3
    for key, (loss, norm) in runs.items():
        assert loss == pytest.approx(ref_loss, rel=1e-4), key
        assert norm == pytest.approx(ref_norm, rel=1e-4), key
    assert ref_loss[2] < ref_loss[0]  # and it trains


@pytest.mark.parametrize("packing", [False, True])
def test_split_passes_train_exactly_like_the_whole_batch(tiny_model_dir, many_rows_dir, tmp_path, packing):
    """forward_batch_size splits each batch into passes with accumulated gradients: every step's loss and
    gradient norm, and the trained weights, must match running each batch of 8 as one pass."""
    from safetensors.torch import load_file

    from trainer.run import build_config

    runs = {}
    for rows in (8, 2, "auto"):
        cfg = base_config(tiny_model_dir, many_rows_dir, tmp_path / f"rows{rows}", finetuning_type="full",
                          per_device_train_batch_size=8, max_steps=3, packing=packing, cutoff_len=96,
                          learning_rate=1e-2, forward_batch_size=rows)
        t = build_config(cfg).training
        # auto on CPU: one packed row a pass; a padding-free batch is one row already
        assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == \
            {8: (8, 1), 2: (2, 4), "auto": (1, 8) if packing else (8, 1)}[rows]
        _, state = train_with(cfg)
        weights = load_file(str(tmp_path / f"rows{rows}" / "model.safetensors"))
        runs[rows] = (_history(state, "loss"), _history(state, "grad_norm"), weights)
    ref_loss, ref_norm, ref_weights = runs[8]
    assert len(ref_loss) == 3 and ref_loss[2] < ref_loss[0]
    for rows, (loss, norm, weights) in runs.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5), rows
        assert norm == pytest.approx(ref_norm, rel=1e-4), rows
        assert weights.keys() == ref_weights.keys()
        for name in ref_weights:
            # Adam divides each gradient by its own running scale, so an element whose gradient is ~0 moves by
            # float noise times the lr (1e-2): summation order alone (one pass vs several) shows there.
            torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=5e-5, msg=name)


def test_logged_loss_is_the_token_mean_of_the_global_batch(tiny_model_dir, many_rows_dir, tmp_path):
    """Step 1 trains on all 48 examples as one global batch; its logged loss must equal the untrained
    model's token-weighted eval loss on the same examples, whether the batch is one micro-batch or four."""
    eval_cfg = base_config(tiny_model_dir, many_rows_dir, tmp_path / "eval", do_train=False, do_eval=True,
                           eval_dataset="alpaca", cutoff_len=96)
    reference = train_with(eval_cfg)[0]["eval_loss"]
    for ga in (1, 4):
        cfg = base_config(tiny_model_dir, many_rows_dir, tmp_path / f"ga{ga}", finetuning_type="full",
                          cutoff_len=96, max_steps=1, packing=False, gradient_accumulation_steps=ga,
                          per_device_train_batch_size=48 // ga, forward_batch_size=48 // ga)
        _, state = train_with(cfg)
        assert _history(state, "loss")[0] == pytest.approx(reference, rel=1e-5), ga


def test_the_head_mode_lasts_one_call_and_is_refused_on_an_unwrapped_model(tiny_model_dir, packed_rows):
    """The loss mode rides on the head of the model being run, for that one forward only: afterwards the same model
    returns ordinary logits, and a model whose head was never given the modes says so instead of returning logits
    where token losses were asked for."""
    from transformers import AutoModelForCausalLM

    from trainer.data.collators import Collator, model_inputs
    from trainer.model.wrapper import MODE, ModelWrapper

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = Collator(0)([packed_rows[0]])
    plain = model(**model_inputs(batch), use_cache=False).logits
    wrapper = ModelWrapper(model)
    nll, mask = wrapper.token_nll(model, batch)
    assert nll.shape == mask.shape == batch["labels"].shape and bool(mask.any())
    assert MODE not in model.lm_head.__dict__
    torch.testing.assert_close(model(**model_inputs(batch), use_cache=False).logits, plain)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(RuntimeError, match="has no loss modes"):
        wrapper.token_nll(other, batch)

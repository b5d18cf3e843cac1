"""NEFTune per example: each token's noise is bounded by alpha / sqrt(L * d) with L its own sequence's length (the
paper's scale), not the packed row's width (transformers' hook); none outside training forwards; the Trainer's own
hook stays off."""

import math

import torch

from tiny import base_config, train_with
from trainer.data.collators import segment_layout
from trainer.model.neftune import token_lengths


def test_token_lengths_from_each_layout():
    flat = {"input_ids": torch.zeros(1, 8, dtype=torch.long), **segment_layout([3, 5])}
    assert token_lengths(flat).tolist() == [[3, 3, 3, 5, 5, 5, 5, 5]]
    shared = dict(flat, shared_prefix=torch.tensor([0, 2], dtype=torch.int32))  # the second continues a prompt of 2
    assert token_lengths(shared).tolist() == [[3, 3, 3, 7, 7, 7, 7, 7]]
    padded = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0, 0],
                                                                                                [1, 1, 1, 1]])}
    assert token_lengths(padded).tolist() == [[2, 2, 2, 2], [4, 4, 4, 4]]


def _noise_seen(model, wrapper, batch, train: bool, grad: bool) -> torch.Tensor:
    """The noise added to the input embeddings in one forward through the wrapper."""
    emb = model.get_input_embeddings()
    seen = {}
    handle = emb.register_forward_hook(lambda m, a, out: seen.setdefault("out", out.detach().clone()))
    model.train(train)
    with torch.set_grad_enabled(grad):
        wrapper.token_nll(model, batch)
    handle.remove()
    return seen["out"] - emb.weight.detach()[batch["input_ids"]]


def test_noise_is_bounded_by_each_examples_own_length(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from trainer.model.wrapper import ModelWrapper

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    wrapper = ModelWrapper(model)
    alpha, lengths = 5.0, [4, 60]
    wrapper.use_neftune(model, alpha)
    ids = torch.randint(20, 300, (1, sum(lengths)))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
             **segment_layout(lengths)}
    noise = _noise_seen(model, wrapper, batch, train=True, grad=True)
    d = noise.shape[-1]
    start = 0
    for n in lengths:
        bound = alpha / (n * d) ** 0.5
        part = noise[0, start:start + n].abs()
        assert part.max() <= bound * (1 + 1e-5) and part.max() > 0.9 * bound  # uniform in [-bound, bound]
        start += n
    row_width_bound = alpha / (sum(lengths) * d) ** 0.5  # transformers' hook: every token at this scale
    assert noise[0, :4].abs().max() > 3 * row_width_bound
    assert _noise_seen(model, wrapper, batch, train=False, grad=True).abs().max() == 0  # evaluation
    assert _noise_seen(model, wrapper, batch, train=True, grad=False).abs().max() == 0  # reference / rollouts


def test_a_run_with_neftune_trains_with_zerotunes_hook_only(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    import transformers.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' own NEFTune hook was activated")

    monkeypatch.setattr(transformers.trainer, "activate_neftune", refuse)
    _, plain = train_with(base_config(tiny_model_dir, data_dir, tmp_path / "a", max_steps=3))
    _, noisy = train_with(base_config(tiny_model_dir, data_dir, tmp_path / "b", max_steps=3, neftune_noise_alpha=5))
    losses = [[e["loss"] for e in s["log_history"] if "loss" in e] for s in (plain, noisy)]
    assert len(losses[1]) == 3 and all(math.isfinite(x) for x in losses[1])
    assert losses[0][0] != losses[1][0]  # the noise changed the first forward

"""Decoding with the LoRA delta merged (model/merged_lora.py) against PEFT's own three-matmul forward: the same
logits to float rounding, the same sampled and greedy tokens from the same seeds, and the model exactly as it was
afterwards (parameters bit for bit, each layer's own forward back)."""

import pytest
import torch


def _lora_model(tiny_model_dir, dropout: float = 0.0, fuse: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.model.lean_ops import fuse_lora_forward

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # sharper than the initial weights, so that a wrong weight changes the tokens
        for p in model.parameters():
            p.normal_(0, 0.5)
    # init_lora_weights=False: B is random too, so the delta is not zero and the merge has something to merge
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout,
                                             init_lora_weights=False))
    if fuse:
        fuse_lora_forward(model)
    return model.eval()


def test_merged_logits_match_peft_and_the_model_comes_back_exactly(tiny_model_dir):
    from peft.tuners.lora.layer import Linear

    from trainer.model.merged_lora import merged_for_decoding

    model = _lora_model(tiny_model_dir, fuse=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    own = {m: m.__dict__.get("forward") for m in model.modules() if type(m) is Linear}
    assert all(f is not None for f in own.values())  # lean_ops' fused forward, set on the instance
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with merged_for_decoding(model) as merged:
            assert merged == len(own)
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert (reference - inside).abs().max() < 1e-4 * reference.abs().max()
    assert not torch.equal(reference, inside) or merged == 0  # the merged path really ran (its rounding differs)
    assert torch.equal(after, reference)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(m.__dict__.get("forward") is f for m, f in own.items())


def test_layers_with_dropout_keep_peft_forward(tiny_model_dir):
    from trainer.model.merged_lora import merged_for_decoding

    model = _lora_model(tiny_model_dir, dropout=0.1)
    with merged_for_decoding(model) as merged:
        assert merged == 0


@pytest.mark.parametrize("sampled", [True, False])
def test_merged_decoding_gives_peft_tokens(tiny_model_dir, sampled):
    """The same tokens with and without the merge, each sample from its own seed (grpo's path) or greedy, prompts of
    several lengths left-padded together, shared prefill on."""
    from trainer.generation import GenerationSettings, generate

    model = _lora_model(tiny_model_dir)
    prompts, group = [[5, 6, 7, 8, 9, 10, 11, 12], [11], [12, 13, 14]], 4
    settings = GenerationSettings(max_new_tokens=12, do_sample=sampled, temperature=1.0, top_p=1.0, top_k=0)
    seeds = list(range(100, 100 + len(prompts) * group))
    runs = [generate(model, prompts, [1], 0, settings, group=group, seeds=seeds, merge_lora=merge)
            for merge in (True, False)]
    assert runs[0] == runs[1]
    assert sum(map(len, runs[0])) > len(runs[0])  # more than a stop token each: the comparison compares something
    if sampled:
        assert len({tuple(r) for r in runs[0][:group]}) > 1

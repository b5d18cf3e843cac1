"""zerotune's decode loop (generation._decode: a row leaves the batch at its stop token) against transformers' own
generate on the same prompts, and decoding's fp32 linears through oneDNN (model/cpu_linear.py) against F.linear."""

import logging

import pytest
import torch


def _sharp_model(tiny_model_dir, attention="sdpa"):
    from transformers import AutoModelForCausalLM

    from trainer.model import kernels

    kernels.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=kernels.SEGMENTS if attention == "segments" else attention)
    with torch.no_grad():  # sharper than the initial weights, so that a wrong key or position changes the tokens
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def _batch_sizes(model):
    """(the batch size of every decoder forward from now on, a list that fills as the model runs; the hook)."""
    sizes = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return sizes, hook


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [11], [12, 13, 14]]


@pytest.mark.parametrize("attention", ["sdpa", "segments"])
@pytest.mark.parametrize("mode", ["seeded", "seeded top-k top-p", "greedy"])
def test_the_loop_gives_generates_tokens_as_rows_stop(tiny_model_dir, attention, mode):
    """Left-padded prompts of 8, 1 and 3 tokens, 4 samples each, shared prefill on and off: the loop's tokens are
    transformers' generate's (with the same per-row seeds, or greedy) while its batch shrinks as rows stop. The stop
    token is picked from a run without it so that rows stop at different steps and some never do."""
    from trainer.generation import GenerationSettings, generate

    model = _sharp_model(tiny_model_dir, attention)
    group, width = 4, 12
    knobs = dict(temperature=0.7, top_p=0.9, top_k=20) if "top" in mode else dict(temperature=1.0, top_p=1.0, top_k=0)
    settings = GenerationSettings(max_new_tokens=width, do_sample=mode != "greedy", **knobs)
    seeds = [500 + i for i in range(len(PROMPTS) * group)] if mode != "greedy" else None
    free = generate(model, PROMPTS, [1], 0, settings, group=group, seeds=seeds, own_loop=False)
    # the token in most rows but not in all (the smallest at a tie): rows then stop at different steps
    counts = {}
    for row in free:
        for token in set(row[:-1]) - {1}:
            counts[token] = counts.get(token, 0) + 1
    stop = min((t for t in counts if counts[t] < len(free)), key=lambda t: (-counts[t], t))
    for shared in (True, False):
        reference = generate(model, PROMPTS, [1, stop], 0, settings, group=group, seeds=seeds, own_loop=False,
                             shared_prefill=shared)
        sizes, hook = _batch_sizes(model)
        ours = generate(model, PROMPTS, [1, stop], 0, settings, group=group, seeds=seeds, own_loop=True,
                        shared_prefill=shared)
        hook.remove()
        assert ours == reference
        assert len(set(map(len, ours))) > 1  # rows ended at different steps
        decode = sizes[1:]  # after the prefill of the prompts' first tokens
        assert decode[0] == len(PROMPTS) * group and decode[-1] < decode[0]  # the batch shrank as rows stopped
        assert decode == sorted(decode, reverse=True)


def test_the_loop_chunks_and_one_token_prompts(tiny_model_dir):
    """Chunks of whole groups (batch_size counts samples) and one-token prompts only (nothing to prefill): the loop
    gives generate's tokens."""
    from trainer.generation import GenerationSettings, generate

    model = _sharp_model(tiny_model_dir)
    settings = GenerationSettings(max_new_tokens=6, do_sample=False)
    for prompts, batch in ((PROMPTS, 8), ([[11], [3]], 16)):
        assert generate(model, prompts, [1], 0, settings, batch_size=batch, group=2, own_loop=True) == \
            generate(model, prompts, [1], 0, settings, batch_size=batch, group=2, own_loop=False)


def test_the_loop_refuses_what_it_does_not_do(tiny_model_dir):
    """own_loop=True with a streamer, beams, a repetition penalty or batch-wide sampling raises naming it; left to
    itself (None) generate takes transformers' path for those."""
    from transformers import TextStreamer

    from trainer.generation import GenerationSettings, generate

    model = _sharp_model(tiny_model_dir)
    cases = [({"streamer": TextStreamer(None)}, GenerationSettings(max_new_tokens=2), "a streamer"),
             ({}, GenerationSettings(max_new_tokens=2, do_sample=False, num_beams=2), "beam search"),
             ({}, GenerationSettings(max_new_tokens=2, do_sample=False, repetition_penalty=1.2), "repetition_penalty"),
             ({}, GenerationSettings(max_new_tokens=2), "one generator for the batch")]
    for extra, settings, named in cases:
        with pytest.raises(ValueError, match=named):
            generate(model, [[5, 6]], [1], 0, settings, own_loop=True, **extra)
    sizes, _ = _batch_sizes(model)
    torch.manual_seed(3)
    generate(model, [[5, 6]], [1], 0, GenerationSettings(max_new_tokens=3), group=2)
    assert sizes  # transformers' path ran it


# ---- fp32 linears through oneDNN while decoding ------------------------------------------------------------------------
@pytest.fixture()
def onednn(monkeypatch):
    """This process's choice forced to oneDNN (the suite must test the path whichever this CPU measures faster)."""
    from trainer.model import cpu_linear

    if not cpu_linear._available():
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setitem(cpu_linear._choice, "cpu", True)
    calls = []
    real = cpu_linear._onednn
    monkeypatch.setattr(cpu_linear, "_onednn", lambda x, w, b: calls.append(w.shape) or real(x, w, b))
    return calls


def test_decoding_linears_go_through_onednn_and_come_back(tiny_model_dir, onednn):
    """Every plain Linear (the output head with an instance forward of its own among them) computes through oneDNN
    inside the block: the logits agree with F.linear's to fp32 rounding; after it every module has its own forward
    back and the logits are F.linear's again, bit for bit."""
    from trainer.model.cpu_linear import decoding_linears

    model = _sharp_model(tiny_model_dir)
    head = model.get_output_embeddings()
    own = lambda hidden: torch.nn.Linear.forward(head, hidden)  # noqa: E731 (stands for wrapper.py's loss modes)
    head.forward = own
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with decoding_linears(model) as switched:
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert switched == len(linears) and len(onednn) == len(linears)
    torch.testing.assert_close(inside, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    assert torch.equal(after, reference)
    assert head.forward is own and all("forward" not in m.__dict__ for m in linears if m is not head)


def test_decoding_linears_leave_bf16_autocast_and_sharded_weights_alone(tiny_model_dir, onednn):
    """Under autocast, for a bf16 weight and for a ZeRO-3 partition nothing is switched: F.linear decides there."""
    from trainer.model.cpu_linear import decoding_linears, for_weight

    model = _sharp_model(tiny_model_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16), decoding_linears(model) as switched:
        assert switched == 0
    assert for_weight(torch.zeros(4, 4, dtype=torch.bfloat16)) is torch.nn.functional.linear
    partitioned = torch.nn.Parameter(torch.zeros(0))
    partitioned.ds_id = 3
    assert for_weight(partitioned) is torch.nn.functional.linear
    assert for_weight(torch.zeros(4, 4)) is not torch.nn.functional.linear


def test_the_choice_is_measured_once_and_said(monkeypatch, caplog):
    """The first fp32 decode of a process times both kernels and logs the choice with both timings; later calls
    reuse it."""
    from trainer.model import cpu_linear

    if not cpu_linear._available():
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(cpu_linear, "_choice", {})
    with caplog.at_level(logging.INFO, logger="trainer.model.cpu_linear"):
        first = cpu_linear.for_weight(torch.zeros(4, 4))
        second = cpu_linear.for_weight(torch.zeros(8, 8))
    said = [r.getMessage() for r in caplog.records if "Decoding on CPU" in r.getMessage()]
    assert len(said) == 1 and "oneDNN" in said[0] and "MKL" in said[0] and first is second

"""Stop tokens new to a model, and adapters that do not fit it.

A LoRA run trains the rows of a template's new stop token (the case of SmolLM2 given llama3's <|eot_id|>) and
saves them with the adapter, so plain transformers + peft stop where training taught; export and chat judge a
stop token trained when the adapters changed its rows at all; an adapter trained on another base model is named
with both bases instead of PEFT's size-mismatch traceback."""

import io
import logging
from pathlib import Path

import pytest
import torch
from tiny import base_config, build_model, train_with, write_dataset_dir

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "I am Nimbus."


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.glob("tokenizer*"):
        (dst / f.name).write_bytes(f.read_bytes())
    for f in src.glob("special_tokens_map.json"):
        (dst / f.name).write_bytes(f.read_bytes())


@pytest.fixture(scope="module")
def new_eot_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with <|eot_id|>'s embedding and head rows as resizing leaves a new token: the mean row. Its
    head is scaled up tenfold: the tiny random head's rows are too short for LoRA to make any token likely (its
    logits span about +-0.6), so nothing but the stop token would be learnt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("new-eot")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eot = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("<|eot_id|>")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight[eot] = emb.weight.mean(dim=0)
    model.save_pretrained(folder)
    _copy_tokenizer(tiny_model_dir, folder)
    return folder


@pytest.fixture(scope="module")
def identity_data(tmp_path_factory) -> Path:
    rows = [{"instruction": q, "input": "", "output": ANSWER}
            for q in ("Who are you?", "What is your name?", "Introduce yourself.", "Who am I talking to?")] * 4
    return write_dataset_dir(tmp_path_factory.mktemp("identity"), rows)


def _identity_run(model_dir: Path, data: Path, out: Path, **overrides) -> None:
    train_with(base_config(model_dir, data, out, template="llama3", max_steps=40, learning_rate=1e-2,
                           lora_rank=16, per_device_train_batch_size=8, **overrides))


def _greedy(model, tokenizer, question: str, steps: int = 12) -> list[int]:
    from trainer.data.templates import get_template

    prompt = torch.tensor([get_template("llama3", tokenizer).encode_prompt(
        tokenizer, [{"role": "user", "content": question}])])
    with torch.no_grad():  # no eos: the test, not generate, decides where the answer ends
        out = model.generate(prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, prompt.shape[1]:].tolist()


def test_lora_trains_a_new_stop_tokens_rows_and_plain_peft_stops_there(new_eot_model, identity_data, tmp_path,
                                                                         caplog):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "identity"
    with caplog.at_level("INFO", logger="trainer"):
        _identity_run(new_eot_model, identity_data, out)
    tokenizer = AutoTokenizer.from_pretrained(new_eot_model)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")

    # Plain transformers + peft, nothing of zerotune's: the adapter brings the trained rows along.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(new_eot_model, dtype=torch.float32),
                                      str(out)).eval()
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    ids = _greedy(model, tokenizer, "Who are you?")
    assert ids[:len(answer) + 1] == answer + [eot], tokenizer.decode(ids)
    assert PeftConfig.from_pretrained(out).trainable_token_indices == {"embed_tokens": [eot], "lm_head": [eot]}
    assert "Training the embed_tokens and lm_head rows of <|eot_id|> (new tokens" in caplog.text
    assert "STOP TOKEN NOT TRAINED" not in caplog.text
    assert "Loss: chunked linear cross-entropy" in caplog.text  # the row-trained head keeps the chunked loss

@pytest.fixture(scope="module")
def frozen_rows_adapter(new_eot_model, identity_data, tmp_path_factory):
    """A LoRA run with train_new_token_rows: false (and its log): <|eot_id|>'s rows stay as they were."""
    out = tmp_path_factory.mktemp("frozen-rows") / "adapter"
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("trainer").addHandler(handler)
    try:
        train_with(base_config(new_eot_model, identity_data, out, template="llama3", max_steps=1,
                               train_new_token_rows=False))
    finally:
        logging.getLogger("trainer").removeHandler(handler)
    return out, "\n".join(r.getMessage() for r in records)


def test_train_new_token_rows_false_leaves_them_frozen_and_warns(frozen_rows_adapter):
    from peft import PeftConfig

    out, log = frozen_rows_adapter
    assert "Training the embed_tokens" not in log
    assert "STOP TOKEN NOT TRAINED" in log and "<|eot_id|>" in log
    assert PeftConfig.from_pretrained(out).trainable_token_indices is None


def _inference_config(model_dir, adapter=None, **keys):
    from trainer.run import load_inference_config

    overrides = [f"model_name_or_path={model_dir}", "template=llama3", "do_sample=false", "max_new_tokens=4",
                 *(f"{k}={v}" for k, v in keys.items())]
    return load_inference_config(None, overrides + ([f"adapter_name_or_path={adapter}"] if adapter else []))


def test_export_takes_a_stop_token_the_adapters_changed_however_little(new_eot_model, identity_data, tmp_path):
    """Following the old refusal's advice (LoRA with additional_target: embed_tokens,lm_head, 3 steps at lr 1e-4)
    moves the rows a little: the row still looks like the mean row, but it changed, so it trained."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from trainer import inference
    from trainer.model.adapters import untrained_token_rows

    out = tmp_path / "little"
    train_with(base_config(new_eot_model, identity_data, out, template="llama3", max_steps=3, learning_rate=1e-4,
                           additional_target="embed_tokens,lm_head"))
    eot = AutoTokenizer.from_pretrained(new_eot_model).convert_tokens_to_ids("<|eot_id|>")
    export_dir = tmp_path / "export"
    inference.export(_inference_config(new_eot_model, out, export_dir=export_dir))
    weights = load_file(export_dir / "model.safetensors")
    base = load_file(Path(new_eot_model) / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"][eot], base["lm_head.weight"][eot])
    from transformers import AutoModelForCausalLM

    assert untrained_token_rows(AutoModelForCausalLM.from_pretrained(export_dir), [eot]) == [eot]  # still looks so


def test_export_refuses_rows_no_adapter_changed_unless_told_and_chat_warns(new_eot_model, frozen_rows_adapter,
                                                                          tmp_path, caplog):
    from trainer import inference
    from trainer.errors import ConfigError

    adapter, _ = frozen_rows_adapter
    with pytest.raises(ConfigError, match=r"stops at <\|eot_id\|>, whose embedding rows in .* look never trained "
                                          r"\(new tokens\) and are unchanged by the adapters.*"
                                          r"export_untrained_stop_tokens: true exports anyway"):
        inference.export(_inference_config(new_eot_model, adapter, export_dir=tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    with caplog.at_level("WARNING", logger="trainer"):
        inference.export(_inference_config(new_eot_model, adapter, export_dir=tmp_path / "anyway",
                                           export_untrained_stop_tokens="true"))
    assert (tmp_path / "anyway" / "model.safetensors").is_file()
    assert "STOP TOKEN NOT TRAINED" in caplog.text and "<|eot_id|>" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer"):
        inference.chat(_inference_config(new_eot_model, adapter), message="Who are you?", stdout=io.StringIO())
    assert "STOP TOKEN NOT TRAINED" in caplog.text and "unchanged by the adapters" in caplog.text


def test_the_row_trained_head_computes_the_loss_the_full_logits_give(new_eot_model, identity_data):
    """The chunked loss through the row-trained head: the same loss and the same gradients (for the trained rows
    too) as full logits through PEFT's own forward, with the adapters on and off."""
    from transformers import AutoModelForCausalLM

    from trainer.model.adapters import WatchedTokens, apply_lora
    from trainer.model.options import FinetuningArguments
    from trainer.model.wrapper import ModelWrapper
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(new_eot_model)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    model = AutoModelForCausalLM.from_pretrained(new_eot_model, dtype=torch.float32)
    model = apply_lora(model, FinetuningArguments(lora_rank=4, lora_alpha=8), [], True, WatchedTokens(tokenizer, [eot]))
    torch.manual_seed(0)
    with torch.no_grad():  # move the trained rows and the adapters off their starting point
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.tensor([[5, 9, eot, 17, eot, 3, 8]])
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(7)[None]}
    trained = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(wrapper):
        nll, mask = wrapper.token_nll(model, batch)
        loss = nll[mask].sum()
        return loss.detach(), torch.autograd.grad(loss, trained)

    full = ModelWrapper(model, chunked=False)
    expected = loss_and_grads(full)
    chunked = ModelWrapper(model, chunk_size=2)
    assert chunked.chunked
    got = loss_and_grads(chunked)
    torch.testing.assert_close(got[0], expected[0])
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(chunked.token_nll(model, batch)[0], full.token_nll(model, batch)[0])

    from trainer.engine.metrics import flops_per_token

    # MFU counts the head once, as for plain LoRA: the row-trained head's merged weight is no parameter.
    plain = apply_lora(AutoModelForCausalLM.from_pretrained(new_eot_model), FinetuningArguments(lora_rank=4,
                       lora_alpha=8), [], True)
    (linear, _, head), (plain_linear, _, plain_head) = flops_per_token(model), flops_per_token(plain)
    assert head == plain_head and linear - plain_linear == 6 * 32  # + the trained head row (32 wide)


@pytest.fixture(scope="module")
def other_base_adapter(tiny_model_dir, tmp_path_factory):
    """(a model of another hidden size, a LoRA adapter trained on the tiny model): they do not fit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("other-base")
    wider = root / "wider"
    build_model(wider, len(AutoTokenizer.from_pretrained(tiny_model_dir)), hidden=48)
    _copy_tokenizer(tiny_model_dir, wider)
    adapter = root / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(adapter)
    return wider, adapter


def test_an_adapter_of_another_base_names_both_bases(tiny_model_dir, other_base_adapter, data_dir, tmp_path):
    from trainer import inference
    from trainer.errors import ConfigError

    wider, adapter = other_base_adapter
    said = (rf"adapter_name_or_path '{adapter}' was trained on '{tiny_model_dir}', and its weights do not fit the "
            rf"model it is applied to, '{wider}' \(model_name_or_path\): size mismatch for .*Use the base model")
    with pytest.raises(ConfigError, match=said):  # chat and export load through the same merge
        inference.chat(_inference_config(wider, adapter), message="hi", stdout=io.StringIO())
    with pytest.raises(ConfigError, match=said):
        inference.export(_inference_config(wider, adapter, export_dir=tmp_path / "export"))
    with pytest.raises(ConfigError, match=said):  # training it further
        train_with(base_config(wider, data_dir, tmp_path / "train", max_steps=1, adapter_name_or_path=str(adapter)))
    with pytest.raises(ConfigError, match=said):  # merged under another adapter (a comma list)
        train_with(base_config(wider, data_dir, tmp_path / "merge", max_steps=1,
                               adapter_name_or_path=f"{adapter},{adapter}"))

"""QLoRA (quantization_bit) on a tiny Llama on the CPU, through bitsandbytes' own CPU backend: the base Linear layers
are bitsandbytes 4-bit modules computing what bitsandbytes' own dequantization says, the LoRA weights train and the
4-bit weights stay as they were; the loss falls on an obvious pattern through the CLI; dpo (its reference the quantized
base with the adapter off), rm, kto and ppo run; resume gives the next losses exactly; ZeRO-3 and FSDP2 shard the 4-bit
weights and two processes match one; export merges into the 16-bit base, within the 4-bit rounding of the base as
measured; zerotune check counts the 4-bit weights at their bytes; what LLaMA-Factory refuses, and what it would quietly
do otherwise, is refused by name. The GPU test (ZeRO-3 with the 4-bit weights stored in bf16) runs where CUDA,
bitsandbytes and DeepSpeed are (benchmarks/gpu_check.sh)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import base_config, build_tokenizer, train_with, write_dataset_dir

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def qmodel_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama 64 wide: bitsandbytes quantizes in blocks of 64 weights along a row, so rows must be at least
    that long. Initialised at 0.1 rather than 0.02, so that LoRA under a frozen random head can reach low losses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-64")
    tok = build_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def pattern_dir(tmp_path) -> Path:
    """Every answer is the same ten words: an obvious pattern."""
    rows = [{"instruction": f"Item {i}: recite.", "input": "", "output": "one two three four five six seven eight "
             "nine ten"} for i in range(32)]
    return write_dataset_dir(tmp_path / "pattern", rows)


def _losses(state: dict) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def _policy(model_dir, **kw):
    """The training model as run() builds it, quantized: (model, config)."""
    from trainer.model.adapters import prepare_trainable
    from trainer.model.loading import load_model
    from trainer.run import build_config

    config = build_config(base_config(model_dir, model_dir, model_dir / "unused", quantization_bit=4,
                                      overwrite_output_dir=True, **kw))
    model = load_model(config.model, config.training, "lora")
    return prepare_trainable(model, config.finetuning, config.model, is_trainable=True), config


# ---- the base is bitsandbytes' 4-bit, LoRA trains over it ---------------------------------------------------------

@pytest.mark.parametrize("bf16,kind,double", [(False, "nf4", True), (True, "nf4", True), (False, "fp4", False)])
def test_the_base_linears_are_4bit_and_compute_what_bitsandbytes_dequantizes(qmodel_dir, bf16, kind, double, caplog):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from trainer.model.quantization import quantized_linears

    with caplog.at_level("INFO", logger="trainer"):
        model, _ = _policy(qmodel_dir, bf16=bf16, quantization_type=kind, double_quantization=double)
    dtype = torch.bfloat16 if bf16 else torch.float32
    layers = [(n, m) for n, m in model.named_modules() if n.endswith(PROJECTIONS)]
    assert len(layers) == 14
    for name, layer in layers:
        base = layer.base_layer
        assert isinstance(base, bnb.nn.Linear4bit), name
        state = base.weight.quant_state
        assert state.quant_type == kind and state.nested == double  # quantization_type, double_quantization
        # bnb_4bit_quant_storage = the compute dtype (what lets ZeRO-3 and FSDP shard the packed weights)
        assert base.weight.dtype == dtype and base.compute_dtype == dtype
        assert base.weight.numel() * base.weight.element_size() * 2 == base.in_features * base.out_features
    head = model.get_base_model().lm_head
    assert type(head) is torch.nn.Linear and head.weight.dtype == dtype  # transformers keeps the head in 16-bit
    # The layer computes x @ W.T for W as bitsandbytes' own dequantization gives it.
    base = layers[0][1].base_layer
    weight = dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    x = torch.randn(5, base.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(base(x).float(), (x.float() @ weight.T).to(dtype).float(), rtol=2e-2, atol=2e-2)
    found = quantized_linears(model)
    assert found[4][0] == 14 and found["unquantized"][0] == 1
    assert f"bitsandbytes: 14 of 15 Linear layers in 4-bit {kind.upper()}{', double quantization' * double}:" \
        in caplog.text
    assert "14 Linear4bit over a bitsandbytes base run PEFT's own forward" in caplog.text


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("owned", [True, False])
def test_a_quantized_load_releases_the_checkpoints_memory_map(qmodel_dir, tmp_path, monkeypatch, owned):
    """transformers leaves the weights it does not quantize (embeddings, norms, head) as views of the mapped
    safetensors file, which keeps every page quantization read resident: after zerotune's load no parameter lies in
    the mapping and the kernel lists no mapping of the file (the control, without the copy, shows both)."""
    import shutil

    from trainer.model import quantization
    from trainer.model.loading import load_causal_lm
    from trainer.model.options import ModelArguments

    folder = tmp_path / "ckpt"  # a file of its own: no other test's model maps it
    shutil.copytree(qmodel_dir, folder)
    if not owned:
        monkeypatch.setattr(quantization, "own_cpu_weights", lambda model: 0)
    # fp32 as saved: no conversion, so transformers hands over views of the file
    model = load_causal_lm(ModelArguments(model_name_or_path=str(folder), quantization_bit=4), dtype=torch.float32,
                           quantize=True)
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in
              Path("/proc/self/maps").read_text().splitlines() if str(folder / "model.safetensors") in line]
    inside = [n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in ranges)]
    if owned:
        assert ranges == [] and inside == []
    else:
        assert ranges and "model.embed_tokens.weight" in inside, (ranges, inside)


def test_lora_weights_train_and_the_4bit_weights_stay(qmodel_dir, data_dir):
    from trainer.data.collators import Collator
    from trainer.model.wrapper import ModelWrapper

    model, config = _policy(qmodel_dir, dataset_dir=str(data_dir))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # The packed 4-bit weights are compared as bytes: read as fp32 (their storage dtype here) some are NaN patterns.
    frozen = {n: p.detach().view(torch.uint8).clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    wrapper = ModelWrapper(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = [{"input_ids": list(range(5, 25)), "labels": list(range(5, 25)), "lengths": [20]} for _ in range(2)]
    batch = Collator(0)(rows)
    model.train()
    for _ in range(2):  # the second step moves A too (B starts at zero, so A's first gradient is zero)
        nll, mask = wrapper.token_nll(model, batch)
        (nll * mask).sum().div(mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])]
    assert len(changed) == len(trained)
    moved = [n for n, p in model.named_parameters()
             if not p.requires_grad and not torch.equal(p.detach().view(torch.uint8), frozen[n])]
    assert not moved, moved


def test_an_evaluation_does_not_cut_the_gradient_through_the_4bit_layers(qmodel_dir):
    """bitsandbytes 0.50 repacks a Linear4bit's CPU weights at its first eval-mode forward without gradient, for a
    kernel that has no backward: after an evaluation no gradient would reach the layers below. zerotune turns the
    repacking off in a model it trains: the input gradient after an evaluation is the one before it."""
    model, _ = _policy(qmodel_dir)
    ids = torch.arange(3, 19).unsqueeze(0)

    def input_grad():
        model.train()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, use_cache=False).logits.float().sum().backward()
        model.zero_grad()
        return embeds.grad

    before = input_grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    torch.testing.assert_close(input_grad(), before)


# ---- through the CLI: the loss falls; resume; dpo and the other stages -------------------------------------------

def test_the_loss_falls_on_an_obvious_pattern_through_the_cli(qmodel_dir, pattern_dir, tmp_path):
    import yaml

    out = tmp_path / "out"
    cfg = base_config(qmodel_dir, pattern_dir, out, quantization_bit=4, bf16=True, dataset="alpaca", cutoff_len=64,
                      per_device_train_batch_size=4, learning_rate=1e-2, max_steps=24, seed=0)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "trainer.cli", "train", str(tmp_path / "cfg.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bitsandbytes: 14 of 15 Linear layers in 4-bit NF4" in done.stderr
    losses = list(_losses(json.loads((out / "trainer_state.json").read_text())).values())
    assert len(losses) == 24 and losses[-1] < 0.3 * losses[0], losses  # measured: 6.65 -> 0.9
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(PROJECTIONS)


def test_resume_gives_the_next_losses_of_an_uninterrupted_run(qmodel_dir, data_dir, tmp_path):
    whole = tmp_path / "whole"
    common = dict(quantization_bit=4, bf16=True, max_steps=6, save_steps=3, learning_rate=5e-3)
    _, state = train_with(base_config(qmodel_dir, data_dir, whole, **common))
    expected = _losses(state)
    part = tmp_path / "part"
    train_with(base_config(qmodel_dir, data_dir, part, **{**common, "max_steps": 3}))
    _, resumed = train_with(base_config(qmodel_dir, data_dir, part, **common,
                                        resume_from_checkpoint=str(part / "checkpoint-3")))
    got = _losses(resumed)  # steps 1-3 come from the checkpoint's own trainer_state
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and expected[4] != expected[5]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), (step, got, expected)


def test_gradient_checkpointing_changes_nothing_on_a_quantized_base(qmodel_dir, data_dir, tmp_path):
    """Non-reentrant checkpointing recomputes the 4-bit layers in backward: the same losses, step for step."""
    runs = {}
    for checkpointing in (False, True):
        _, state = train_with(base_config(qmodel_dir, data_dir, tmp_path / str(checkpointing), quantization_bit=4,
                                          bf16=True, max_steps=3, learning_rate=1e-2,
                                          gradient_checkpointing=checkpointing))
        runs[checkpointing] = _losses(state)
    assert runs[True] == pytest.approx(runs[False], abs=1e-6) and runs[True][3] < runs[True][1]


def test_dpo_on_a_quantized_base_starts_at_its_reference_and_learns(qmodel_dir, pairs_dir, tmp_path):
    """The reference is the quantized base with the adapter off: at step 1 the policy is the reference (ln 2, zero
    rewards, as in the unquantized test_dpo), and an obvious preference then widens the margin."""
    _, state = train_with(base_config(qmodel_dir, pairs_dir, tmp_path / "dpo", stage="dpo", dataset="pairs",
                                      quantization_bit=4, bf16=True, max_steps=8, learning_rate=1e-2))
    logged = [e for e in state["log_history"] if "rewards/margins" in e]
    assert logged[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert logged[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert logged[-1]["rewards/margins"] > 0 and logged[-1]["loss"] < math.log(2)


@pytest.fixture()
def tagged_dir(tmp_path):
    folder = tmp_path / "tagged"
    folder.mkdir()
    rows = [{"instruction": f"Q{i}", "input": "", "output": "Yes." if i % 2 else "No.", "kto_tag": bool(i % 2)}
            for i in range(8)]
    (folder / "tagged.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"tagged": {
        "file_name": "tagged.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                "kto_tag": "kto_tag"}}}))
    return folder


def test_rm_kto_and_ppo_run_a_step_on_a_quantized_base(qmodel_dir, pairs_dir, tagged_dir, data_dir, tmp_path):
    (data_dir / "rewards.py").write_text("def length(prompts, responses):\n    return [len(r) / 10 for r in "
                                         "responses]\n")
    runs = {"rm": base_config(qmodel_dir, pairs_dir, tmp_path / "rm", stage="rm", dataset="pairs"),
            "kto": base_config(qmodel_dir, tagged_dir, tmp_path / "kto", stage="kto", dataset="tagged"),
            "ppo": base_config(qmodel_dir, data_dir, tmp_path / "ppo", stage="ppo", max_new_tokens=4,
                               reward_function=f"{data_dir}/rewards.py:length", per_device_train_batch_size=2,
                               num_generations=2)}
    for stage, cfg in runs.items():
        _, state = train_with({**cfg, "quantization_bit": 4, "max_steps": 1})
        losses = list(_losses(state).values())
        assert losses and all(math.isfinite(v) for v in losses), (stage, state["log_history"])


# ---- export: merged into the 16-bit base --------------------------------------------------------------------------

def test_export_merges_into_the_16bit_base_within_the_4bit_rounding(qmodel_dir, pattern_dir, tmp_path, caplog):
    """The adapter was trained on base(4-bit) + adapter. Export merges it into the 16-bit weights the 4-bit ones were
    made from, so the merged model differs from what was trained by exactly the base's 4-bit rounding: its logits
    must sit as close to base(4-bit) + adapter as the bare 16-bit base sits to the bare 4-bit base (measured here,
    not assumed), and they must equal base(16-bit) + adapter (PEFT's own unmerged forward) to float precision."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.inference import export
    from trainer.run import load_inference_config
    from trainer.model.loading import load_causal_lm
    from trainer.model.options import ModelArguments
    from trainer.model.quantization import prepare_for_training

    run = tmp_path / "run"
    train_with(base_config(qmodel_dir, pattern_dir, run, quantization_bit=4, max_steps=12, learning_rate=1e-2,
                           cutoff_len=64, per_device_train_batch_size=4))
    merged = tmp_path / "merged"
    cfg = tmp_path / "export.yaml"
    cfg.write_text(f"model_name_or_path: {qmodel_dir}\nadapter_name_or_path: {run}\ntemplate: chatml\n"
                   f"quantization_bit: 4\nexport_dir: {merged}\ninfer_dtype: float32\n")
    with caplog.at_level("INFO", logger="trainer"):
        export(load_inference_config(cfg))
    assert f"export merges {run} into the 16-bit weights of {qmodel_dir}, loaded unquantized" in caplog.text

    ids = torch.tensor([[5, 17, 42, 99, 123, 7, 250, 31, 64, 8]])

    def logits(model):
        model.train()  # dropout is 0; train mode keeps bitsandbytes on its exact CPU path (no inference repacking)
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.float()

    args = ModelArguments(model_name_or_path=str(qmodel_dir), quantization_bit=4)
    base4 = load_causal_lm(args, dtype=torch.float32, quantize=True)
    prepare_for_training(base4)
    base16 = AutoModelForCausalLM.from_pretrained(qmodel_dir, dtype=torch.float32)
    bare4, bare16 = logits(base4), logits(base16)
    rounding = (bare16 - bare4).abs().max().item()  # what 4-bit does to the bare base (measured: ~1.0)
    trained4 = logits(PeftModel.from_pretrained(base4, run))  # what training computed
    exported = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    assert rounding > 1e-3  # the comparison below means something: 4-bit does move the logits
    assert (exported - trained4).abs().max().item() < 1.5 * rounding  # measured: 1.10 against 1.02
    # The adapter is no rounding error: it moves the logits further (measured: 2.8 against 1.0), and export carries it.
    assert (trained4 - bare4).abs().max().item() > 2 * rounding
    torch.testing.assert_close(exported, logits(PeftModel.from_pretrained(base16, run)), rtol=1e-4, atol=1e-4)


# ---- zerotune check -----------------------------------------------------------------------------------------------

def test_check_counts_the_4bit_weights_at_their_bytes(qmodel_dir, data_dir, tmp_path):
    from trainer.model.quantization import quantized_linears
    from trainer.plan import describe, parameter_counts, quantized_weights, zero_memory
    from trainer.run import build_config

    def plan(**kw):
        cfg = build_config(base_config(qmodel_dir, data_dir, tmp_path / "o", **kw))
        return cfg, describe(cfg, with_data=False)

    config, text = plan(quantization_bit=4)
    layers, weights, stored, _ = quantized_weights(config)
    model, _ = _policy(qmodel_dir)
    loaded = quantized_linears(model)[4]
    assert (layers, weights) == (loaded[0], loaded[1]) == (14, 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128))
    # The plan's bytes a weight (packed halves, uint8 absmax a block of 64, fp32 absmax a 256 blocks) against what
    # the loaded layers hold; the rest is each layer's two small code tables (16 + 256 floats) and offset.
    assert stored == pytest.approx(weights * (0.5 + (1 + 4 / 256) / 64))
    assert loaded[2] - stored == pytest.approx(14 * (16 * 4 + 256 * 4 + 4), abs=14 * 8)
    assert f"quantized        4-bit NF4, double quantization (bitsandbytes): 14 Linear layers, {weights / 1e6:.1f}M" \
        in text
    # The memory plan holds the frozen base at those bytes (the 16-bit rest at 2 bytes a weight).
    total, trained, largest = parameter_counts(config)
    frozen = stored + 2 * (total - weights)
    gb = zero_memory(total, trained, largest, 1, 1, frozen_bytes=frozen)["ZeRO-0 (DDP)"][0]
    assert gb * 2**30 == pytest.approx(16 * trained + frozen)
    assert gb < zero_memory(total, trained, largest, 1, 1)["ZeRO-0 (DDP)"][0]
    _, eight = plan(quantization_bit=8)
    assert "quantized        8-bit (bitsandbytes)" in eight


def test_the_check_answers_whether_a_70b_qlora_fits_one_80gb_gpu(tmp_path, data_dir):
    """Llama-3-70B's shape, from its config alone: the 4-bit base with LoRA r16 holds ~40 GB of model states on one
    GPU (the 16-bit base alone would be 131 GB)."""
    from trainer.plan import describe
    from trainer.run import build_config

    folder = tmp_path / "llama-70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": False}))
    text = describe(build_config(base_config(folder, data_dir, tmp_path / "o", quantization_bit=4, lora_rank=16,
                                             bf16=True)), with_data=False)
    gb = float([line for line in text.splitlines() if "ZeRO-0" in line][0].split()[-2])
    assert 38 < gb < 42, text
    assert "560 Linear layers, 68451.0M weights in 32.89 GB (16-bit: 127.50 GB)" in text


@pytest.mark.parametrize("method,qc,per_weight", [
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, None),
    ("awq", {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
             "modules_to_not_convert": ["down_proj"]}, None),
    ("fp8", {"quant_method": "fp8", "activation_scheme": "dynamic"}, 2.0)])
def test_the_check_counts_a_checkpoint_quantized_ahead_at_its_own_bits(tmp_path, data_dir, method, qc, per_weight):
    """A GPTQ or AWQ checkpoint (config.json only: the plan reads no weights) counts its Linear layers at the bytes of
    the tensors those methods store, summed layer by layer from their shapes: qweight (bits x in x out, packed),
    scales (fp16, one a group of group_size inputs a row) and qzeros (bits each, packed); AWQ's
    modules_to_not_convert stay 16-bit. A method whose layout the plan does not know is counted at 16-bit and says so."""
    from trainer.plan import describe, parameter_counts, quantized_weights
    from trainer.run import build_config

    folder = tmp_path / method
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "tie_word_embeddings": False, "quantization_config": qc}))  # Llama-2-7B's shape, 8 KV heads
    config = build_config(base_config(folder, data_dir, tmp_path / "o", bf16=True))
    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
              "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}  # (in, out)
    skipped = set(qc.get("modules_to_not_convert", []))
    quantized = {n: s for n, s in shapes.items() if n not in skipped}
    if per_weight is None:
        bits, group = qc["bits"], qc["group_size"]
        expected = 32 * sum(i * o * bits / 8 + (i // group) * o * 2 + (i // group) * o * bits / 8
                            for i, o in quantized.values())
    else:
        expected = 32 * sum(i * o * per_weight for i, o in quantized.values())
    layers, weights, stored, kind = quantized_weights(config)
    assert (layers, weights) == (32 * len(quantized), 32 * sum(i * o for i, o in quantized.values()))
    assert stored == pytest.approx(expected)
    text = describe(config, with_data=False)
    assert f"{method} checkpoint, its quantization_config" in kind and f"quantized        {kind}" in text
    if per_weight is not None:
        assert "counted at 16-bit (an upper bound)" in kind
    # The memory plan's frozen base: those bytes, and the rest (embeddings, head, norms, skipped layers) at 2 a weight.
    total, trained, _ = parameter_counts(config)
    gb = float([line for line in text.splitlines() if "ZeRO-0" in line][0].split()[-2])
    assert gb == pytest.approx((16 * trained + expected + 2 * (total - weights)) / 2**30, abs=0.006)


# ---- refusals -----------------------------------------------------------------------------------------------------

def test_what_is_refused_is_named(qmodel_dir, data_dir, tmp_path):
    from trainer.errors import ConfigError
    from trainer.run import build_config

    base = base_config(qmodel_dir, data_dir, tmp_path / "o", quantization_bit=4)
    for kind in ("freeze", "full"):
        with pytest.raises(ConfigError, match=rf"quantization_bit: 4 with finetuning_type: {kind}: quantized models "
                                              "can only be trained with LoRA"):
            build_config({**base, "finetuning_type": kind})
    with pytest.raises(ConfigError, match=r"quantization_bit: 3: bitsandbytes quantizes to 4 or 8 bits"):
        build_config({**base, "quantization_bit": 3})
    with pytest.raises(ConfigError, match=r"quantization_method: gptq quantizes nothing as the model loads"):
        build_config({**base, "quantization_method": "gptq"})
    with pytest.raises(ConfigError, match=r"quantization_method: hqq is not supported"):
        build_config({**base, "quantization_method": "hqq"})
    with pytest.raises(ConfigError, match=r"quantization_type: 'int4' is not allowed; choose one of: nf4, fp4"):
        build_config({**base, "quantization_type": "int4"})
    with pytest.raises(ConfigError, match=r"a quantized model takes a single adapter"):
        build_config({**base, "adapter_name_or_path": "a,b"})
    with pytest.raises(ConfigError, match=r"quantization_device_map: auto places a quantized model for chat"):
        build_config({**base, "quantization_device_map": "auto"})
    with pytest.raises(ConfigError, match=r"quantization_bit: 8 cannot be sharded by ZeRO-3 or FSDP"):
        build_config({**base, "quantization_bit": 8, "fsdp": "full_shard"})
    # LLaMA-Factory's own example writes quantization_method: bitsandbytes (LF then loads unquantized): taken as bnb
    assert build_config({**base, "quantization_method": "bitsandbytes"}).model.quantization_bit == 4


def test_without_bitsandbytes_the_run_stops_before_anything_loads(qmodel_dir, data_dir, tmp_path, monkeypatch):
    from trainer.errors import ConfigError
    from trainer.model import options
    from trainer.run import build_config

    monkeypatch.setattr(options, "bitsandbytes_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"quantization_bit: 4 needs bitsandbytes: pip install 'zerotune\[qlora\]'"):
        build_config(base_config(qmodel_dir, data_dir, tmp_path / "o", quantization_bit=4))


def test_a_checkpoint_quantized_ahead_loads_as_saved_and_trains_lora_only(qmodel_dir, data_dir, tmp_path, caplog):
    """A bitsandbytes 4-bit checkpoint (its package installed) loads through transformers as it was saved, and LoRA
    trains over it; a full fine-tune of it is refused as LLaMA-Factory refuses it."""
    import shutil

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trainer.errors import ConfigError

    folder = tmp_path / "saved-4bit"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(qmodel_dir, quantization_config=config, device_map={"": "cpu"}) \
        .save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qmodel_dir / name, folder / name)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    with caplog.at_level("INFO", logger="trainer"):
        _, state = train_with(base_config(folder, data_dir, tmp_path / "lora", max_steps=2, learning_rate=1e-2))
    assert f"{folder} is a bitsandbytes-quantized checkpoint" in caplog.text
    assert "bitsandbytes: 14 of 15 Linear layers in 4-bit FP4:" in caplog.text  # as saved, not quantization_type's
    assert all(math.isfinite(v) for v in _losses(state).values())
    with pytest.raises(ConfigError, match=r"finetuning_type: full: .* is a quantized checkpoint, and quantized models "
                                          "can only be trained with LoRA"):
        train_with(base_config(folder, data_dir, tmp_path / "full", finetuning_type="full", max_steps=1))


def test_quantization_keys_without_quantization_bit_say_they_do_nothing(qmodel_dir, data_dir, tmp_path, caplog):
    from trainer.run import build_config

    with caplog.at_level("WARNING", logger="trainer"):
        config = build_config(base_config(qmodel_dir, data_dir, tmp_path / "o", quantization_type="fp4",
                                          double_quantization=False))
    assert config.model.quantization_bit is None
    assert "quantization_type, double_quantization set, but quantization_bit is not: nothing is quantized" in \
        caplog.text


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is not None, reason="gptqmodel is installed here")
def test_a_gptq_checkpoint_without_its_package_is_refused_before_loading(qmodel_dir, data_dir, tmp_path):
    """A checkpoint quantized ahead names its method in config.json; where its kernels are missing, the run stops
    naming the package before any weight is read (here there are no weights at all to read)."""
    from trainer.errors import ConfigError
    from trainer.model.loading import load_causal_lm
    from trainer.model.options import ModelArguments

    folder = tmp_path / "gptq"
    folder.mkdir()
    config = json.loads((qmodel_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"is quantized with gptq .* needs .*gptqmodel.* which is not installed: "
                                          r"pip install"):
        load_causal_lm(ModelArguments(model_name_or_path=str(folder)), dtype=torch.float32)


# ---- ZeRO-3 partitions the 4-bit weights (two CPU processes here; one GPU under gpu_check.sh) ---------------------

# Test-side instrumentation: at the first training step each rank writes down how its 4-bit weights are held.
RECORD_4BIT = """
import json, os, runpy, sys
from trainer.engine.trainer import ZeroTrainer
original = ZeroTrainer.training_step
def step(self, model, *args, **kwargs):
    if not getattr(self, "_recorded", False):
        self._recorded = True
        from torch.distributed.tensor import DTensor
        held = {n: {"type": type(p).__name__, "dtype": str(p.dtype), "dtensor": isinstance(p, DTensor),
                    "local": (p.to_local() if isinstance(p, DTensor) else p).numel(), "global": p.numel(),
                    "whole": getattr(p, "ds_numel", None), "partitioned": hasattr(p, "ds_id")}
                for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
        with open(os.path.join(self.args.output_dir, f"held-rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(held, f)
    return original(self, model, *args, **kwargs)
ZeroTrainer.training_step = step
sys.argv = ["launch/train.py"] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["zero3", "fsdp"])
def test_zero3_and_fsdp_shard_the_4bit_weights_and_two_processes_match_one(layout, qmodel_dir, data_dir, tmp_path):
    """bnb_4bit_quant_storage = the compute dtype makes the packed 4-bit weights floating-point tensors, which ZeRO-3
    partitions (each of two ranks holds none of them outside the forward) and FSDP2 shards (each holds half) like
    any weight, and the losses are those of one process without either."""
    import shutil

    import yaml

    common = dict(quantization_bit=4, max_steps=3, learning_rate=1e-2)
    _, one = train_with(base_config(qmodel_dir, data_dir, tmp_path / "one", per_device_train_batch_size=4, **common))
    out = tmp_path / "two"
    sharding = {"deepspeed": str(ROOT / "ds_configs/ds_z3_config.json")} if layout == "zero3" else \
        {"fsdp": "full_shard"}
    cfg = base_config(qmodel_dir, data_dir, out, per_device_train_batch_size=2, **common, **sharding)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "driver.py").write_text(RECORD_4BIT)
    port = str(29500 + os.getpid() % 1000 + (0 if layout == "zero3" else 1000))
    launcher = [shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed", "--num_gpus", "2"] \
        if layout == "zero3" else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    done = subprocess.run([*launcher, "--master_port", port, str(tmp_path / "driver.py"), "--config",
                           str(tmp_path / "two.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        held = json.loads((out / f"held-rank{rank}.json").read_text())
        assert len(held) == 14
        for name, p in held.items():
            assert p["dtype"] == "torch.float32", (name, p)
            if layout == "zero3":
                assert p["type"] == "Params4bit" and p["partitioned"] and p["local"] == 0 and p["whole"] > 0, p
            else:
                assert p["dtensor"] and p["local"] == p["global"] // 2, (name, p)
    two = _losses(json.loads((out / "trainer_state.json").read_text()))
    assert two == pytest.approx(_losses(one), rel=1e-5)


# ---- GPU: ZeRO-3 shards the 4-bit weights stored in bf16 ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_qlora_under_zero3_on_one_gpu(qmodel_dir, pattern_dir, tmp_path):
    """QLoRA under DeepSpeed ZeRO-3 on one GPU: the base Linear layers are bitsandbytes 4-bit, their packed weights
    stored in bf16 (bnb_4bit_quant_storage) and partitioned by ZeRO-3 like any bf16 weight (loaded without zero.Init,
    which transformers skips for a quantized load, and without a device_map, which it refuses under ZeRO-3:
    bitsandbytes places them on the current GPU); the loss falls on an obvious pattern, and the first steps follow
    the same run without DeepSpeed."""
    import yaml

    common = dict(quantization_bit=4, bf16=True, dataset="alpaca", cutoff_len=64, per_device_train_batch_size=4,
                  learning_rate=1e-2, max_steps=24, seed=0)
    _, plain = train_with(base_config(qmodel_dir, pattern_dir, tmp_path / "plain", **common))
    out = tmp_path / "z3"
    # The repo's ZeRO-3 config, as users run it. The driver records the weights before the first forward, when
    # every one is still partitioned (ZeRO-3 keeps a small "persistent" one whole only once it has gathered it).
    (tmp_path / "z3.yaml").write_text(yaml.safe_dump(base_config(
        qmodel_dir, pattern_dir, out, **common, deepspeed=str(ROOT / "ds_configs/ds_z3_config.json"))))
    (tmp_path / "driver.py").write_text(RECORD_4BIT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                           "--master_port", str(29500 + os.getpid() % 1000 + 2000), str(tmp_path / "driver.py"),
                           "--config", str(tmp_path / "z3.yaml")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bitsandbytes: 14 of 15 Linear layers in 4-bit NF4" in done.stderr
    held = json.loads((out / "held-rank0.json").read_text())
    assert len(held) == 14
    for name, p in held.items():
        assert p["type"] == "Params4bit" and p["dtype"] == "torch.bfloat16", (name, p)
        assert p["partitioned"] and p["local"] == 0 and p["whole"] > 0, (name, p)  # released outside the forward
    zero3 = list(_losses(json.loads((out / "trainer_state.json").read_text())).values())
    alone = list(_losses(plain).values())
    assert len(zero3) == 24 and zero3[-1] < 0.3 * zero3[0], zero3  # the CPU run of these settings: 6.65 -> 0.9
    assert zero3[:4] == pytest.approx(alone[:4], rel=2e-2), (zero3, alone)

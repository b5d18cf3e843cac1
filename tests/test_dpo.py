"""dpo and orpo end to end on pairs: pairwise data in LLaMA-Factory's ranking formats, log-probs of a padding-free
batch of pairs equal separate unpadded forwards, the first step of a LoRA run sits exactly at each loss's
policy = reference value, and training on an obvious preference raises rewards/accuracies."""

import functools
import importlib.metadata
import json
import math
import sys

import pytest
import torch

from tiny import base_config, run_example, train_with
from trainer.data.options import DataArguments
from trainer.data import processing
from trainer.data.collators import Collator
from trainer.data.packing import unpacked_dataset
from trainer.data.templates import get_template


def _dpo(model_dir, data_dir, out, **kw):
    return base_config(model_dir, data_dir, out, **{"stage": "dpo", "dataset": "pairs", **kw})


def test_pairs_tokenize_with_labels_on_each_answer_only(pairs_dir, tiny_tokenizer):
    template = get_template("chatml", tiny_tokenizer)
    args = DataArguments(dataset_dir=str(pairs_dir), cutoff_len=256)
    data, report = processing.tokenized_dataset(["pairs", "chat_pairs"], args, "pairwise", tiny_tokenizer, template,
                                                True)
    assert report.examples == 30 and report.bad == 0
    item = unpacked_dataset(data)[0]
    first, second = item["lengths"]
    chosen, rejected = item["input_ids"][:first], item["input_ids"][first:]
    # Each sequence is exactly what the template renders for prompt + that answer (the stop token ends it).
    messages = [{"role": "user", "content": "Question 0: do you agree?\ncontext"}]
    for ids, answer in ((chosen, "Yes, I agree."), (rejected, "No.")):
        full, trained = template.encode(tiny_tokenizer, messages + [{"role": "assistant", "content": answer}])
        last = max(i for i, t in enumerate(trained) if t) + 1
        assert ids == full[:last]
    labels = item["labels"]
    prompt = len(template.encode_prompt(tiny_tokenizer, messages))
    assert all(t == -100 for t in labels[:prompt]) and all(t == -100 for t in labels[first:first + prompt])
    assert labels[prompt:first] == chosen[prompt:] and labels[first + prompt:] == rejected[prompt:]


def test_pairs_truncate_the_llama_factory_way(pairs_dir, tiny_tokenizer):
    """Prompt and the longer answer share cutoff_len (LLaMA-Factory's infer_seqlen), so both sequences fit."""
    assert processing.llama_factory_budget(10, 100, 64) == (10, 54)  # a short prompt keeps all of it
    assert processing.llama_factory_budget(100, 10, 64) == (54, 10)  # a short answer keeps all of it
    assert processing.llama_factory_budget(100, 100, 64) == (32, 32)  # else both shrink in proportion
    template = get_template("chatml", tiny_tokenizer)
    args = DataArguments(dataset_dir=str(pairs_dir), cutoff_len=16)
    data, report = processing.tokenized_dataset(["pairs"], args, "pairwise", tiny_tokenizer, template, True)
    assert report.truncated > 0
    assert all(n <= 16 for segments in data["segments"] for n in segments)


def test_packed_pairs_logps_equal_separate_forwards(tiny_model_dir, pairs_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from trainer.model.wrapper import ModelWrapper
    from trainer.stages.preference import DPO

    template = get_template("chatml", tiny_tokenizer)
    args = DataArguments(dataset_dir=str(pairs_dir), cutoff_len=256)
    data, _ = processing.tokenized_dataset(["pairs"], args, "pairwise", tiny_tokenizer, template, True)
    items = [unpacked_dataset(data)[i] for i in range(6)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    wrapper = ModelWrapper(model)
    with torch.no_grad():
        packed, _ = DPO()._sequence_logps(wrapper, model, Collator(0)(items))
    torch.testing.assert_close(packed.double(), _alone_logps(model, items), rtol=1e-5, atol=1e-4)


def _synthetic_pairs(seed: int = 0):
    """Pairs of random tokens with prompts of 1, 2, 5 and 11 tokens (labels on the answers only): one pair an item,
    and one packed item of three pairs filled to exactly 64 tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731

    def pair(prompt_len, chosen_len, rejected_len):
        prompt = tokens(prompt_len)
        seqs = [prompt + tokens(chosen_len), prompt + tokens(rejected_len)]
        labels = [[-100] * prompt_len + s[prompt_len:] for s in seqs]
        return {"input_ids": seqs[0] + seqs[1], "labels": labels[0] + labels[1], "lengths": [len(x) for x in seqs]}

    singles = [pair(1, 4, 6), pair(2, 3, 1), pair(5, 7, 2), pair(11, 2, 9)]
    parts = [pair(9, 5, 4), pair(1, 8, 3), pair(6, 7, 5)]
    packed = {k: [x for p in parts for x in p[k]] for k in ("input_ids", "labels", "lengths")}
    assert len(packed["input_ids"]) == 64
    return singles + [packed]


def _alone_logps(model, items):
    """Each sequence's summed answer log-prob from a forward of that sequence alone (the independent reference)."""
    out = []
    with torch.no_grad():
        for item in items:
            start = 0
            for n in item["lengths"]:
                ids = torch.tensor([item["input_ids"][start:start + n]])
                labels = torch.tensor([item["labels"][start:start + n]])
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
                picked = torch.log_softmax(logits, -1).gather(1, labels[0, 1:].clamp(min=0)[:, None])[:, 0]
                out.append(float((picked * labels[0, 1:].ne(-100)).sum()))
                start += n
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("path", ["segments", "flash-attn 2.6.3", "flash-attn 2.0.9"])
def test_prefix_shared_pairs_logps_equal_separate_forwards(path, tiny_model_dir, monkeypatch):
    """The prompt computed once a pair (the rejected answer attending to the chosen sequence's prompt, positions
    continuing from it) gives every sequence the log-prob of a forward of that sequence alone, on zerotune_segments'
    SDPA and on its FlashAttention-2 varlen call. Without the shared-prefix layout the same row is wrong.

    The varlen call is a pure-torch stand-in installed as the `flash_attn` module of a given release, aligning the
    causal mask as that release does; kernels' own gate decides from the release whether to call it. Only what a
    CPU cannot have is faked: CUDA and a half-precision query (_flash_device) and flash-attn being installed. With
    2.6.3 the gate takes the varlen path (bottom-right alignment: right); with 2.0.9, whose top-left alignment gives
    a shared prompt's sequences wrong attention, it must fall back to SDPA per segment, or the log-probs differ."""
    from transformers import AutoModelForCausalLM

    import flash_standin
    from trainer.model import kernels
    from trainer.model.wrapper import ModelWrapper
    from trainer.stages.preference import DPO

    kernels.register()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=kernels.SEGMENTS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    if path.startswith("flash-attn"):
        release = path.split()[1]
        real_version = importlib.metadata.version
        monkeypatch.setitem(sys.modules, "flash_attn", flash_standin.flash_attn_module(release))
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: release if name == "flash-attn" else real_version(name))
        # kernels' own probe (import, release, a smoke call of the stand-in), run on the CPU: CUDA is what it lacks
        monkeypatch.setattr(kernels, "flash_status", functools.cache(lambda: kernels._probe_flash("cpu")))
        monkeypatch.setattr(kernels, "_flash_device", lambda query: True)
        assert kernels.flash_status().usable  # probed once (its smoke call), before the calls are counted
    flash_standin.CALLS.clear()
    items = _synthetic_pairs()
    expected = _alone_logps(model, items)
    batch = Collator(0, share_prefix=True)(items)
    full = sum(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape[1] == full - (0 + 1 + 4 + 10) - (8 + 0 + 5)  # each prompt but one token, once
    wrapper = ModelWrapper(model)
    with torch.no_grad():
        shared, _ = DPO()._sequence_logps(wrapper, model, batch)
        torch.testing.assert_close(shared.double(), expected, rtol=1e-5, atol=1e-5)
        if path == "flash-attn 2.6.3":
            call = flash_standin.CALLS[-1]
            assert not torch.equal(call["cu_seqlens_q"], call["cu_seqlens_k"])  # the shared keys went in
        else:
            assert not flash_standin.CALLS  # SDPA per segment
        del batch["shared_prefix"]
        wrong, _ = DPO()._sequence_logps(wrapper, model, batch)
    assert (wrong.double() - expected).abs().max() > 1e-2


def test_prefix_sharing_trains_exactly_like_separate_prompts(tiny_model_dir, pairs_dir, tmp_path, caplog):
    """pref_prefix_sharing (on by default) changes what is computed, not the result: the same losses and rewards
    as pref_prefix_sharing: false; an attention path that cannot read shared prompts turns it off and says so."""
    runs = {}
    for share in (True, False):
        _, state = train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / str(share), max_steps=4, learning_rate=1e-2,
                                   per_device_train_batch_size=4, pref_prefix_sharing=share))
        runs[share] = [v for e in state["log_history"] if "loss" in e for v in (e["loss"], e["rewards/margins"])]
    assert len(runs[True]) == 8 and runs[True][-1] > 0
    assert runs[True] == pytest.approx(runs[False], rel=1e-5, abs=1e-7)
    with caplog.at_level("INFO"):
        train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / "sdpa", max_steps=1, flash_attn="sdpa"))
    assert "pref_prefix_sharing: off with sdpa attention" in caplog.text


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_precomputed_reference_trains_like_the_reference_on_the_fly(kind, tiny_model_dir, pairs_dir, tmp_path, caplog):
    """precompute_ref_log_probs: one pass before training (LoRA: the base with adapters off; full: the starting
    weights themselves, no copy) gives the same losses and rewards as the reference forward every step; eval uses
    the precomputed eval pairs; a rerun reads the table back from the cache."""
    common = dict(finetuning_type=kind, max_steps=4, learning_rate=1e-2, per_device_train_batch_size=4, val_size=4,
                  eval_strategy="steps", eval_steps=2, overwrite_cache=False)
    runs = {}
    for precompute in (False, True):
        with caplog.at_level("INFO"):
            results, state = train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / str(precompute),
                                             precompute_ref_log_probs=precompute, **common))
        runs[precompute] = [v for e in state["log_history"] for k in ("loss", "rewards/margins", "eval_loss")
                            if k in e for v in [e[k]]] + [results["eval_rewards/margins"]]
    assert "Reference log-probs of 20 train pairs computed before training" in caplog.text
    assert "Reference log-probs of 4 eval pairs computed before training" in caplog.text
    assert len(runs[True]) == 11 and runs[True][-1] != 0
    assert runs[True] == pytest.approx(runs[False], rel=1e-5, abs=1e-6)
    caplog.clear()
    with caplog.at_level("INFO"):
        train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / "again", precompute_ref_log_probs=True, **common))
    assert "Reference log-probs of the train pairs read from" in caplog.text


def test_a_resumed_full_run_needs_its_cached_reference(tiny_model_dir, pairs_dir, tmp_path):
    """A full run's precomputed reference came from its starting weights; resumed, it reads the table back, and
    refuses to recompute it from weights that have moved."""
    import os
    import shutil

    from trainer.errors import ConfigError

    common = dict(finetuning_type="full", max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4,
                  save_steps=1, precompute_ref_log_probs=True)
    out = tmp_path / "run"
    train_with(_dpo(tiny_model_dir, pairs_dir, out, **common))
    _, state = train_with(_dpo(tiny_model_dir, pairs_dir, out, resume_from_checkpoint=str(out / "checkpoint-1"),
                               **common))
    assert state["global_step"] == 2
    shutil.rmtree(os.path.join(os.environ["ZEROTUNE_CACHE"], "tokenized", "reference"))
    with pytest.raises(ConfigError, match=r"weights are no longer the reference"):
        train_with(_dpo(tiny_model_dir, pairs_dir, out, resume_from_checkpoint=str(out / "checkpoint-1"), **common))


@pytest.mark.parametrize("loss,first", [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 1 / (4 * 0.1 ** 2))])
def test_first_lora_step_is_at_policy_equal_to_reference(loss, first, tiny_model_dir, pairs_dir, tmp_path):
    """LoRA's B starts at zero, so at step 1 the policy is the reference: the loss is the formula's value there,
    whatever the data (LLaMA-Factory logs 0.6931 for all three)."""
    _, state = train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / loss, pref_loss=loss, max_steps=1))
    logged = [e for e in state["log_history"] if "loss" in e][0]
    assert logged["loss"] == pytest.approx(first, rel=1e-4)
    assert logged["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and logged["rewards/margins"] == \
        pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("precompute", [False, True])
def test_continuing_an_sft_adapter_keeps_it_as_the_reference(precompute, tiny_model_dir, pairs_dir, data_dir,
                                                             tmp_path):
    """DPO's reference is the model training starts from (the paper's pi_SFT). A LoRA run that trains an sft
    adapter further (adapter_name_or_path) starts from base + adapter: a frozen copy of the adapter is the
    reference, so the first step sits at ln 2 with zero rewards, precomputed or not (switching every adapter off,
    as LLaMA-Factory does, would compare against the bare base)."""
    sft = tmp_path / "sft"
    train_with(base_config(tiny_model_dir, data_dir, sft, max_steps=3, learning_rate=1e-2))
    _, state = train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / "dpo", adapter_name_or_path=str(sft),
                               max_steps=1, precompute_ref_log_probs=precompute))
    logged = [e for e in state["log_history"] if "loss" in e][0]
    assert logged["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert logged["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_packed_pairs_count_pairs_not_rows(tiny_model_dir, pairs_dir, tmp_path):
    """packing: true puts several pairs in a row (rows of two cutoff_lens); the loss still averages over pairs, so
    the first LoRA step is exactly ln 2, and the logged statistics are per pair."""
    _, state = train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / "packed", packing=True, max_steps=1,
                               per_device_train_batch_size=2))
    logged = [e for e in state["log_history"] if "loss" in e][0]
    assert logged["loss"] == pytest.approx(math.log(2), rel=1e-4)


def test_ref_model_and_its_adapters(tiny_model_dir, pairs_dir, tmp_path):
    """ref_model (LLaMA-Factory's key) loads a separate frozen reference: the base model as ref_model trains exactly
    like the default LoRA reference (the base with adapters off); with ref_model_adapters a trained preference
    adapter is merged into it, so a fresh policy (the base) starts with negative margins against it."""
    common = dict(max_steps=3, learning_rate=2e-2, per_device_train_batch_size=4)
    _, default = train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / "default", **common))
    _, separate = train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / "separate", ref_model=str(tiny_model_dir),
                                  **common))
    losses = lambda s: [e["loss"] for e in s["log_history"] if "loss" in e]  # noqa: E731
    assert losses(separate) == pytest.approx(losses(default), rel=1e-5)
    trained = tmp_path / "trained"
    train_with(_dpo(tiny_model_dir, pairs_dir, trained, max_steps=12, learning_rate=2e-2,
                    per_device_train_batch_size=4))
    _, against = train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / "against", ref_model=str(tiny_model_dir),
                                 ref_model_adapters=str(trained), max_steps=1, per_device_train_batch_size=8))
    first = [e for e in against["log_history"] if "loss" in e][0]
    assert first["rewards/margins"] < 0 and first["loss"] > math.log(2)
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ref_model '/nowhere': no such folder"):
        train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / "bad", ref_model="/nowhere", max_steps=1))


def test_full_and_freeze_runs_keep_a_frozen_reference_copy(tiny_model_dir, pairs_dir, tmp_path):
    """At step 1 the policy is the reference copy: ln 2; then the policy moves away from the copy, which stays."""
    for kind in ("full", "freeze"):
        _, state = train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / kind, finetuning_type=kind, max_steps=6,
                                   learning_rate=1e-2, per_device_train_batch_size=4))
        logged = [e for e in state["log_history"] if "loss" in e]
        assert logged[0]["loss"] == pytest.approx(math.log(2), rel=1e-4), kind
        assert logged[-1]["loss"] < logged[0]["loss"] and logged[-1]["rewards/margins"] > 0, kind


@pytest.mark.parametrize("extra", [{"pref_loss": "sigmoid"}, {"pref_loss": "hinge"}, {"pref_loss": "ipo"},
                                   {"pref_loss": "simpo"}, {"stage": "orpo"}])
def test_training_on_an_obvious_preference_learns_it(extra, tiny_model_dir, pairs_dir, tmp_path):
    cfg = _dpo(tiny_model_dir, pairs_dir, tmp_path / "run", max_steps=20, learning_rate=2e-2, logging_steps=5,
               per_device_train_batch_size=4, val_size=4, eval_strategy="no", do_eval=True, **extra)
    results, state = train_with(cfg)
    logged = [e for e in state["log_history"] if "rewards/accuracies" in e and "eval_loss" not in e]
    assert logged[-1]["rewards/accuracies"] > 0.9 and logged[-1]["loss"] < logged[0]["loss"]
    assert results["eval_rewards/accuracies"] > 0.5 and results["eval_rewards/margins"] > 0
    if extra.get("stage") == "orpo":
        assert logged[-1]["log_odds_ratio"] > logged[0]["log_odds_ratio"] and "eval_nll_loss" in results
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "run"))


def test_dpo_keys_belong_to_the_preference_stages(tiny_model_dir, pairs_dir, data_dir, tmp_path):
    from trainer.run import build_config
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dpo_label_smoothing applies to pref_loss: sigmoid only"):
        build_config(_dpo(tiny_model_dir, pairs_dir, tmp_path / "o", pref_loss="hinge", dpo_label_smoothing=0.1))
    with pytest.raises(ConfigError, match=r"ref_model_adapters are merged into ref_model: set ref_model too"):
        train_with(_dpo(tiny_model_dir, pairs_dir, tmp_path / "o", max_steps=1, ref_model_adapters="x"))
    with pytest.raises(ConfigError, match=r"is not pairwise"):
        train_with(_dpo(tiny_model_dir, data_dir, tmp_path / "o2", max_steps=1, dataset="alpaca"))


def test_the_dpo_example_runs_through_the_cli(tiny_model_dir, tmp_path):
    """examples/dpo_lora.yaml and its demo pairs (examples/data/dpo_demo.json), on the tiny model for speed."""
    out = tmp_path / "dpo"
    proc = run_example("dpo_lora.yaml", tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "rewards/accuracies" in e]
    assert len(logged) == 3 and logged[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()

"""Export, predict and chat: the exported model computes what base + adapter computes, renders conversations with
its chat_template exactly as training encoded them and stops at the template's stop token; predict writes one
scored line per eval example with LLaMA-Factory's metric names; chat answers through the one generation function,
once (--message) or turn by turn over stdin."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tiny import base_config, train_with
from trainer.data.templates import get_template

ROOT = Path(__file__).resolve().parents[1]

def test_predict_refuses_train_on_prompt(tiny_model_dir, tmp_path):
    from tiny import write_dataset_dir
    from trainer.run import build_config
    from trainer.errors import ConfigError

    data = write_dataset_dir(tmp_path / "data", [{"instruction": "a", "input": "", "output": "b"}] * 4)
    with pytest.raises(ConfigError, match=r"do_predict reads each example's prompt.*train_on_prompt: true"):
        build_config(base_config(tiny_model_dir, data, tmp_path / "o", do_train=False, do_predict=True,
                                 predict_with_generate=True, eval_dataset="alpaca", train_on_prompt=True))


def _write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "trainer.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA run on one fixed short answer: the adapter teaches the tiny model to answer 'ok' and stop. (The tiny
    model's head is too small for LoRA alone to make any token likely: its head trains too, additional_target.)"""
    from tiny import write_dataset_dir

    root = tmp_path_factory.mktemp("ok")
    rows = [{"instruction": f"Say something {i}", "input": "", "output": "ok"} for i in range(16)]
    data = write_dataset_dir(root / "data", rows)
    out = root / "adapter"
    train_with(base_config(tiny_model_dir, data, out, max_steps=60, learning_rate=1e-2, lora_rank=16,
                           per_device_train_batch_size=8, lr_scheduler_type="constant", additional_target="lm_head"))
    return out


def test_export_merges_the_adapter_and_stops_where_training_taught(tiny_model_dir, trained_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir = tmp_path / "export"
    cfg = _write_yaml(tmp_path / "merge.yaml", {  # LLaMA-Factory's merge YAML
        "model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(trained_adapter), "template": "chatml",
        "finetuning_type": "lora", "export_dir": str(export_dir), "export_size": 5, "export_device": "cpu",
        "export_legacy_format": False, "infer_dtype": "float32"})
    proc = _cli("export", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (export_dir / "model.safetensors").is_file() and not (export_dir / "adapter_config.json").exists()

    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                          str(trained_adapter))
    ids = torch.tensor([tokenizer("<|im_start|>user\nSay something<|im_end|>\n")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
        with reference.disable_adapter():
            base = reference(ids).logits
        assert (reference(ids).logits - base).abs().max() > 1e-2  # the adapter changed the model

    template = get_template("chatml", tokenizer)
    messages = [{"role": "user", "content": "First 'quoted' \\ back"}, {"role": "assistant", "content": "One."},
                {"role": "user", "content": "Second\nline"}, {"role": "assistant", "content": "Two."}]
    hf = [{"role": "system", "content": "Be brief.\nAlways."}] + messages
    assert tokenizer.apply_chat_template(hf, tokenize=True, return_dict=False) == \
        template.encode(tokenizer, messages, "Be brief.\nAlways.")[0]
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop in exported.generation_config.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say something 3"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = exported.generate(**prompt, max_new_tokens=20, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    assert tokenizer.decode(out) == "ok<|im_end|>"  # plain transformers, the export's own generation_config
    exported.generation_config.eos_token_id = tokenizer.eos_token_id  # the tokenizer's eos alone would run on
    longer = exported.generate(**prompt, max_new_tokens=20, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert len(longer) > len(out)


def test_export_refuses_an_untrained_stop_token(tiny_model_dir, tmp_path):
    """A template whose stop token's rows are new (zeros) would export a model that never stops: refused."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    broken = tmp_path / "broken"
    stop = 2  # <|im_end|> in the tiny tokenizer
    with torch.no_grad():
        model.get_input_embeddings().weight[stop].zero_()
        model.get_output_embeddings().weight[stop].zero_()
    model.save_pretrained(broken)
    for f in Path(tiny_model_dir).glob("tokenizer*"):
        (broken / f.name).write_bytes(f.read_bytes())
    cfg = _write_yaml(tmp_path / "e.yaml", {"model_name_or_path": str(broken), "template": "chatml",
                                            "export_dir": str(tmp_path / "out")})
    proc = _cli("export", cfg)
    assert proc.returncode == 2 and "look never trained" in proc.stderr and "<|im_end|>" in proc.stderr


def test_predict_writes_generated_predictions_and_llama_factory_metrics(tiny_model_dir, trained_adapter, tmp_path):
    from tiny import write_dataset_dir

    rows = [{"instruction": f"Say something {i}", "input": "", "output": "ok" if i % 2 else "not ok"}
            for i in range(6)]
    data = write_dataset_dir(tmp_path / "data", rows)
    out = tmp_path / "predict"
    results, _ = train_with(base_config(tiny_model_dir, data, out, do_train=False, do_predict=True,
                                        predict_with_generate=True, adapter_name_or_path=str(trained_adapter),
                                        eval_dataset="alpaca", do_sample=False, max_new_tokens=8,
                                        per_device_eval_batch_size=4))
    lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(set(line) == {"prompt", "predict", "label"} for line in lines)
    assert [line["label"] for line in lines] == [r["output"] for r in rows]
    assert all(line["predict"] == "ok" for line in lines) and "Say something 5" in lines[5]["prompt"]
    saved = json.loads((out / "predict_results.json").read_text())
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"):
        assert key in saved and results[key] == saved[key]
    assert saved["predict_rouge-1"] == pytest.approx((3 * 100 + 3 * 66.6667) / 6, abs=1e-3)  # "ok" vs "not ok"


def test_metrics_against_hand_computed_values():
    from trainer.engine.similarity import mean_scores, scores

    same = scores("the cat sat", "the cat sat")
    assert same == pytest.approx({"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}, abs=1e-3)
    # Words the cat / sat vs the cat / ran: unigrams 2 of 3 each way, bigrams 1 of 2, longest common run 2 of 3.
    words = scores("the cat sat", "the cat ran")
    assert words["rouge-1"] == pytest.approx(66.6667, abs=1e-3)
    assert words["rouge-2"] == pytest.approx(50.0, abs=1e-3)
    assert words["rouge-l"] == pytest.approx(66.6667, abs=1e-3)
    # Characters abcd vs abce: 1- to 3-gram precisions 3/4, 2/3, 1/2; no 4-gram, which method 3 smooths to 1/2.
    chars = scores("abcd", "abce")
    assert chars["bleu-4"] == pytest.approx(100 * (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25, abs=1e-3)
    empty = scores("", "something")
    assert empty["rouge-1"] == 0.0 and empty["bleu-4"] == 0.0
    assert mean_scores(["abcd", "the cat sat"], ["abce", "the cat sat"])["bleu-4"] == \
        pytest.approx((chars["bleu-4"] + 100) / 2, abs=1e-3)


def test_chat_answers_once_and_turn_by_turn(tiny_model_dir, trained_adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer import inference
    from trainer.run import load_inference_config

    cfg_file = _write_yaml(tmp_path / "infer.yaml", {  # LLaMA-Factory's inference YAML
        "model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(trained_adapter), "template": "chatml",
        "infer_backend": "huggingface", "do_sample": False, "max_new_tokens": 8})
    proc = _cli("chat", cfg_file, "--message", "Say something 1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "ok\n"

    cfg = load_inference_config(cfg_file, ["max_new_tokens=6"])
    stdin = io.StringIO("Say something 2\n/clear\nhello\nand more\n/exit\n")
    stdout = io.StringIO()
    assert inference.chat(cfg, stdin=stdin, stdout=stdout) == 0
    text = stdout.getvalue()
    assert text.count("Assistant: ") == 3 and "History cleared." in text
    # The third answer saw the second turn: the same as plain transformers given the whole history.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(trained_adapter))
    template = get_template("chatml", tok)
    second = text.split("Assistant: ")[2].split("\n")[0].strip()
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": second},
               {"role": "user", "content": "and more"}]
    prompt = torch.tensor([template.encode_prompt(tok, history)])
    ids = model.generate(prompt, max_new_tokens=6, do_sample=False,
                         eos_token_id=template.stop_token_ids(tok))[0, prompt.shape[1]:]
    assert text.split("Assistant: ")[3].split("\n")[0].strip() == tok.decode(ids, skip_special_tokens=True).strip()


def test_other_backends_and_lf_inference_keys(tiny_model_dir, tmp_path):
    from trainer.run import load_inference_config
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"infer_backend: vllm is not supported.*zerotune export"):
        load_inference_config(None, [f"model_name_or_path={tiny_model_dir}", "infer_backend=vllm"])
    with pytest.raises(ConfigError, match=r"vllm_maxlen"):
        load_inference_config(None, [f"model_name_or_path={tiny_model_dir}", "vllm_maxlen=100"])
    with pytest.raises(ConfigError, match=r"Unknown key 'temprature'.*Did you mean: temperature"):
        load_inference_config(None, [f"model_name_or_path={tiny_model_dir}", "temprature=0.3"])
    # A training YAML works for chat: its training keys do not apply.
    cfg = load_inference_config(ROOT / "examples/sft_lora.yaml", [f"model_name_or_path={tiny_model_dir}"])
    assert cfg.template == "chatml" and cfg.generation.temperature == 0.95 and cfg.generation.top_p == 0.7


def test_a_reward_model_exports_with_its_value_head_in_the_chosen_dtype(tiny_model_dir, pairs_dir, tmp_path):
    from safetensors.torch import load_file

    rm = tmp_path / "rm"
    train_with(base_config(tiny_model_dir, pairs_dir, rm, stage="rm", dataset="pairs", max_steps=2))
    export_dir = tmp_path / "export"
    cfg = _write_yaml(tmp_path / "merge.yaml", {
        "model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(rm), "template": "chatml",
        "export_dir": str(export_dir), "export_dtype": "bfloat16"})
    proc = _cli("export", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = load_file(export_dir / "value_head.safetensors")
    torch.testing.assert_close(head, load_file(rm / "value_head.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in load_file(export_dir / "model.safetensors").values())

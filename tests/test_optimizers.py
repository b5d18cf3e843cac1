"""The optimizer methods (engine/optimizers.py), each against its own package: the parameters fall into the groups
the method defines (checked by name), and two steps of the optimizer ZeroTrainer builds equal two steps of the
package's optimizer built by hand on a copy of the same model with the same gradients. The refusals under DeepSpeed
and FSDP name their reason; a short run per method trains (the loss falls); `zerotune check` counts each one's
optimizer state."""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from tiny import base_config, train_with
from trainer.engine.optimizer_options import OptimizerArguments
from trainer.engine.optimizer_state import state_plan
from trainer.errors import ConfigError
from trainer.run import build_config

ROOT = Path(__file__).resolve().parents[1]
LR, DECAY = 1e-2, 0.1
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False))


def _lora(model, **extra):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **extra))


def _args(**kw) -> TrainingArguments:
    kw.setdefault("optim", "adamw_torch")
    return TrainingArguments(output_dir="/tmp/zerotune-unused", use_cpu=True, learning_rate=LR, weight_decay=DECAY,
                             report_to="none", **kw)


def _ours(model, args=None, **options):
    """The optimizer ZeroTrainer.create_optimizer builds (a Trainer shell: only what create_optimizer reads)."""
    from trainer.engine.trainer import ZeroTrainer

    trainer = ZeroTrainer.__new__(ZeroTrainer)
    trainer.model, trainer.args, trainer.optimizer, trainer.optimizer_cls_and_kwargs = model, args or _args(), None, None
    trainer.optimizer_options = OptimizerArguments(**options)
    return trainer.create_optimizer()


def _set_grads(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) if p.requires_grad else None


def _same_steps(mine, model, reference, ref_model, steps: int = 2) -> None:
    """`steps` steps of both on the same gradients leave both models bit-identical, and changed."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(steps):
        _set_grads(model, step)
        _set_grads(ref_model, step)
        mine.step()
        reference.step()
    for (name, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def _names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _hidden_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n}


def _decay_groups(named):
    """transformers' decay rule (norms and biases not decayed), written out by hand."""
    decayed = [p for n, p in named if "norm" not in n and "bias" not in n]
    kept = [p for n, p in named if "norm" in n or "bias" in n]
    return [{"params": decayed, "weight_decay": DECAY}, {"params": kept, "weight_decay": 0.0}]


# ---- Muon ---------------------------------------------------------------------------------------------------------
def test_muon_trains_the_hidden_matrices_and_adamw_the_rest():
    model = _model()
    ref = copy.deepcopy(model)
    mine = _ours(model, use_muon=True)
    assert _names(model, mine.muon.param_groups[0]["params"]) == _hidden_names(model) and len(_hidden_names(model)) == 14
    rest = {n for g in mine.rest.param_groups for n in _names(model, g["params"])}
    assert rest == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                    *(f"model.layers.{i}.{k}.weight" for i in (0, 1)
                      for k in ("input_layernorm", "post_attention_layernorm"))}
    named = dict(ref.named_parameters())
    muon = torch.optim.Muon([named[n] for n in sorted(_hidden_names(ref), key=list(named).index)], lr=LR,
                            weight_decay=DECAY, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(_decay_groups([(n, p) for n, p in ref.named_parameters()
                                             if n not in _hidden_names(ref)]), lr=LR)

    class Both:
        def step(self):
            muon.step()
            adamw.step()

    _same_steps(mine, model, Both(), ref)
    assert mine.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


def test_muon_state_saves_and_loads():
    model = _model()
    mine = _ours(model, use_muon=True)
    _set_grads(model, 0)
    mine.step()
    saved = copy.deepcopy(mine.state_dict())
    fresh = _ours(model, use_muon=True)
    fresh.load_state_dict(saved)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in mine.param_groups]
    assert len(fresh.param_groups) == len(mine.param_groups) and fresh.param_groups[0] is fresh.muon.param_groups[0]
    for p in mine.muon.param_groups[0]["params"]:
        assert torch.equal(fresh.muon.state[p]["momentum_buffer"], mine.muon.state[p]["momentum_buffer"])


def test_muon_with_lora_takes_the_lora_matrices():
    model = _lora(_model())
    mine = _ours(model, use_muon=True)
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert _names(model, mine.muon.param_groups[0]["params"]) == lora and mine.rest is None
    assert all(".lora_A." in n or ".lora_B." in n for n in lora) and len(lora) == 28


# ---- Adam-mini ----------------------------------------------------------------------------------------------------
def test_adam_mini_groups_by_head_row_and_tensor():
    from adam_mini import Adam_mini

    from trainer.engine.optimizers import adam_mini_block

    model = _model()
    ref = copy.deepcopy(model)
    mine = _ours(model, use_adam_mini=True)
    blocks = {g["name"]: adam_mini_block(mine, g["name"]) for g in mine.param_groups}
    by_head = {n for n, b in blocks.items() if "per head" in b}
    by_row = {n for n, b in blocks.items() if "per row" in b}
    per_tensor = {n for n, b in blocks.items() if "per tensor" in b}
    assert by_head == {f"model.layers.{i}.self_attn.{k}.weight" for i in (0, 1) for k in ("q_proj", "k_proj")}
    assert by_row == {"model.embed_tokens.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{k}.weight" for i in (0, 1)
        for k in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert per_tensor == {n for n, _ in model.named_parameters() if "norm" in n}
    reference = Adam_mini(named_parameters=ref.named_parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=DECAY, dim=32, n_heads=4, n_kv_heads=2, verbose=False)
    _same_steps(mine, model, reference, ref)


# ---- GaLore and APOLLO ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["galore", "apollo"])
def test_projected_methods_take_the_linear_weights(method):
    import galore_torch
    from apollo_torch import APOLLOAdamW

    model = _model()
    ref = copy.deepcopy(model)
    keys = {"galore": {"rank": 4, "update_proj_gap": 200, "scale": 2.0, "proj_type": "std"},
            "apollo": {"rank": 4, "proj": "random", "proj_type": "std", "update_proj_gap": 200, "scale": 32.0,
                       "scale_type": "channel"}}[method]
    mine = _ours(model, **{f"use_{method}": True, f"{method}_rank": 4})
    projected = [g for g in mine.param_groups if "rank" in g]
    assert len(projected) == 1 and projected[0]["rank"] == 4
    assert _names(model, projected[0]["params"]) == {f"model.layers.{i}.{s}.{k}.weight" for i in (0, 1)
                                                     for s, ks in (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:]))
                                                     for k in ks}
    named = list(ref.named_parameters())
    hidden = _hidden_names(ref)
    groups = _decay_groups([(n, p) for n, p in named if n not in hidden]) + [
        {"params": [p for n, p in named if n in hidden], "weight_decay": DECAY, **keys}]
    cls = galore_torch.GaLoreAdamW if method == "galore" else APOLLOAdamW
    extra = {"no_deprecation_warning": True} if method == "galore" else {}
    _same_steps(mine, model, cls(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, **extra), ref)


def test_galore_follows_optim():
    model = _model(hidden=64)
    assert type(_ours(model, _args(optim="adamw_bnb_8bit"), use_galore=True)).__name__ == "AdamW8bit"
    assert type(_ours(_model(), _args(optim="adafactor"), use_galore=True)).__name__ == "Adafactor"


# ---- BAdam --------------------------------------------------------------------------------------------------------
def test_badam_trains_one_block_at_a_time():
    from badam import BlockOptimizer

    model = _model()
    ref = copy.deepcopy(model)
    mine = _ours(model, use_badam=True, badam_switch_interval=1)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")}
    base = torch.optim.AdamW(_decay_groups(list(ref.named_parameters())), lr=LR, weight_decay=DECAY)
    reference = BlockOptimizer(base_optimizer=base, named_parameters_list=list(ref.named_parameters()),
                               switch_block_every=1, switch_mode="ascending", verbose=0)
    _same_steps(mine, model, reference, ref)  # the second step trains block 1: its switch came after step 1
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")}  # two steps: back to block 0
    # BAdam's active groups take the base optimizer's default weight decay: the run's, not torch's 0.01
    assert {g["weight_decay"] for g in mine.base_optimizer.param_groups} == {DECAY}


# ---- LoRA+ --------------------------------------------------------------------------------------------------------
def test_loraplus_gives_b_ratio_times_the_learning_rate():
    from peft.optimizers import create_loraplus_optimizer

    model = _lora(_model())
    ref = copy.deepcopy(model)
    mine = _ours(model, loraplus_lr_ratio=16.0)
    by_lr = {}
    for g in mine.param_groups:
        for n in _names(model, g["params"]):
            by_lr[n] = g["lr"]
    a = {n for n in by_lr if ".lora_A." in n}
    b = {n for n in by_lr if ".lora_B." in n}
    assert len(a) == len(b) == 14 and a | b == set(by_lr)
    assert {by_lr[n] for n in a} == {LR} and {by_lr[n] for n in b} == {16 * LR}
    reference = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=16.0,
                                          loraplus_lr_embedding=1e-6, loraplus_weight_decay=DECAY,
                                          betas=(0.9, 0.999), eps=1e-8)
    _same_steps(mine, model, reference, ref)


def test_loraplus_embedding_adapters_take_loraplus_lr_embedding():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    mine = _ours(model, loraplus_lr_ratio=4.0, loraplus_lr_embedding=3e-5)
    lrs = {n: g["lr"] for g in mine.param_groups for n in _names(model, g["params"])}
    assert {lrs[n] for n in lrs if "lora_embedding" in n} == {3e-5}
    assert {lrs[n] for n in lrs if ".lora_B." in n} == {4 * LR}


# ---- `optim` through transformers: bitsandbytes' 8-bit AdamW --------------------------------------------------------
@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_8bit_adamw_through_the_same_path(optim, caplog):
    import bitsandbytes

    model = _model(hidden=64)  # 64 x 64 projections: at least 4096 values, so bitsandbytes keeps 8-bit states
    ref = copy.deepcopy(model)
    with caplog.at_level("INFO", logger="trainer"):
        mine = _ours(model, _args(optim=optim))
    assert "bitsandbytes.AdamW 8-bit" in caplog.text or "bitsandbytes.PagedAdamW 8-bit" in caplog.text, caplog.text
    cls = bitsandbytes.optim.PagedAdamW8bit if "paged" in optim else bitsandbytes.optim.AdamW8bit
    reference = cls(_decay_groups(list(ref.named_parameters())), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    bitsandbytes.optim.GlobalOptimManager.get_instance().register_module_override(ref.model.embed_tokens, "weight",
                                                                                  {"optim_bits": 32})
    _same_steps(mine, model, reference, ref)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert mine.state[q]["state1"].dtype == torch.uint8
    assert mine.state[model.model.embed_tokens.weight]["state1"].dtype == torch.float32


def test_the_log_names_every_group(caplog):
    with caplog.at_level("INFO", logger="trainer"):
        _ours(_model(), use_muon=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Optimizer group")]
    assert lines[0].startswith("Optimizer group Muon: 2-D hidden matrices: torch.Muon, lr 0.01, weight_decay 0.1, "
                               "14 tensors, 18,432 parameters: model.layers.*.self_attn.q_proj.weight")
    assert any("torch.AdamW" in line and "model.embed_tokens.weight" in line for line in lines)


# ---- refusals -------------------------------------------------------------------------------------------------------
def _cfg(tmp_path, **extra):
    return base_config(tmp_path / "m", tmp_path / "d", tmp_path / "o", **extra)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("options, words", [
    ({"use_muon": True}, "#8041"), ({"use_adam_mini": True, "finetuning_type": "full"}, "flat partitions"),
    ({"use_galore": True, "finetuning_type": "full"}, "whole weight matrix"),
    ({"use_apollo": True, "finetuning_type": "full"}, "whole weight matrix"),
    ({"use_badam": True, "finetuning_type": "full"}, "one process only")])
def test_refused_under_deepspeed_with_the_reason(tmp_path, stage, options, words):
    ds = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": stage}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="DeepSpeed") as err:
        build_config(_cfg(tmp_path, deepspeed=str(tmp_path / "ds.json"), **options))
    assert words in str(err.value)


@pytest.mark.parametrize("options, words", [
    ({"use_muon": True}, "shard of it per process"), ({"use_adam_mini": True, "finetuning_type": "full"}, "shards"),
    ({"use_galore": True, "finetuning_type": "full"}, "FSDP"), ({"use_badam": True, "finetuning_type": "full"}, "FSDP")])
def test_refused_under_fsdp_with_the_reason(tmp_path, options, words):
    with pytest.raises(ConfigError, match="FSDP") as err:
        build_config(_cfg(tmp_path, fsdp="full_shard auto_wrap", **options))
    assert words in str(err.value)


@pytest.mark.parametrize("options, words", [
    ({"use_muon": True, "loraplus_lr_ratio": 4.0}, "choose one optimizer method"),
    ({"use_galore": True}, "finetuning_type: lora"), ({"use_adam_mini": True}, "LoRA's factors"),
    ({"use_badam": True, "finetuning_type": "freeze"}, "needs finetuning_type: full"),
    ({"loraplus_lr_ratio": 4.0, "finetuning_type": "full"}, "for finetuning_type: lora"),
    ({"use_galore": True, "galore_layerwise": True, "finetuning_type": "full"}, "accumulate gradients"),
    ({"use_apollo": True, "apollo_layerwise": True, "finetuning_type": "full"}, "accumulate gradients"),
    ({"use_badam": True, "badam_mode": "ratio", "finetuning_type": "full"}, "sparse"),
    ({"use_apollo": True, "optim": "adafactor", "finetuning_type": "full"}, "no APOLLO variant"),
    ({"use_galore": True, "optim": "sgd", "finetuning_type": "full"}, "no GaLore variant"),
    ({"galore_proj_type": "diagonal"}, "choose one of")])
def test_combinations_refused_by_name(tmp_path, options, words):
    with pytest.raises(ConfigError) as err:
        build_config(_cfg(tmp_path, **options))
    assert words in str(err.value)


def test_a_deepspeed_optimizer_block_and_a_method_refused(tmp_path):
    ds = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
          "optimizer": {"type": "Muon", "params": {"lr": "auto"}}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="loraplus_lr_ratio: the DeepSpeed config has its own optimizer block"):
        build_config(_cfg(tmp_path, deepspeed=str(tmp_path / "ds.json"), loraplus_lr_ratio=4.0))


# ---- a short run of each: the loss falls ------------------------------------------------------------------------------
RUNS = {
    "muon (full)": dict(use_muon=True, finetuning_type="full", learning_rate=1e-2),
    "muon (lora)": dict(use_muon=True, learning_rate=3e-2),
    "adam-mini": dict(use_adam_mini=True, finetuning_type="full", learning_rate=3e-3),
    "galore": dict(use_galore=True, finetuning_type="full", galore_rank=4, learning_rate=3e-3),
    "apollo": dict(use_apollo=True, finetuning_type="full", apollo_rank=4, learning_rate=3e-3),
    "badam": dict(use_badam=True, finetuning_type="full", badam_switch_interval=4, learning_rate=1e-2),
    "loraplus": dict(loraplus_lr_ratio=8.0, learning_rate=3e-3),
    "adamw_bnb_8bit": dict(optim="adamw_bnb_8bit", finetuning_type="full", learning_rate=3e-3),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_short_run_trains(name, tiny_model_dir, data_dir, tmp_path, caplog):
    cfg = base_config(tiny_model_dir, data_dir, tmp_path / "o", max_steps=12, per_device_train_batch_size=4,
                      **RUNS[name])
    with caplog.at_level("INFO", logger="trainer"):
        _, state = train_with(cfg)
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    assert "Optimizer group" in caplog.text


# ---- zerotune check: which optimizer, and its state ----------------------------------------------------------------
def test_state_bytes_against_each_packages_state():
    """Bytes from the formulas against the state each package really allocates after one step."""
    import bitsandbytes
    from adam_mini import Adam_mini

    def allocated(optimizer):
        return sum(v.numel() * v.element_size() for st in optimizer.state.values() for k, v in st.items()
                   if torch.is_tensor(v) and k not in ("step", "qmap1", "qmap2"))

    def stepped(build, hidden=64):
        model = _model(hidden)
        opt = build(model)
        _set_grads(model, 0)
        opt.step()
        return model, opt

    def shapes(model):
        return [(n, tuple(p.shape)) for n, p in model.named_parameters()]

    model, opt = stepped(lambda m: torch.optim.AdamW(m.parameters()))
    assert state_plan(OptimizerArguments(), "adamw_torch", shapes(model))[0] == allocated(opt)
    model, opt = stepped(lambda m: _ours(m, _args(optim="adamw_bnb_8bit")))
    assert state_plan(OptimizerArguments(), "adamw_bnb_8bit", shapes(model))[0] == allocated(opt)
    model, opt = stepped(lambda m: _ours(m, use_muon=True))
    expected = allocated(opt.muon) + allocated(opt.rest)
    assert state_plan(OptimizerArguments(use_muon=True), "adamw_torch", shapes(model))[0] == expected
    model, opt = stepped(lambda m: Adam_mini(m.named_parameters(), dim=64, n_heads=4, n_kv_heads=2, verbose=False))
    planned = state_plan(OptimizerArguments(use_adam_mini=True), "adamw_torch", shapes(model))[0]
    assert allocated(opt) <= planned <= allocated(opt) * 1.05  # the plan counts a second moment per row
    for method in ("galore", "apollo"):
        model, opt = stepped(lambda m: _ours(m, **{f"use_{method}": True, f"{method}_rank": 8}))
        projectors = sum(st["projector"].ortho_matrix.numel() * 4 for st in opt.state.values() if "projector" in st)
        planned = state_plan(OptimizerArguments(**{f"use_{method}": True, f"{method}_rank": 8}), "adamw_torch",
                             shapes(model))[0]
        assert planned == allocated(opt) + projectors - (4 * 14 if method == "apollo" else 0), method
    assert bitsandbytes  # imported for the 8-bit path above


def test_check_names_the_optimizer_and_counts_its_state(tiny_model_dir, data_dir, tmp_path):
    outputs = {}
    for name, extra in {"adamw": {}, "muon": {"use_muon": True, "finetuning_type": "full"},
                        "galore": {"use_galore": True, "finetuning_type": "full"}}.items():
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(base_config(tiny_model_dir, data_dir, tmp_path / "o", **extra)))
        proc = subprocess.run([sys.executable, "-m", "trainer.cli", "check", str(cfg)], cwd=ROOT, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[name] = proc.stdout
    assert re.search(r"optimizer +adamw_torch\w*: 8 B/param, two fp32 moments: .* 8\.00 B per trained", outputs["adamw"])
    assert "optimizer        Muon (torch.optim.Muon, one fp32 momentum: 4 B/param) on 14 2-D hidden" in outputs["muon"]
    assert "ZeRO-3             refused with use_muon" in outputs["muon"]
    assert "GaLore rank 16" in outputs["galore"]


@pytest.mark.parametrize("name", ["muon (full)", "galore", "apollo"])
def test_resume_gives_the_same_next_losses(name, tiny_model_dir, data_dir, tmp_path):
    """The optimizer state comes back from a checkpoint: Muon's two halves, GaLore's and APOLLO's projectors."""
    cfg = base_config(tiny_model_dir, data_dir, tmp_path / "o", max_steps=4, save_steps=2, **RUNS[name])
    _, whole = train_with(cfg)
    _, resumed = train_with(dict(cfg, resume_from_checkpoint=str(tmp_path / "o" / "checkpoint-2")))

    def losses(state):
        return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}

    assert [losses(resumed)[s] for s in (3, 4)] == [losses(whole)[s] for s in (3, 4)]


@pytest.mark.distributed
def test_loraplus_under_zero3_trains_as_without_deepspeed(tiny_model_dir, data_dir, tmp_path):
    """LoRA+ is the one method here that DeepSpeed takes (its param groups with their own learning rates): the same
    losses under ZeRO-3 as without DeepSpeed. In a subprocess: DeepSpeed's rendezvous is process-wide."""
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                                                  "gradient_accumulation_steps": "auto",
                                                  "zero_optimization": {"stage": 3}}))
    cfg = base_config(tiny_model_dir, data_dir, tmp_path / "plain", max_steps=3, loraplus_lr_ratio=8.0)
    _, plain = train_with(cfg)
    ds_cfg = dict(cfg, output_dir=str(tmp_path / "zero3"), deepspeed=str(tmp_path / "ds.json"))
    script = (f"import json, sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
              "from tiny import train_with\n"
              f"_, state = train_with(json.loads({json.dumps(json.dumps(ds_cfg))}))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA+ B and 1-D (learning_rate x 8): torch.AdamW, lr 0.008" in proc.stderr
    zero3 = json.loads((tmp_path / "zero3" / "trainer_state.json").read_text())

    def losses(state):
        return [e["loss"] for e in state["log_history"] if "loss" in e]

    assert losses(zero3) == pytest.approx(losses(plain), abs=1e-5)

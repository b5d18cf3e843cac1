"""PEFT's LoRA variants under LLaMA-Factory's keys (use_dora, use_rslora, pissa_init / pissa_iter / pissa_convert,
create_new_adapter, lora_dropout), each against its method's definition: DoRA's output is the paper's
m * (W + s·BA) / ||W + s·BA|| and its magnitudes train; rsLoRA scales by alpha / sqrt(r); PiSSA starts from the
principal part of W with the residual in the base; the converted PiSSA adapter gives the trained model on the
original base; create_new_adapter merges and starts afresh; dropout keeps PEFT's own forward."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tiny import base_config, train_with
from trainer.errors import ConfigError
from trainer.model.options import FinetuningArguments, ModelArguments, check_lora_variants

LAYER = "base_model.model.model.layers.0.self_attn.q_proj"


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _args(**kw) -> FinetuningArguments:
    args = FinetuningArguments(**kw)
    args.lora_alpha = args.lora_alpha or 2 * args.lora_rank
    return args


def _lora(model_dir, adapters=(), **kw):
    from trainer.model.adapters import apply_lora

    torch.manual_seed(0)
    return apply_lora(_base(model_dir), _args(**kw), list(adapters), is_trainable=True)


def _layers(model) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _ids(n=24, seed=1):
    return torch.randint(3, 300, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model.eval()(input_ids=ids, use_cache=False).logits


def _losses(out) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


# ---- PEFT holds the variant ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, field, value, logged", [
    ({"use_dora": True}, "use_dora", True, "DoRA on 14 layers"),
    ({"use_rslora": True}, "use_rslora", True, "rsLoRA on 14 layers"),
    ({"pissa_init": True, "pissa_iter": 4}, "init_lora_weights", "pissa_niter_4", "PiSSA (randomized SVD, 4"),
    ({"pissa_init": True, "pissa_iter": -1}, "init_lora_weights", "pissa", "PiSSA (exact SVD)"),
    ({"lora_dropout": 0.1}, "lora_dropout", 0.1, "plain LoRA on 14 layers"),
])
def test_peft_config_holds_the_variant(tiny_model_dir, caplog, keys, field, value, logged):
    with caplog.at_level(logging.INFO, logger="trainer"):
        model = _lora(tiny_model_dir, **keys)
    assert getattr(model.peft_config["default"], field) == value
    assert logged in caplog.text
    layers = _layers(model)
    assert len(layers) == 14  # 7 linear layers x 2 decoder layers
    if keys.get("use_dora"):
        assert all("default" in m.lora_magnitude_vector for m in layers.values())
    if keys.get("lora_dropout"):
        assert all(isinstance(m.lora_dropout["default"], nn.Dropout) and m.lora_dropout["default"].p == 0.1
                   for m in layers.values())


# ---- DoRA -----------------------------------------------------------------------------------------------------------

def test_dora_layer_computes_the_papers_formula(tiny_model_dir):
    """W' = m * (W + s·BA) / ||W + s·BA|| (the norm of each output row), y = x W'^T; at the start m = ||W||."""
    model = _lora(tiny_model_dir, use_dora=True, lora_rank=4)
    layer = model.get_submodule(LAYER)
    W = layer.base_layer.weight.detach().clone()
    magnitude = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(magnitude.detach(), W.norm(dim=1), rtol=1e-6, atol=1e-6)

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=g) * 0.3)
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.3)
        magnitude.copy_(torch.rand(magnitude.shape, generator=g) + 0.5)
    A, B, s = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), layer.scaling["default"]
    V = W + s * B @ A
    expected_weight = magnitude.detach()[:, None] * V / V.norm(dim=1, keepdim=True)
    x = torch.randn(5, W.shape[1], generator=g)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected_weight.T, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the path a bf16 run takes: still DoRA's formula
            got = layer(x.bfloat16()).float()
    expected = x @ expected_weight.T
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    # The lean LoRA changes keep off a DoRA layer: PEFT's forward and its input cast run as they are.
    assert "forward" not in layer.__dict__ and "_cast_input_dtype" not in layer.__dict__


def test_dora_trains_its_magnitudes_end_to_end(tiny_model_dir, data_dir, tmp_path, caplog):
    out = tmp_path / "dora"
    with caplog.at_level(logging.INFO, logger="trainer"):
        train_with(base_config(tiny_model_dir, data_dir, out, use_dora=True, max_steps=2, learning_rate=1e-2))
    assert "LoRA forward: PEFT's own on 14 layers (DoRA: 14)" in caplog.text
    assert "14 trained magnitude vectors" in caplog.text
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    saved = load_file(out / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in saved.items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == 14
    base = dict(_base(tiny_model_dir).named_parameters())
    for key, m in magnitudes.items():  # the start is ||W|| per row; two steps at 1e-2 moved every vector
        module = key.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]
        start = base[f"{module}.weight"].detach().norm(dim=1)
        assert (m - start).abs().max() > 1e-3, key
    assert all(v > 0 for v in _losses(out).values())


# ---- rsLoRA ---------------------------------------------------------------------------------------------------------

def test_rslora_scales_by_alpha_over_sqrt_r_and_one_step_follows(tiny_model_dir):
    """scaling = alpha / sqrt(r) (alpha / r for plain LoRA). From B = 0, one SGD step moves B by -lr * s * dL/d(BAx)
    A^T, so the layer's output moves by s * dB A x, proportional to s²: rsLoRA's move is (sqrt(r))² = r times plain
    LoRA's at the same alpha and the same A."""
    r, alpha = 16, 16
    plain, rs = (_lora(tiny_model_dir, lora_rank=r, lora_alpha=alpha, use_rslora=flag) for flag in (False, True))
    assert {m.scaling["default"] for m in _layers(plain).values()} == {alpha / r}
    assert {m.scaling["default"] for m in _layers(rs).values()} == {alpha / r ** 0.5}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 32, generator=g)
    target = torch.randn(6, 32, generator=g)
    moves = []
    for model in (plain, rs):
        layer = model.get_submodule(LAYER)
        trained = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        before = layer(x).detach()
        (layer(x) * target).sum().backward()
        torch.optim.SGD(trained, lr=1e-3).step()
        moves.append(layer(x).detach() - before)
    torch.testing.assert_close(plain.get_submodule(LAYER).lora_A["default"].weight,
                               rs.get_submodule(LAYER).lora_A["default"].weight)  # same A (B = 0: A's grad is 0)
    assert moves[0].abs().max() > 0
    torch.testing.assert_close(moves[1], r * moves[0], rtol=1e-4, atol=1e-7)


def test_rslora_keeps_the_fused_forward_exactly_as_peft(tiny_model_dir, data_dir, tmp_path, caplog):
    """rsLoRA is plain LoRA at forward time with another scale: the fused addmm reads PEFT's own scaling and gives
    PEFT's output (to bf16 rounding) under autocast."""
    model = _lora(tiny_model_dir, use_rslora=True, lora_rank=4, lora_alpha=8)
    layer = model.get_submodule(LAYER)
    assert "forward" in layer.__dict__  # the fused forward is installed
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    x = torch.randn(9, 32).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x).float()
        peft = type(layer).forward(layer, x).float()
    exact = x.double() @ (layer.base_layer.weight.double() + layer.scaling["default"] * (
        layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double())).T
    assert layer.scaling["default"] == 8 / 2
    for got in (fused, peft):
        assert (got.double() - exact).abs().max() < 0.02 * exact.abs().max()

    out = tmp_path / "rs"
    with caplog.at_level(logging.INFO, logger="trainer"):
        train_with(base_config(tiny_model_dir, data_dir, out, use_rslora=True, max_steps=2))
    assert "rsLoRA on 14 layers: r=8 alpha=16, scaling 5.656854 (alpha/sqrt(r))" in caplog.text
    assert "one fused addmm for all 14 adapted Linear layers" in caplog.text
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True


# ---- PiSSA ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("iters", [-1, 4])
def test_pissa_starts_at_the_base_model_with_the_residual_in_the_base(tiny_model_dir, iters):
    """The adapter starts as the principal part of W (the exact top-r SVD with pissa_iter -1) and the base weight is
    replaced by the residual, so base + adapter is W again and the first forward is the base model's."""
    r = 4
    ids = _ids()
    reference = _logits(_base(tiny_model_dir), ids)
    original = dict(_base(tiny_model_dir).named_parameters())
    model = _lora(tiny_model_dir, pissa_init=True, pissa_iter=iters, lora_rank=r)
    torch.testing.assert_close(_logits(model, ids), reference, rtol=1e-5, atol=1e-5)
    for name, layer in _layers(model).items():
        W = original[name.removeprefix("base_model.model.") + ".weight"].detach()
        s, A0, B0 = layer.scaling["default"], layer.lora_A["default"].weight, layer.lora_B["default"].weight
        principal = (s * B0 @ A0).detach()
        torch.testing.assert_close(layer.base_layer.weight.detach(), W - principal, rtol=1e-5, atol=1e-5)
        assert principal.abs().max() > 0.1 * W.abs().max()  # the base really lost its principal part
        if iters == -1:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            torch.testing.assert_close(principal, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], rtol=1e-4, atol=1e-4)


def test_pissa_convert_gives_the_trained_model_on_the_original_base(tiny_model_dir, data_dir, tmp_path, caplog):
    """pissa_converted, loaded with plain PEFT on the untouched base, gives the trained model, built here by hand from
    its definition: the residual W - s·B0A0 (B0, A0: output_dir/pissa_init, checked to be W's top-r SVD) plus the
    trained s·BA (output_dir's adapter). lm_head trains whole (additional_target), which PEFT's conversion leaves out:
    it is carried into the converted adapter."""
    from peft import PeftModel

    from trainer.model.adapters import merge_adapter

    out, r = tmp_path / "pissa", 8
    with caplog.at_level(logging.INFO, logger="trainer"):
        train_with(base_config(tiny_model_dir, data_dir, out, pissa_init=True, pissa_iter=-1, pissa_convert=True,
                               additional_target="lm_head", max_steps=3, learning_rate=1e-2))
    assert "PiSSA (exact SVD) on 14 layers" in caplog.text and "pissa_convert: wrote" in caplog.text
    converted_config = json.loads((out / "pissa_converted" / "adapter_config.json").read_text())
    assert (converted_config["r"], converted_config["lora_alpha"]) == (2 * r, 4 * r)
    assert converted_config["init_lora_weights"] is True

    initial = load_file(out / "pissa_init" / "adapter_model.safetensors")
    trained = load_file(out / "adapter_model.safetensors")
    handmade = _base(tiny_model_dir)
    params = dict(handmade.named_parameters())
    s = 2.0  # lora_alpha (2 r by default) / r
    with torch.no_grad():
        for key in [k for k in trained if ".lora_A." in k]:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            W = params[f"{module}.weight"]
            B0, A0 = initial[key.replace("lora_A", "lora_B")], initial[key]
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            torch.testing.assert_close(s * B0 @ A0, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], rtol=1e-4, atol=1e-4)
            W.copy_(W - s * B0 @ A0 + s * trained[key.replace("lora_A", "lora_B")] @ trained[key])
        params["lm_head.weight"].copy_(trained["base_model.model.lm_head.weight"])
    ids = _ids()
    expected, untouched = _logits(handmade, ids), _logits(_base(tiny_model_dir), ids)
    converted = PeftModel.from_pretrained(_base(tiny_model_dir), out / "pissa_converted")
    got = _logits(converted, ids)
    assert (expected - untouched).abs().max() > 0.05  # training moved the model
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # zerotune's own loading (export, chat, adapter_name_or_path) says what it loads.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        merged = merge_adapter(_base(tiny_model_dir), str(out / "pissa_converted"))
    assert "Merged the plain LoRA adapter" in caplog.text
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-4)


def test_pissa_adapter_loads_only_where_peft_rebuilds_the_same_residual(tiny_model_dir, data_dir, tmp_path, caplog):
    """PEFT rebuilds a PiSSA adapter's residual while loading it. With a randomized SVD that is another residual, so
    pissa_convert is turned on and zerotune's loaders take pissa_converted; without that folder such an adapter is
    refused. With the exact SVD (pissa_iter -1) the adapter alone loads as the trained model."""
    from peft import PeftModel

    from trainer.model.adapters import merge_adapter

    ids = _ids()
    randomized = tmp_path / "randomized"
    with caplog.at_level(logging.INFO, logger="trainer"):
        train_with(base_config(tiny_model_dir, data_dir, randomized, pissa_init=True, max_steps=2,
                               learning_rate=1e-2))
    assert "Turning pissa_convert on" in caplog.text
    assert (randomized / "pissa_converted" / "adapter_config.json").is_file()
    converted = _logits(PeftModel.from_pretrained(_base(tiny_model_dir), randomized / "pissa_converted"), ids)
    torch.manual_seed(123)  # another random draw than the run's: PEFT's reload of the PiSSA adapter alone is another
    rebuilt = _logits(PeftModel.from_pretrained(_base(tiny_model_dir), randomized), ids)  # model (SmolLM2: off by 36)
    assert (rebuilt - converted).abs().max() > 1e-3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        merged = merge_adapter(_base(tiny_model_dir), str(randomized))
    assert "loading its plain LoRA conversion" in caplog.text
    torch.testing.assert_close(_logits(merged, ids), converted, rtol=1e-5, atol=1e-5)
    shutil.rmtree(randomized / "pissa_converted")
    with pytest.raises(ConfigError, match="PiSSA adapter without a pissa_converted folder.*new randomized SVD"):
        merge_adapter(_base(tiny_model_dir), str(randomized))

    exact = tmp_path / "exact"
    with caplog.at_level(logging.INFO, logger="trainer"):
        train_with(base_config(tiny_model_dir, data_dir, exact, pissa_init=True, pissa_iter=-1, max_steps=2,
                               learning_rate=1e-2))
    assert not (exact / "pissa_converted").exists()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        merged = merge_adapter(_base(tiny_model_dir), str(exact))
    assert "Merged the PiSSA (exact SVD, rebuilt identically while loading) adapter" in caplog.text
    handmade = _base(tiny_model_dir)  # W with the trained delta s·(BA - B0A0), B0A0 the exact top-r SVD part
    params, trained = dict(handmade.named_parameters()), load_file(exact / "adapter_model.safetensors")
    with torch.no_grad():
        for key in [k for k in trained if ".lora_A." in k]:
            W = params[key.removeprefix("base_model.model.").split(".lora_A.")[0] + ".weight"]
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            B, A = trained[key.replace("lora_A", "lora_B")], trained[key]
            W.copy_(W - U[:, :8] @ torch.diag(S[:8]) @ Vh[:8] + 2.0 * B @ A)
    torch.testing.assert_close(_logits(merged, ids), _logits(handmade, ids), rtol=1e-4, atol=1e-4)


def test_pissa_resume_continues_the_same_run(tiny_model_dir, data_dir, tmp_path, caplog):
    """A resumed PiSSA run builds the same residual base again (same seed) before the checkpoint's adapter loads, and
    checks it against the run's pissa_init: 4 steps straight == 2 steps, resume, 2 more. Another start (here another
    seed) is refused."""
    settings = dict(pissa_init=True, learning_rate=1e-2, per_device_train_batch_size=1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_with(base_config(tiny_model_dir, data_dir, straight, save_steps=100, max_steps=4, **settings))
    train_with(base_config(tiny_model_dir, data_dir, split, save_steps=2, max_steps=2, **settings))
    other = tmp_path / "other"
    shutil.copytree(split, other)
    with caplog.at_level(logging.INFO, logger="trainer"):
        train_with(base_config(tiny_model_dir, data_dir, split, save_steps=100, max_steps=4,
                               resume_from_checkpoint="true", **settings))
    assert "the resumed run rebuilt the start it was trained from" in caplog.text
    a, b = _losses(straight), _losses(split)
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    # and the converted adapter is relative to the same start: equal in both runs
    first, second = (load_file(o / "pissa_converted" / "adapter_model.safetensors") for o in (straight, split))
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="PiSSA start differs"):
        train_with(base_config(tiny_model_dir, data_dir, other, save_steps=100, max_steps=4, seed=8,
                               resume_from_checkpoint="true", **settings))


# ---- create_new_adapter ---------------------------------------------------------------------------------------------

def test_create_new_adapter_merges_the_given_one_and_trains_a_new_one(tiny_model_dir, data_dir, tmp_path, caplog):
    from peft import PeftModel

    first = tmp_path / "first"
    train_with(base_config(tiny_model_dir, data_dir, first, max_steps=2, learning_rate=1e-2))
    ids = _ids()
    with_first = _logits(PeftModel.from_pretrained(_base(tiny_model_dir), first), ids)

    model = _lora(tiny_model_dir, adapters=[str(first)], create_new_adapter=True)
    assert list(model.peft_config) == ["default"]
    layers = _layers(model)
    assert all(not m.lora_B["default"].weight.any() for m in layers.values())  # a new adapter: B = 0
    torch.testing.assert_close(_logits(model, ids), with_first, rtol=1e-5, atol=1e-5)  # on the merged base
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A.default." in n or ".lora_B.default." in n for n in trained)
    # Without it, the given adapter itself trains further (B as trained).
    continued = _lora(tiny_model_dir, adapters=[str(first)])
    assert any(m.lora_B["default"].weight.any() for m in _layers(continued).values())

    second = tmp_path / "second"
    with caplog.at_level(logging.INFO, logger="trainer"):
        train_with(base_config(tiny_model_dir, data_dir, second, adapter_name_or_path=str(first),
                               create_new_adapter=True, max_steps=2, learning_rate=1e-2))
    assert f"create_new_adapter: {first} merged into the base" in caplog.text
    new = load_file(second / "adapter_model.safetensors")
    old = load_file(first / "adapter_model.safetensors")
    assert set(new) == set(old) and any(not torch.equal(new[k], old[k]) for k in new)
    merged_then_new = PeftModel.from_pretrained(
        PeftModel.from_pretrained(_base(tiny_model_dir), first).merge_and_unload(), second)
    assert (_logits(merged_then_new, ids) - with_first).abs().max() > 1e-4  # the new adapter learned something


# ---- lora_dropout ---------------------------------------------------------------------------------------------------

def test_dropout_keeps_peft_forward_and_trains(tiny_model_dir, data_dir, tmp_path, caplog):
    from trainer.model.lean_ops import fuse_lora_forward

    model = _lora(tiny_model_dir, lora_dropout=0.1)
    assert fuse_lora_forward(model) == 0
    assert all("forward" not in m.__dict__ for m in _layers(model).values())
    out = tmp_path / "drop"
    with caplog.at_level(logging.INFO, logger="trainer"):
        train_with(base_config(tiny_model_dir, data_dir, out, lora_dropout=0.1, bf16=True, max_steps=3))
    assert "LoRA forward: PEFT's own on 14 layers (lora_dropout 0.1: 14)" in caplog.text
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 20 for v in losses.values())


# ---- refusals and zerotune check ------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, zero3, fsdp, match", [
    ({"use_dora": True, "finetuning_type": "full"}, False, False, "use_dora: LoRA only"),
    ({"pissa_convert": True}, False, False, "set pissa_init: true too"),
    ({"pissa_init": True, "pissa_convert": True, "use_dora": True}, False, False, "a DoRA adapter's weight"),
    ({"pissa_init": True}, True, False, "ZeRO-3 has partitioned them"),
    ({"pissa_init": True, "pissa_convert": True}, False, True, "fsdp holds it sharded"),
    ({"pissa_iter": -2}, False, False, "pissa_iter: -2"),
    # a randomized-SVD PiSSA adapter only loads again through its conversion, which these cannot have
    ({"pissa_init": True, "use_dora": True}, False, False, "and use_dora: .* Set pissa_iter: -1"),
    ({"pissa_init": True}, False, True, "and fsdp: .* Set pissa_iter: -1"),
])
def test_variant_refusals(keys, zero3, fsdp, match):
    with pytest.raises(ConfigError, match=match):
        check_lora_variants(_args(**keys), ModelArguments(model_name_or_path="m"), zero3=zero3, fsdp=fsdp)


def test_randomized_pissa_turns_pissa_convert_on():
    for iters, converts in ((16, True), (0, True), (-1, False)):
        args = _args(pissa_init=True, pissa_iter=iters)
        check_lora_variants(args, ModelArguments(model_name_or_path="m"), zero3=False, fsdp=False)
        assert args.pissa_convert is converts
    args = _args(pissa_init=True, pissa_iter=-1, use_dora=True)  # the exact SVD reloads: DoRA + PiSSA is fine
    check_lora_variants(args, ModelArguments(model_name_or_path="m"), zero3=False, fsdp=False)


def test_variant_refusals_with_adapters_and_stages(tiny_model_dir, data_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from trainer.run import build_config

    plain = tmp_path / "plain"
    get_peft_model(_base(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(plain)
    with_adapter = ModelArguments(model_name_or_path="m", adapter_name_or_path=str(plain))
    with pytest.raises(ConfigError, match="create_new_adapter: true to merge it and start a PiSSA"):
        check_lora_variants(_args(pissa_init=True), with_adapter, zero3=False, fsdp=False)
    with pytest.raises(ConfigError, match="ZeRO-3 partitions"):
        check_lora_variants(_args(create_new_adapter=True), with_adapter, zero3=True, fsdp=False)
    with pytest.raises(ConfigError, match="use_dora: true, but the adapter .* is not DoRA"):
        _lora(tiny_model_dir, adapters=[str(plain)], use_dora=True)
    with pytest.raises(ConfigError, match="fsdp holds it sharded"):
        build_config(base_config(tiny_model_dir, data_dir, tmp_path / "o", pissa_init=True, pissa_convert=True,
                                 fsdp="full_shard"))
    # Stages whose reference is the LoRA base with adapters off: PiSSA replaced that base.
    with pytest.raises(ConfigError, match="pissa_init: stage dpo's reference model"):
        build_config(base_config(tiny_model_dir, data_dir, tmp_path / "o", stage="dpo", pissa_init=True))
    with pytest.raises(ConfigError, match="pissa_init: ppo's reference"):
        build_config(base_config(tiny_model_dir, data_dir, tmp_path / "o", stage="ppo", pissa_init=True,
                                 reward_model=str(plain), reward_model_type="lora"))
    # A separate reference model is the real start: allowed.
    build_config(base_config(tiny_model_dir, data_dir, tmp_path / "o", stage="dpo", pissa_init=True,
                             ref_model=str(tiny_model_dir)))
    # create_new_adapter: the merged base (adapters off) is the reference, not a frozen copy of the given adapter.
    from trainer.model.adapters import keep_starting_adapter

    new = build_config(base_config(tiny_model_dir, data_dir, tmp_path / "o", stage="dpo",
                                   adapter_name_or_path=str(plain), create_new_adapter=True))
    assert keep_starting_adapter(None, new) is None
    # The variants here, and LoRA+ (engine/optimizers.py), are keys now: none is refused as a feature.
    from trainer import lf_compat

    assert lf_compat.refusal("loraplus_lr_ratio") is None and lf_compat.refusal("use_dora") is None
    assert all(lf_compat.refusal(k) is None for k in ("use_dora", "use_rslora", "pissa_init", "pissa_iter",
                                                      "pissa_convert", "create_new_adapter"))


def test_check_names_the_variant(tiny_model_dir, data_dir, tmp_path):
    from trainer.model.lora_variants import plan
    from trainer.plan import parameter_counts
    from trainer.run import build_config

    cfg = build_config(base_config(tiny_model_dir, data_dir, tmp_path / "o", use_dora=True, use_rslora=True,
                                   pissa_init=True, pissa_iter=-1, lora_dropout=0.05))
    line = plan(cfg.finetuning, cfg.model.adapters)
    assert line == ("new LoRA r=8 alpha=16, scaling 5.657 (alpha/sqrt(r): rsLoRA); DoRA (a trained magnitude per "
                    "output row; PEFT's forward); PiSSA start (exact SVD); lora_dropout 0.05 (PEFT's forward)")
    plain = build_config(base_config(tiny_model_dir, data_dir, tmp_path / "o"))
    model = _lora(tiny_model_dir, use_dora=True)
    built = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert parameter_counts(cfg)[1] == built  # the magnitudes counted
    assert parameter_counts(plain)[1] == sum(p.numel() for p in _lora(tiny_model_dir).parameters() if p.requires_grad)


# ---- two processes --------------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("layout, keys", [("z3", {"use_dora": True}), ("z2", {"pissa_init": True})])
def test_two_deepspeed_processes_match_one(layout, keys, tiny_model_dir, data_dir, tmp_path):
    """DoRA under ZeRO-3 (PEFT's DoRA reads the whole base weight in its forward) and PiSSA under ZeRO-2 (each process
    makes the same start; the main one converts): the losses of one process, and the same converted adapter."""
    from test_distributed import ROOT, _deepspeed, _history

    common = dict(max_steps=2, learning_rate=1e-2, packing=False, **keys)
    single, double = tmp_path / "one", tmp_path / "two"
    train_with(base_config(tiny_model_dir, data_dir, single, per_device_train_batch_size=2, **common))
    proc = _deepspeed(base_config(tiny_model_dir, data_dir, double, per_device_train_batch_size=1, **common,
                                  deepspeed=str(ROOT / f"ds_configs/ds_{layout}_config.json")), tmp_path, layout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _history(double, "loss") == pytest.approx(_history(single, "loss"), rel=1e-5)
    if keys.get("pissa_init"):
        one, two = (load_file(o / "pissa_converted" / "adapter_model.safetensors") for o in (single, double))
        assert one.keys() == two.keys()
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5)


"""GPU paths at their real call sites, where CUDA is present (skipped with the reason elsewhere).
benchmarks/gpu_check.sh runs these before it times anything: the first GPU run settles correctness, then speed.

- padding-free batches of several packed rows through the real flash-attn (transformers' FA2 varlen path):
  every example's logits equal the example alone;
- Liger's fused linear cross-entropy (the loss head's GPU kernel) equals the chunked loss, values and gradients;
- batched, left-padded generation equals each prompt alone on FA2 and zerotune_segments;
- preference pairs with the prompt computed once (zerotune_segments' own FlashAttention-2 varlen call over gathered
  keys) give each sequence the log-prob of a forward of that sequence alone;
- ppo in bf16 on the GPU (generation under autocast, the policy's log-probs through FA2 varlen): the first KL and
  ratio are exactly idle and training runs; grpo too.
"""

import importlib.util

import pytest
import torch

from trainer.data.collators import Collator, model_inputs
from trainer.model import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")


def _gpu_model(model_dir, path):
    from transformers import AutoModelForCausalLM

    kernels.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=path, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return model.cuda().eval()


@needs_flash
def test_flash_attention_keeps_packed_rows_apart_at_batch_above_one(tiny_model_dir, packed_rows):
    model = _gpu_model(tiny_model_dir, "flash_attention_2")
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in Collator(0)(packed_rows).items()}
    with torch.no_grad():
        packed = model(**model_inputs(batch), use_cache=False).logits[0].float()
        start = 0
        for row in packed_rows:
            for n in row["lengths"]:
                ids = batch["input_ids"][:, start:start + n]
                alone = model(input_ids=ids, use_cache=False).logits[0].float()
                torch.testing.assert_close(packed[start:start + n], alone, rtol=2e-2, atol=2e-2)
                start += n


@needs_liger
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_fused_loss_equals_the_chunked_loss(dtype):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    from trainer.model.losses import IGNORE_INDEX, chunked_token_nll

    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 1000, (300,), device="cuda")
    targets[::7] = IGNORE_INDEX
    ours = chunked_token_nll(hidden, weight, None, targets, 64)
    theirs = liger_fused_linear_cross_entropy(hidden, weight, targets, None, reduction="none")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(theirs.float(), ours.float(), **tol)
    g_ours = torch.autograd.grad(ours.sum(), (hidden, weight))
    g_theirs = torch.autograd.grad(theirs.sum(), (hidden, weight))
    for a, b in zip(g_theirs, g_ours):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("path", ["flash_attention_2", kernels.SEGMENTS])
def test_batched_generation_on_gpu_equals_each_prompt_alone(path, tiny_model_dir, tiny_tokenizer):
    if path == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn not installed")
    from trainer.data.templates import get_template
    from trainer.generation import GenerationSettings, generate

    model = _gpu_model(tiny_model_dir, path)
    template = get_template("chatml", tiny_tokenizer)
    prompts = [template.encode_prompt(tiny_tokenizer, [{"role": "user", "content": q}])
               for q in ("Hi", "What is the capital of France?", "Write a poem about the sea and the wind.")]
    greedy = GenerationSettings(max_new_tokens=10, do_sample=False)
    stops = template.stop_token_ids(tiny_tokenizer)
    together = generate(model, prompts, stops, tiny_tokenizer.pad_token_id, greedy)
    alone = [generate(model, [p], stops, tiny_tokenizer.pad_token_id, greedy)[0] for p in prompts]
    assert together == alone


@needs_flash
def test_prefix_shared_pairs_on_real_flash_attention(tiny_model_dir):
    from test_dpo import _synthetic_pairs

    from trainer.model.wrapper import ModelWrapper
    from trainer.stages.preference import DPO

    model = _gpu_model(tiny_model_dir, kernels.SEGMENTS)
    items = _synthetic_pairs()
    wrapper = ModelWrapper(model)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in Collator(0, share_prefix=True)(items).items()}
    assert kernels._flash_fits(torch.zeros(1, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        shared, _ = DPO()._sequence_logps(wrapper, model, batch)
        alone = []
        for item in items:
            start = 0
            for n in item["lengths"]:
                one = Collator(0)([{"input_ids": item["input_ids"][start:start + n],
                                    "labels": item["labels"][start:start + n], "lengths": [n]}])
                one = {k: v.cuda() if torch.is_tensor(v) else v for k, v in one.items()}
                logps, _ = DPO()._sequence_logps(wrapper, model, one)
                alone.append(float(logps[0]))
                start += n
    torch.testing.assert_close(shared.float().cpu(), torch.tensor(alone), rtol=3e-2, atol=3e-1)


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_ppo_in_bf16_on_the_gpu(estimator, tiny_model_dir, tmp_path):
    import json

    from tiny import alpaca_rows, base_config, train_with, write_dataset_dir

    data = write_dataset_dir(tmp_path / "prompts", alpaca_rows(16))
    (data / "rewards.py").write_text("def length(prompts, responses):\n"
                                     "    return [len(r) / 50 for r in responses]\n")
    out = tmp_path / "out"
    _, state = train_with(base_config(tiny_model_dir, data, out, stage="ppo", bf16=True, advantage_estimator=estimator,
                                      num_generations=4, reward_function=f"{data}/rewards.py:length",
                                      max_new_tokens=16, ppo_epochs=2, max_steps=4, per_device_train_batch_size=4,
                                      logging_steps=1))
    first = state["log_history"][0]
    assert first["kl"] == 0 and first["approx_kl"] == 0 and first["clipfrac/policy"] == 0
    assert json.loads((out / "ppo_state.json").read_text())["rollouts"] == 2

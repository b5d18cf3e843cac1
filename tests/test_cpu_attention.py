"""The CPU's chunked matmul attention (trainer/model/cpu_attention.py): exact in float64 against SDPA with an
explicit bottom-right causal mask (values and gradients, GQA, segments spanning several chunks, keys of a shared
prompt in front), no less accurate than the flash kernel it replaces in bf16, actually taken by a bf16 model's
segment attention, and a bf16 LoRA run's first losses equal to the same run through the flash kernel."""

import os
import resource
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tiny import base_config, train_with
from trainer.engine.hardware import cpu_supports_bf16
from trainer.model import cpu_attention
from trainer.model.kernels import segment_attention


def _reference(q, k, v, scale):
    """SDPA over the whole segment with the mask spelled out: query i of n sees keys 0 .. (Lk - n) + i."""
    lq, lk = q.shape[1], k.shape[1]
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]


def _inputs(h, hkv, lq, lk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(h, lq, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(hkv, lk, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(hkv, lk, d, generator=g, dtype=dtype).requires_grad_()
    return q, k, v, torch.randn(h, lq, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("lq,shared", [(1, 0), (4, 0), (9, 0), (17, 0), (6, 5), (13, 3)])
@pytest.mark.parametrize("h,hkv", [(4, 2), (3, 3)])
@pytest.mark.parametrize("keep", [0, 64])  # backward recomputing the probabilities, or reading the kept ones
def test_chunked_attention_is_exact_in_float64(monkeypatch, lq, shared, h, hkv, keep):
    monkeypatch.setattr(cpu_attention, "CHUNK", 4)  # several chunks and a ragged last one at these lengths
    monkeypatch.setattr(cpu_attention, "KEEP_PROBS_UP_TO", keep)
    q, k, v, grad = _inputs(h, hkv, lq, lq + shared, 8, torch.float64)
    got = cpu_attention.attention(q, k, v, 0.3)
    ref = _reference(q, k, v, 0.3)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_kept_probabilities_give_the_recomputed_gradients_and_only_where_they_fit(monkeypatch):
    """bf16 (where the two paths could drift apart): keeping the probabilities changes nothing in the gradients;
    segments longer than KEEP_PROBS_UP_TO keys, and forwards without gradient, keep none."""
    q, k, v, grad = _inputs(9, 3, 300, 300, 64, torch.bfloat16, seed=7)
    kept = {}
    original = cpu_attention._ChunkedAttention.forward

    def spy(ctx, *args):
        out = original(ctx, *args)
        kept["probs"] = ctx.probs
        return out

    monkeypatch.setattr(cpu_attention._ChunkedAttention, "forward", staticmethod(spy))
    grads = {}
    for keep in (0, 300, 299):
        monkeypatch.setattr(cpu_attention, "KEEP_PROBS_UP_TO", keep)
        out = cpu_attention.attention(q, k, v, 0.125)
        assert (kept["probs"] is not None) == (keep >= 300)
        grads[keep] = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(grads[0], grads[300]):
        assert torch.equal(a, b)
    with torch.no_grad():
        cpu_attention.attention(q, k, v, 0.125)
    assert kept["probs"] is None


@pytest.mark.parametrize("n", [37, 300])
def test_bf16_error_no_larger_than_the_flash_kernel(n):
    q, k, v, grad = _inputs(9, 3, n, n, 64, torch.bfloat16, seed=n)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*exact, 0.125)
    ref_grads = torch.autograd.grad(ref, exact, grad.double())

    def error(out):
        grads = torch.autograd.grad(out, (q, k, v), grad)
        return max((a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads)))

    chunked = error(cpu_attention.attention(q, k, v, 0.125))
    flash = error(F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=0.125,
                                                 enable_gqa=True)[0])
    assert chunked < 0.1
    assert chunked <= 1.5 * flash, (chunked, flash)


class _Module(torch.nn.Module):
    is_causal = True
    training = True


def test_bf16_segments_take_the_chunked_path_and_fp32_keeps_sdpa(monkeypatch):
    calls = []
    original = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: calls.append(a[0].shape) or original(*a))
    lengths = [5, 11, 2]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    for dtype, expected in ((torch.bfloat16, 3), (torch.float32, 0)):
        calls.clear()
        q, k, v, _ = _inputs(4, 2, sum(lengths), sum(lengths), 8, dtype)
        out, _ = segment_attention(_Module(), q[None], k[None], v[None], None, position_ids=pos)
        assert len(calls) == expected
        ref = torch.cat([_reference(qs, ks, vs, 8 ** -0.5) for qs, ks, vs in
                         zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], 1)
        torch.testing.assert_close(out[0], ref.transpose(0, 1), rtol=2e-2, atol=2e-2)
    # A full fine-tune's fp32 queries under bf16 autocast: SDPA would compute in bf16, so the chunked path runs.
    calls.clear()
    q, k, v, _ = _inputs(4, 2, sum(lengths), sum(lengths), 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = segment_attention(_Module(), q[None], k[None], v[None], None, position_ids=pos)
    assert len(calls) == 3 and out.dtype == torch.bfloat16
    ref = torch.cat([_reference(qs, ks, vs, 8 ** -0.5) for qs, ks, vs in
                     zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], 1)
    torch.testing.assert_close(out[0].float(), ref.transpose(0, 1), rtol=2e-2, atol=2e-2)
    calls.clear()
    q, k, v, _ = _inputs(4, 2, sum(lengths), sum(lengths), 8, torch.bfloat16)
    segment_attention(_Module(), q[None], k[None], v[None], None, dropout=0.1, position_ids=pos)
    assert not calls  # dropout keeps SDPA (the chunked path has none)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16 (zerotune trains in fp32 there)")
def test_bf16_lora_losses_equal_the_flash_kernel_run(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """The first steps of a bf16 LoRA run through the chunked path follow the same run through the flash kernel
    (the implementation before it) to bf16 precision."""
    common = dict(max_steps=5, learning_rate=1e-2, per_device_train_batch_size=4, bf16=True, lora_target="all")
    chunked = _losses_of(train_with(base_config(tiny_model_dir, data_dir, tmp_path / "chunked", **common))[1])
    monkeypatch.setattr(cpu_attention, "fits", lambda query, dropout: False)
    flash = _losses_of(train_with(base_config(tiny_model_dir, data_dir, tmp_path / "flash", **common))[1])
    assert len(chunked) == len(flash) == 5
    assert chunked == pytest.approx(flash, rel=5e-3)
    assert chunked[-1] < chunked[0] - 0.1


def _losses_of(state: dict) -> list[float]:
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_freed_host_memory_is_reused_not_faulted_in_again():
    """64 MiB blocks malloc'ed, written and freed in a loop: with the thresholds raised the first block's pages
    are reused by every later one (no further page faults), by default each block is a fresh mmap whose pages
    all fault in again (40 x 16384 faults of 4 KiB pages)."""
    script = """
import ctypes, resource, sys
from trainer.engine.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(on_cpu=True)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 1 << 26
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True, env=env).stdout.split()[-1]) for mode in ("keep", "default")}
    pages = (1 << 26) // resource.getpagesize()
    assert faults["default"] > 40 * pages * 0.9, faults
    assert faults["keep"] < 2 * pages, faults


def test_a_users_own_allocator_choice_is_left_alone(monkeypatch):
    from trainer.engine import host_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert host_memory.keep_freed_memory(on_cpu=True) is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert host_memory.user_chose() == "LD_PRELOAD"
    assert host_memory.keep_freed_memory(on_cpu=True) is False


def test_a_quantized_base_keeps_glibcs_allocator_defaults(monkeypatch, caplog):
    """QLoRA is a choice of memory over speed: no mallopt call, and the log says why."""
    import ctypes
    import logging

    from trainer.engine import host_memory

    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: calls.append(a))
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.INFO, logger="trainer.engine.host_memory"):
        assert host_memory.keep_freed_memory(on_cpu=True, quantized=True) is False
    assert calls == [] and "quantized base" in caplog.text

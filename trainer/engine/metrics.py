"""Throughput accounting: real tokens, model FLOPs, and the device peak MFU is measured against.

FLOPs of one training token (Kaplan et al. / PaLM appendix B): a forward pass costs 2 FLOPs per
parameter touched; the backward costs 2 more for activation gradients and, for parameters that
train, 2 more for weight gradients. So full fine-tuning is 6N per token and LoRA about 4N (the
frozen base still needs activation gradients). Attention adds, per layer, 4*d FLOPs per query-key
pair forward (QK^T and AV) times 3 with the backward; a causal example of length L has L^2/2 pairs,
and a packed row only pays for pairs inside each example.
"""

from __future__ import annotations

import functools
import logging
import re
import time

import torch

from trainer.model.params import numel

logger = logging.getLogger(__name__)

# Dense (no sparsity) 16-bit tensor-core peaks, FLOP/s, from the vendors' data sheets, by the name torch reports;
# the first pattern that matches wins, so a form factor comes before its family (an H100 PCIe is not an SXM).
# Float32 is never read from here: whether its matmuls take TF32 tensor cores is a setting, so it is measured.
GPU_PEAKS = [
    (r"H100.*PCIe", 756e12), (r"H100.*NVL", 835e12), (r"H100", 989e12),
    (r"H200.*NVL", 835e12), (r"H200", 989e12), (r"H20\b", 148e12),
    (r"B200", 2250e12), (r"A100", 312e12), (r"A800", 312e12), (r"L40S", 362e12), (r"L40\b", 181e12),
    (r"\bL4\b", 121e12), (r"\bA10\b", 125e12), (r"RTX 4090", 165e12), (r"RTX A6000", 155e12),
    (r"RTX 6000 Ada", 364e12),
]
NO_BF16 = (r"V100", r"T4\b")  # bf16 without tensor cores: measured


def table_peak(name: str, dtype_name: str) -> float | None:
    """The data sheet's peak for this device name and dtype; None: not in the table (measure it)."""
    if dtype_name not in ("bfloat16", "float16") or (dtype_name == "bfloat16" and
                                                      any(re.search(p, name) for p in NO_BF16)):
        return None
    return next((peak for pattern, peak in GPU_PEAKS if re.search(pattern, name)), None)


def _head_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The output head's weight parameter. PEFT's row-trained head (trainable_token_indices: a LoRA run's new tokens)
    keeps it in its base layer; its .weight is a merged copy, no parameter: the head would be counted twice."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = getattr(getattr(head, "token_adapter", None), "base_layer", head)
    return getattr(head, "weight", None)


def flops_per_token(model: torch.nn.Module) -> tuple[float, float, float]:
    """(linear FLOPs per real token, attention FLOPs per query-key pair, head FLOPs per trained token).

    The output head is counted only for the tokens that carry a label: the loss head computes logits for
    those alone, so charging it for every token would flatter MFU. Input embeddings are lookups, not
    matmuls, and count nothing.
    """
    head_weight = _head_weight(model)
    skip = {id(head_weight)} if head_weight is not None else set()
    params = [(n, p) for n, p in model.named_parameters() if id(p) not in skip and "embed" not in n]
    total = sum(numel(p) for _, p in params)
    trained = sum(numel(p) for _, p in params if p.requires_grad)
    linear = 6.0 * trained + 4.0 * (total - trained)
    head_flops = (6.0 if head_weight.requires_grad else 4.0) * numel(head_weight) if head_weight is not None else 0.0
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // max(heads, 1))
    attention_pair = 3 * 4.0 * layers * heads * head_dim / 2  # causal: half the pairs of L^2
    return linear, attention_pair, head_flops


def forward_flops_per_token(model: torch.nn.Module) -> tuple[float, float]:
    """(linear FLOPs per token, head FLOPs per labelled token) of a forward pass alone: 2 per parameter touched.
    What a reference model's no-grad forward costs (the attention pairs cost a third of flops_per_token's)."""
    head_weight = _head_weight(model)
    skip = {id(head_weight)} if head_weight is not None else set()
    body = sum(numel(p) for n, p in model.named_parameters() if id(p) not in skip and "embed" not in n
               and "lora_" not in n)  # the reference runs without the adapters
    return 2.0 * body, 2.0 * numel(head_weight) if head_weight is not None else 0.0


@functools.lru_cache(maxsize=None)
def device_peak_flops(dtype_name: str, given_tflops: float | None = None) -> float:
    """Peak FLOP/s of the device in the compute dtype: the user's (mfu_peak_tflops), else the data sheet on GPU,
    else a measured matmul."""
    if given_tflops is not None:
        logger.info("MFU is relative to the given %s peak, %g TFLOP/s (mfu_peak_tflops).", dtype_name, given_tflops)
        return given_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = table_peak(name, dtype_name)
        if peak is not None:
            logger.info("MFU is relative to %s's data-sheet %s peak, %.0f TFLOP/s.", name, dtype_name, peak / 1e12)
            return peak
        logger.info("%s in %s is not in the peak table: measuring its matmul peak for MFU.", name, dtype_name)
    return _measured_peak(dtype_name)


def _measured_peak(dtype_name: str) -> float:
    """Best of repeated square matmuls for about a second, measured once per process.

    Measured rather than read from a table: a CPU's peak depends on its vector units and the thread
    count, and a number cached on disk would outlive a busy moment it was taken in. A second of tries,
    not five: on a 2-core EPYC the best of five varied from 139 to 183 GFLOP/s between processes, the best
    of a second's worth stayed within 2% (a low peak would flatter MFU).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    n = 2048 if device == "cpu" else 8192
    # A private generator: drawing from the global RNG here would shift dropout masks and break exact resume.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    best, tries, start = 0.0, 0, time.perf_counter()
    while tries < 5 or (tries < 30 and time.perf_counter() - start < 1.0):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best, tries = max(best, 2 * n ** 3 / (time.perf_counter() - t0)), tries + 1
    logger.info("Measured %s %s matmul peak: %.1f GFLOP/s (MFU is relative to this).", device, dtype_name, best / 1e9)
    return best


def peak_memory_gb() -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB

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
import time

import torch

from trainer.model.params import numel

logger = logging.getLogger(__name__)

# Dense bf16 peaks (no sparsity), FLOP/s, from the vendors' data sheets.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
             "RTX 4090": 165e12, "A6000": 155e12, "V100": 125e12}


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
def device_peak_flops(dtype_name: str) -> float:
    """Peak FLOP/s of the device in the compute dtype: the data sheet on GPU, a measured matmul on CPU."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak if dtype_name != "float32" else peak / 2
        logger.warning("Unknown GPU %r: measuring its matmul peak for MFU.", name)
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

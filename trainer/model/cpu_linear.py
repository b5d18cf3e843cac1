"""fp32 linear layers through oneDNN instead of MKL while decoding on a CPU, where oneDNN is measured faster.

PyTorch's CPU build sends an fp32 F.linear to MKL's sgemm (bf16 already goes to oneDNN). A decode step multiplies a
handful of rows by every weight of the model; on the AMD EPYC (AVX-512) machines here MKL takes its slower path for
such shapes (batch-16 decode of SmolLM2-135M: 88 ms of linears a step through MKL, 64 through oneDNN; its 49152-row
lm_head alone 20 vs 10 ms), while on other CPUs MKL may be the faster one. So each process times both once, on one
decode-shaped product, and decoding takes the faster; the choice and both timings are in the log. The results agree
to fp32 rounding (a different summation order), like any two GEMM kernels. Training keeps F.linear (autograd).
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
_choice: dict[str, bool] = {}  # "cpu" -> oneDNN measured faster in this process


def _onednn(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _measure() -> bool:
    """Whether oneDNN multiplies 16 rows by a 1024 x 8192 fp32 weight faster than F.linear (best of 3 each, taken
    in turn so that a burst of load on this machine hits both)."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(16, 1024, generator=gen), torch.randn(8192, 1024, generator=gen)
    best = {"mkl": float("inf"), "onednn": float("inf")}
    with torch.no_grad():
        for _ in range(3):
            for name, fn in (("mkl", F.linear), ("onednn", _onednn)):
                start = time.perf_counter()
                fn(x, weight, None)
                best[name] = min(best[name], time.perf_counter() - start)
    faster = best["onednn"] < best["mkl"]
    logger.info("Decoding on CPU: fp32 linears through %s (16 x 1024 x 8192: oneDNN %.2f ms, MKL %.2f ms).",
                "oneDNN" if faster else "MKL (F.linear)", best["onednn"] * 1e3, best["mkl"] * 1e3)
    return faster


def whole_dense(weight) -> bool:
    """Whether the weight is the whole dense matrix here: not bitsandbytes-quantized, not a ZeRO-3 partition, not an
    FSDP2 shard."""
    from trainer.model.params import is_quantized

    if weight is None or is_quantized(weight) or hasattr(weight, "ds_id"):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return True
    return not (isinstance(weight, DTensor) or isinstance(getattr(weight, "data", None), DTensor))


def for_weight(weight: torch.Tensor):
    """The linear function a decode should use with this weight: oneDNN's for a whole dense fp32 CPU weight when
    this process measured it faster, else F.linear. Under autocast F.linear (it casts to the autocast dtype)."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.layout != torch.strided
            or torch.is_autocast_enabled("cpu") or not whole_dense(weight) or not _available()):
        return F.linear
    if "cpu" not in _choice:
        _choice["cpu"] = _measure()
    return _onednn if _choice["cpu"] else F.linear


@contextlib.contextmanager
def decoding_linears(model):
    """Within the block, every plain torch.nn.Linear of `model` with a dense fp32 CPU weight computes through
    for_weight's choice (PEFT's base, lora_A and lora_B layers included: they are plain Linear modules). A forward
    set on the instance (the output head's loss modes, model/wrapper.py: no generation runs in one) is set aside for
    the block; every module's own forward comes back after. Yields how many modules were switched."""
    swapped = []
    try:
        for module in model.modules():
            if type(module) is not torch.nn.Linear:
                continue  # a subclass (bitsandbytes, ...) computes something else
            fn = for_weight(module.weight)
            if fn is F.linear:
                continue
            swapped.append((module, module.__dict__.get("forward")))
            module.forward = _bound(fn, module)
        yield len(swapped)
    finally:
        restore_forwards(swapped)


def restore_forwards(swapped: list) -> None:
    """Each (module, its own instance forward or None) of a decoding swap back as it was: the instance forward put
    back, or the class's left to answer where the instance had none."""
    for module, own in swapped:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _bound(fn, module):
    def forward(x):
        return fn(x, module.weight, module.bias)

    return forward

"""LoRA merged into its base weight for the length of a no-grad decode (generation), the weights themselves untouched.

A decode step runs every adapted Linear on a handful of rows: PEFT's forward then costs three matmul calls (base, A,
B) and its Python per layer, where the merged weight W + s * B A costs one. For the duration of a `merged_for_decoding`
block each plain LoRA layer (one active adapter, no dropout, variant or bias: lean_ops._plain_adapter) answers with a
single linear on a merged copy; nothing is written into the parameters, so leaving the block restores the model
exactly (the copies are dropped, no subtraction). The product is the same map; its float rounding differs from the
three-matmul path at the last bits (tests/test_generation_merged.py bounds it and checks the sampled tokens).
Layers whose weight is quantized (bitsandbytes) or partitioned (ZeRO-3, FSDP2) keep PEFT's forward.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from trainer.model.cpu_linear import for_weight, restore_forwards, whole_dense
from trainer.model.lean_ops import _plain_adapter

logger = logging.getLogger(__name__)
_said = set()  # log each distinct outcome once a process, not once a generation


def _mergeable(layer) -> str | None:
    """The layer's adapter name when its delta can be folded into a whole, dense copy of its base weight."""
    name = _plain_adapter(layer)
    if name is None:
        return None
    if not whole_dense(getattr(layer.get_base_layer(), "weight", None)):
        return None  # a bitsandbytes, ZeRO-3 or FSDP2 weight is not the whole dense matrix here
    return name


@contextlib.contextmanager
def merged_for_decoding(model):
    """Within the block, every mergeable LoRA Linear of `model` runs as one linear on W + s * B A (cast once to the
    autocast dtype when autocast is on, as each call would cast it); yields the number of layers merged."""
    from peft.tuners.lora.layer import Linear

    swapped = []
    try:
        with torch.no_grad():
            for layer in model.modules():
                if type(layer) is not Linear:
                    continue
                name = _mergeable(layer)
                if name is None:
                    continue
                base = layer.get_base_layer()
                merged = base.weight + layer.get_delta_weight(name).to(base.weight.dtype)
                device = merged.device.type
                if torch.is_autocast_enabled(device):
                    merged = merged.to(torch.get_autocast_dtype(device))
                # the instance's own forward (lean_ops may have set one) comes back as it was
                swapped.append((layer, layer.__dict__.get("forward")))
                layer.forward = _linear(layer, merged, base.bias)
        _say(model, len(swapped))
        yield len(swapped)
    finally:
        restore_forwards(swapped)


def _linear(layer, weight, bias):
    linear = for_weight(weight)  # oneDNN's fp32 linear where this CPU runs it faster (model/cpu_linear.py)

    def forward(x, *args, **kwargs):
        if args or kwargs:  # a per-row adapter choice (adapter_names) is not one merged weight
            return type(layer).forward(layer, x, *args, **kwargs)
        return linear(x, weight, bias)

    return forward


def _say(model, merged: int) -> None:
    from peft.tuners.lora import LoraLayer

    adapted = sum(isinstance(m, LoraLayer) for m in model.modules())
    if not adapted or (merged, adapted) in _said:
        return
    _said.add((merged, adapted))
    if merged == adapted:
        logger.info("generation: the LoRA delta merged into a copy of each base weight while decoding (%d layers, one "
                    "matmul each instead of three); the weights themselves are untouched.", merged)
    else:
        logger.info("generation: the LoRA delta merged while decoding in %d of %d adapted layers; the other %d (a "
                    "variant, dropout, a bias on B, a quantized or partitioned base) run PEFT's forward.", merged,
                    adapted, adapted - merged)

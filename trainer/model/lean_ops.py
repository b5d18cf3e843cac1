"""Less kept for backward: RMSNorm and SwiGLU as the pure-torch counterparts of Liger's fused kernels, and
LoRA layers that do not copy their input.

Autograd keeps every intermediate an op needs for its backward. Under bf16, transformers' RMSNorm keeps an
fp32 copy of its input, and the MLP keeps silu(gate) beside gate and up. These two functions keep only
their inputs (and the per-token 1/rms) and recompute the rest in backward. They are applied to the
model's own modules after loading, only where a module computes exactly what these functions compute
(checked numerically on a small input, once per module class), and only when Liger's kernels are not in
use. PEFT casts each LoRA layer's input to the adapter's fp32 and autocast casts it back to bf16 for the
matmul, so every adapted layer kept its own bf16 copy of its input; under autocast the cast is skipped, and a
plain adapter runs as one addmm (fuse_lora_forward). A layer with a LoRA variant (DoRA) keeps PEFT's cast and
forward, and one with lora_dropout PEFT's forward. The rotary embedding runs as one multiply and two in-place
multiply-adds (lean_rotary), swapped into transformers' modeling module where its function computes the same.
On SmolLM2-135M with LoRA on all linear layers the decoder keeps 811 instead of 1103 KiB per token under
bf16, 1621 instead of 1801 in fp32 (python -m benchmarks.saved_activations).
"""

from __future__ import annotations

import collections
import inspect
import logging
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.params import is_quantized

logger = logging.getLogger(__name__)


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the normalisation in fp32 (as transformers does)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = (xf * rstd).to(x.dtype).float()
            grad_weight = (grad.float() * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).float()  # rounded as autograd rounds it for transformers' module
            # d(x * rstd)/dx applied to g: rstd * (g - xhat * mean(g * xhat)) with xhat = x * rstd, rewritten as
            # g * rstd - x * (rstd^3 * <g, x> / n): a fused dot and two in-place passes (half the time of the
            # formula as written, which makes a new [tokens x hidden] fp32 tensor at every step).
            k = torch.linalg.vecdot(g, xf).unsqueeze(-1).mul_(rstd.pow(3)).mul_(-1.0 / x.shape[-1])
            grad_x = g.mul_(rstd).addcmul_(xf, k).to(x.dtype)
        return grad_x, grad_weight, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        # The ops autograd runs for the stock module, in the activations' dtype (aten's silu_backward is one
        # fused pass): 3.5x faster in bf16 than the same formula spelled out in fp32, to bf16 precision.
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _rmsnorm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x):
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _is_rmsnorm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1)


def _is_swiglu(module: nn.Module) -> bool:
    # The activation is not checked by type (transformers has its own SiLU class): the numerical check is the test.
    return all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))


@torch.no_grad()
def _same_output(module: nn.Module, lean, width: int, dtype: torch.dtype) -> bool:
    """Does the module's own forward compute what the lean one does? (Gemma's 1 + weight, for one, does not.) `dtype`:
    the activations', for a module whose weights are all quantized (a SwiGLU MLP over bitsandbytes Linears)."""
    p = next(module.parameters())
    if width == 0 or p.numel() == 0:  # partitioned away (ZeRO-3): nothing here to compare with
        return False
    floating = next((q for q in module.parameters() if q.is_floating_point() and not is_quantized(q)), None)
    x = torch.randn(2, 3, width, dtype=floating.dtype if floating is not None else dtype, device=p.device)
    try:
        ours = lean(module, x)
        theirs = type(module).forward(module, x)
    except Exception:  # an unexpected signature or shape: leave the module alone
        return False
    return ours.shape == theirs.shape and torch.allclose(ours.float(), theirs.float(), rtol=1e-2, atol=1e-3)


def apply_lean_ops(model: nn.Module, classes: list[str] | None = None) -> list[str]:
    """Swap the forward of every matching RMSNorm / SwiGLU MLP module; returns the module classes swapped.
    `classes`: the verdict another process took on the same model's values (this one has none: meta weights)."""
    verdict: dict[type, bool] = {}
    activations = next((p.dtype for p in model.parameters() if p.is_floating_point() and not is_quantized(p)),
                       torch.get_default_dtype())
    for module in model.modules():
        if _is_rmsnorm(module):
            lean, width = _rmsnorm_forward, module.weight.shape[0]
        elif _is_swiglu(module):
            lean, width = _swiglu_forward, module.gate_proj.in_features
        else:
            continue
        cls = type(module)
        if cls not in verdict and classes is not None:
            verdict[cls] = cls.__name__ in classes
        elif cls not in verdict:
            verdict[cls] = _same_output(module, lean, width, activations)
            if not verdict[cls]:
                logger.info("%s left as it is: its forward differs from zerotune's lean op, or could not be "
                            "checked (weights partitioned by ZeRO-3).", cls.__name__)
        if verdict[cls]:
            module.forward = types.MethodType(lean, module)
    swapped = sorted(c.__name__ for c, ok in verdict.items() if ok)
    if swapped:
        logger.info("Lean RMSNorm/SwiGLU (pure torch, less kept for backward) in %s.", ", ".join(swapped))
    return swapped


class _Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), as one multiply and two in-place multiply-adds
    on the halves (transformers' form takes a negation, a concatenation, two multiplies and an add, and as many again
    in backward). Rounds once less in bf16 (the multiply-add), otherwise the same values."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        # The transpose of the rotation: d x1 = g1 cos1 + g2 sin2, d x2 = g2 cos2 - g1 sin1.
        dx = grad * cos
        dx[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        dx[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return dx.to(ctx.dtype), None, None


ROTARY_PARAMETERS = ("q", "k", "cos", "sin", "unsqueeze_dim")


def _lean_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (cos.requires_grad or sin.requires_grad or q.shape[-1] % 2 or cos.shape[-1] != q.shape[-1]
                or k.shape[-1] != q.shape[-1]):
            return original(q, k, cos, sin, unsqueeze_dim)  # partial rotary, trained tables: transformers' own
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)

    apply_rotary_pos_emb.zerotune_original = original
    return apply_rotary_pos_emb


@torch.no_grad()
def _rotary_matches(original) -> bool:
    try:
        if tuple(inspect.signature(original).parameters) != ROTARY_PARAMETERS:
            return False
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(2, 4, 5, 8, dtype=torch.float64, generator=g), torch.randn(2, 2, 5, 8, dtype=torch.float64,
                                                                                       generator=g)
        cos, sin = torch.randn(2, 5, 8, dtype=torch.float64, generator=g), torch.randn(2, 5, 8, dtype=torch.float64,
                                                                                      generator=g)
        theirs, ours = original(q, k, cos, sin), _lean_rotary(original)(q, k, cos, sin)
        return all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(theirs, ours))
    except Exception:  # another signature or layout: leave it alone
        return False


def lean_rotary(model: nn.Module) -> list[str]:
    """Give the modeling modules of the model's classes the lean rotary embedding, where theirs computes the same
    (checked numerically, once per module). transformers calls apply_rotary_pos_emb as a module-level function,
    so the swap is made there: every model of that architecture in this process takes it. Returns the modules."""
    swapped = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(name)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is None:
            continue
        if getattr(fn, "zerotune_original", None) is None:  # not swapped yet (the original stays on the swap)
            if not _rotary_matches(fn):
                continue
            module.apply_rotary_pos_emb = _lean_rotary(fn)
        swapped.append(name)
    if swapped:
        logger.info("Lean rotary embedding (one multiply and two multiply-adds) in %s.", ", ".join(swapped))
    return swapped


def _cast_unless_autocast(self, x, dtype):
    """PEFT's input cast, skipped where autocast already decides the matmul dtype."""
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        return x
    return type(self)._cast_input_dtype(self, x, dtype)


def _variant(layer) -> str | None:
    """The name of the LoRA variant (DoRA, ...) of one of the layer's active adapters, else None. A variant computes
    more than base + s * B(A(x)) (DoRA rescales each row by its magnitude over the norm of W + s * BA), so such a
    layer runs PEFT's code as it is: its forward and its input cast."""
    for name in layer.active_adapters:
        variant = layer.lora_variant.get(name) if hasattr(layer, "lora_variant") else None
        if variant is not None:
            short = type(variant).__name__.removesuffix("LinearVariant")
            return {"Dora": "DoRA"}.get(short, short)
    return None


def lean_lora_inputs(model: nn.Module) -> int:
    """Give every PEFT LoRA layer without a variant the autocast-aware input cast; returns how many layers."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "_cast_input_dtype")
              and _variant(m) is None]
    for m in layers:
        m._cast_input_dtype = types.MethodType(_cast_unless_autocast, m)
    return len(layers)


def _unfused_reason(layer) -> str | None:
    """Why the layer's active adapter is not plain base + s * B(A(x)) (a variant, dropout on its input, a bias on B),
    else None. rsLoRA (another scale) and PiSSA (another start, the residual in the base) are plain LoRA here."""
    variant = _variant(layer)
    if variant:
        return variant
    for name in layer.active_adapters:
        if name in layer.lora_A:
            dropout = layer.lora_dropout[name]
            if not isinstance(dropout, nn.Identity):
                return f"lora_dropout {getattr(dropout, 'p', '?')}"
            if layer.lora_B[name].bias is not None:
                return "a bias on lora_B"
    return None


def _plain_adapter(layer) -> str | None:
    """The one active vanilla LoRA adapter of a layer (no dropout, variant, bias or merge), else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or _unfused_reason(layer):
        return None
    name = active[0]
    if hasattr(layer.lora_B[name].weight, "ds_id"):  # ZeRO-3 gathers lora_B's weight only when lora_B itself is called
        return None
    return name


def _fused_lora_forward(self, x, *args, **kwargs):
    """base(x) + s * B(A(x)) as one addmm under autocast: the scale goes into B's (tiny) weight and the sum into the
    matmul's accumulator, so the [tokens x out] product is neither scaled nor added in passes of their own, forward
    or backward (PEFT runs both, for every adapted layer). Anything else runs PEFT's own forward."""
    name = _plain_adapter(self)
    if name is None or args or kwargs or not torch.is_autocast_enabled(x.device.type):
        return type(self).forward(self, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    base = self.base_layer(flat)
    up = (self.lora_B[name].weight * self.scaling[name]).T.to(base.dtype)  # what autocast would cast it to
    # In place on the base output itself (autograd keeps a linear's input, not its output; in place on a view of it
    # would make autograd copy the gradient back): an out-of-place addmm first copies the [tokens x out] product
    # into a new tensor, a memory pass per adapted layer.
    base.addmm_(self.lora_A[name](flat), up)
    return base.view(*x.shape[:-1], base.shape[-1])


def fuse_lora_forward(model: nn.Module) -> int:
    """Give every PEFT LoRA Linear whose adapter is plain LoRA the fused forward, and say in the log which layers run
    which forward; returns how many layers are fused."""
    from peft.tuners.lora.layer import Linear

    fused, kept = 0, collections.Counter()
    for m in model.modules():
        if type(m) is not Linear:
            continue
        why = _unfused_reason(m)
        if why:
            kept[why] += 1
            continue
        m.forward = types.MethodType(_fused_lora_forward, m)
        fused += 1
    if kept:
        logger.info("LoRA forward: PEFT's own on %d layers (%s)%s.", sum(kept.values()),
                    ", ".join(f"{why}: {n}" for why, n in sorted(kept.items())),
                    f"; the fused addmm on the other {fused} (plain LoRA)" if fused else "")
    elif fused:
        logger.info("LoRA forward: one fused addmm for all %d adapted Linear layers under bf16/fp16 autocast (PEFT's "
                    "own forward without autocast).", fused)
    return fused


def lean_lora(model: nn.Module) -> None:
    """Both LoRA changes: no fp32 input copy under autocast, and the fused forward. The fused addmm reads the base
    weight, so a LoRA layer over a bitsandbytes base (4-bit packed or int8) runs PEFT's own forward for it, which
    calls the quantized layer: said in the log."""
    from peft.tuners.lora import LoraLayer

    lean_lora_inputs(model)
    fused = fuse_lora_forward(model)
    own: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, LoraLayer) and is_quantized(getattr(m.get_base_layer(), "weight", None)):
            own[type(m).__name__] = own.get(type(m).__name__, 0) + 1
    if own:
        logger.info("LoRA forward: %s over a bitsandbytes base run PEFT's own forward (the fused addmm reads the base "
                    "weight, which is quantized there)%s.", ", ".join(f"{n} {name}" for name, n in sorted(own.items())),
                    f"; {fused} layers fused (one addmm)" if fused else "")

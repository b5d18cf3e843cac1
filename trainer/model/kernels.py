"""Attention and fused kernels: the fastest correct path the machine has, and a log line saying which.

`segment_attention` is registered with transformers as the attention implementation "zerotune_segments".
A padding-free batch holds many examples end to end; full masked attention over it costs T^2 per layer,
most of it on pairs a block-diagonal mask then throws away. This path runs causal SDPA on each example's
own block instead (sum of L_i^2). It reads the example boundaries from the batch's cu_seq_lens (the
collator computes them once per batch: the same layout FlashAttention-2 varlen reads), converted to host
integers once per forward pass, not once per layer. It is the pure-torch counterpart of FlashAttention-2
varlen, for CPUs and GPUs without flash-attn. On the CPU in bf16 each segment runs cpu_attention's chunked
matmuls rather than SDPA's flash kernel (1.5-2.2x faster there, same mask, eager attention's rounding).

Sequences can share a prompt (the batch's `shared_prefix`: per segment, how many tokens it also attends to at
the start of the nearest segment before it that shares nothing: a preference pair's rejected sequence reads its
chosen one's prompt, the 2nd..Gth completions of a grpo group read the first one's). Its queries then see those
prompt keys and its own, causally aligned bottom-right (query i of n sees the k shared keys and its own first
i + 1): exactly what it would see after the prompt in a sequence of its own. On a CUDA GPU with flash-attn the
whole row is one FlashAttention-2 varlen call over keys gathered per segment (the shared prompt keys copied in
front of each sequence that uses them); elsewhere it is SDPA per segment with that mask.

It is registered with a mask function too, so a padded batch (batched, left-padded generation; the padded
layout) gets its attention mask and runs plain SDPA with it; a batch without padding gets no mask built.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.model import cpu_attention

logger = logging.getLogger(__name__)

SEGMENTS = "zerotune_segments"


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example: a new one starts wherever the position does not go up by one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[1]
    bounds = []
    for row in starts:
        s = row.nonzero().flatten().tolist()
        bounds.append(list(zip(s, s[1:] + [length])))
    return bounds


class _PerForward:
    """What every layer of one forward pass would compute alike from the same tensor: computed once."""

    def __init__(self, compute):
        self.compute, self.key, self.value = compute, None, None

    def __call__(self, key: torch.Tensor):
        if self.key is not key:
            self.key, self.value = key, self.compute(key)
        return self.value


_layout_lengths = _PerForward(lambda cu: cu.diff().tolist())  # one host sync a forward pass, not a layer
def _sources(prefixes: list[int]) -> list[tuple[int, int]]:
    """Per segment, (tokens it shares, the segment they are read from): the nearest segment before it that shares
    none (it holds the whole prompt)."""
    out, source = [], 0
    for i, shared in enumerate(prefixes):
        if not shared:
            source = i
        out.append((shared, source))
    return out


_layout_prefixes = _PerForward(lambda shared: _sources(shared.tolist()))
_position_lengths = _PerForward(lambda pos: [[e - s for s, e in row] for row in segment_bounds(pos)])


def _row_lengths(batch: int, q_len: int, position_ids, cu_seq_lens, segment_lengths=None) -> list[list[int]]:
    """Per row, the lengths of the examples laid end to end in it."""
    if cu_seq_lens is not None:
        if batch != 1:
            raise ValueError("cu_seq_lens describe one row of examples laid end to end; got a batch of several rows")
        if segment_lengths is not None and sum(segment_lengths) == q_len:  # the collator's host copy: no read-back
            return [list(segment_lengths)]
        return [_layout_lengths(cu_seq_lens)]
    if position_ids is None:
        return [[q_len]] * batch
    # A caller without the collator's layout (packed position_ids only): boundaries from the restarts.
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    return _position_lengths(position_ids)


def _flash_fits(query: torch.Tensor) -> bool:
    return _flash_device(query) and _flash_bottom_right()


def _flash_device(query: torch.Tensor) -> bool:
    """flash-attn's kernels take CUDA tensors in fp16 or bf16 only."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def _flash_bottom_right() -> bool:
    """flash-attn >= 2.1 aligns its causal mask bottom-right when a sequence has more keys than queries, which is
    what a shared prompt needs; older releases align it top-left (then: SDPA per segment). Decided once (probe)."""
    return flash_status().bottom_right


def _flash_varlen():
    """flash-attn's varlen function, where this machine has it for these tensors (None: SDPA per segment)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      position_ids=None, cu_seq_lens_q=None, shared_prefix=None, segment_lengths=None, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or q_len != kv_len:
        # Padding (its mask came from segment_mask) or generation with a KV cache: the standard path.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    p = dropout if module.training else 0.0
    row_lengths = _row_lengths(query.shape[0], q_len, position_ids, cu_seq_lens_q, segment_lengths)
    prefixes = _layout_prefixes(shared_prefix) if shared_prefix is not None else None
    # flash-attn first where it is installed and passed its probe: the user built it on purpose, it has FA3's Hopper
    # kernels behind the same call, and its causal mask is proven bottom-right aligned for shared prompts (>= 2.1).
    # Then PyTorch's own varlen flash attention (no wheel to build), for batches without shared prompts and without
    # dropout (it has neither a documented key alignment nor dropout); then SDPA per segment.
    if _flash_fits(query):
        return _flash_rows(query, key, value, row_lengths, prefixes, p, scaling), None
    if prefixes is None and p == 0.0 and _varlen_fits(query):
        return _varlen_rows(query, key, value, row_lengths, cu_seq_lens_q, scaling), None
    gqa = query.shape[1] != key.shape[1]
    chunked = cpu_attention.fits(query, p)  # the CPU's faster bf16 path (same causal alignment as the mask below)
    if chunked:  # as bf16 autocast would cast them for SDPA, once for the whole batch
        query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # unbind/split/cat rather than slice assignment: their backward is one stack/cat per row, where
    # every sliced read or write would allocate and zero a full-size gradient in backward (measured: ~15%
    # of a packed SmolLM2 step went to those zero fills and copies).
    rows = []
    for q_row, k_row, v_row, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), row_lengths):
        shares = prefixes or [(0, i) for i in range(len(lengths))]
        ks, vs = k_row.split(lengths, 1), v_row.split(lengths, 1)
        pieces = []
        for i, q in enumerate(q_row.split(lengths, 1)):
            (shared, source), k, v, mask = shares[i], ks[i], vs[i], None
            if shared:  # the prompt keys at the start of the source segment, then its own: bottom-right causal
                k, v = torch.cat([ks[source][:, :shared], k], 1), torch.cat([vs[source][:, :shared], v], 1)
            if chunked:
                pieces.append(cpu_attention.attention(q, k, v, scale).transpose(0, 1))
                continue
            if shared:
                mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril(diagonal=shared)
            pieces.append(F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                                         dropout_p=p, is_causal=mask is None, scale=scaling,
                                                         enable_gqa=gqa)[0].transpose(0, 1))
        rows.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0].contiguous())
    return torch.stack(rows), None


def _flash_rows(query, key, value, row_lengths, prefixes, dropout: float, scaling):
    """All rows' segments as one FlashAttention-2 varlen call: [B, T, H, D]. A segment that shares a prompt gets
    the prompt's keys and values copied in front of its own; flash-attn's causal mask is aligned bottom-right when
    a segment has more keys than queries, which is exactly the attention that segment needs."""
    q = query.transpose(1, 2).reshape(-1, query.shape[1], query.shape[3])  # [B*T, H, D]
    k_rows, v_rows, cu_q, cu_k = [], [], [0], [0]
    for b, lengths in enumerate(row_lengths):
        shares = prefixes or [(0, i) for i in range(len(lengths))]
        ks, vs = key[b].transpose(0, 1).split(lengths), value[b].transpose(0, 1).split(lengths)  # [n, Hkv, D] each
        for i, n in enumerate(lengths):
            shared, source = shares[i]
            if shared:
                k_rows += [ks[source][:shared], ks[i]]
                v_rows += [vs[source][:shared], vs[i]]
            else:
                k_rows.append(ks[i])
                v_rows.append(vs[i])
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + n + shared)
    device = query.device
    cu_q_t = torch.tensor(cu_q, dtype=torch.int32, device=device)
    cu_k_t = torch.tensor(cu_k, dtype=torch.int32, device=device)
    max_q = max(n for lengths in row_lengths for n in lengths)
    max_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))
    out = _flash_varlen()(q, torch.cat(k_rows), torch.cat(v_rows), cu_q_t, cu_k_t, max_q, max_k, dropout_p=dropout,
                          softmax_scale=scaling, causal=True)
    return out.view(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def _varlen_fits(query: torch.Tensor) -> bool:
    return _flash_device(query) and varlen_status().usable


def _varlen_function():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _varlen_rows(query, key, value, row_lengths, cu_seq_lens, scaling):
    """All rows' segments as one call of torch.nn.attention.varlen.varlen_attn: [B, T, H, D]. The collator's
    cu_seq_lens are used as they are (already on the device); only a caller without them (position_ids alone, or
    several rows) has its boundaries built here, once a forward."""
    status = varlen_status()
    b, h, t, d = query.shape
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    extra = dict(status.causal)
    if k.shape[1] != h:
        if status.gqa:
            extra["enable_gqa"] = True
        else:  # a varlen_attn without grouped heads: each key/value head repeated for its group of query heads
            k, v = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (k, v))
    if cu_seq_lens is None or b != 1:
        cu_seq_lens = _varlen_cu(row_lengths, query.device)
    longest = max(n for lengths in row_lengths for n in lengths)
    out = _varlen_function()(q, k, v, cu_seq_lens, cu_seq_lens, longest, longest, scale=scaling, **extra)
    return out.view(b, t, h, d)


_cu_cache: dict = {}


def _varlen_cu(row_lengths, device) -> torch.Tensor:
    """cu_seq_lens over every row's segments, built once for each layout (not once per layer)."""
    key = (tuple(map(tuple, row_lengths)), str(device))
    if key not in _cu_cache:
        _cu_cache.clear()  # one layout alive at a time: the current forward's
        starts = [0, *itertools.accumulate(n for lengths in row_lengths for n in lengths)]
        _cu_cache[key] = torch.tensor(starts, dtype=torch.int32, device=device)
    return _cu_cache[key]


def segment_mask(*args, attention_mask=None, **kwargs):
    """The mask function of zerotune_segments: SDPA's mask where the batch has padding, none otherwise (the
    segments come from cu_seq_lens or position_ids, and a [T x T] mask would cost memory for nothing)."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENTS, segment_attention)
    AttentionMaskInterface.register(SEGMENTS, segment_mask)


@dataclass(frozen=True)
class FlashStatus:
    usable: bool
    bottom_right: bool = False  # >= 2.1: a shared prompt's causal mask is right
    why: str = ""


def _probe_flash(device: str) -> FlashStatus:
    """Import flash-attn, read its release and call its varlen function once on `device`: a wheel built for another
    torch, a broken install or a package that only borrows the `flash_attn` name (FlashAttention-4) fails here, at
    start, instead of at the first forward."""
    if importlib.util.find_spec("flash_attn") is None:
        return FlashStatus(False, why="flash-attn is not installed")
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("flash-attn")
    except PackageNotFoundError:
        return FlashStatus(False, why="a `flash_attn` module without the flash-attn distribution (FlashAttention-4's "
                                      "package?) does not offer the FlashAttention-2 API zerotune calls")
    try:
        from flash_attn import flash_attn_varlen_func

        q = torch.randn(4, 2, 16, device=device, dtype=torch.bfloat16)
        cu = torch.tensor([0, 1, 4], device=device, dtype=torch.int32)
        out = flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, causal=True)
        if not torch.isfinite(out.float()).all():
            raise RuntimeError("non-finite output")
    except Exception as err:  # noqa: BLE001 — any failure means: do not use it
        return FlashStatus(False, why=f"flash-attn {release} failed a smoke call ({type(err).__name__}: {err})")
    parts = tuple(int(p) for p in re.findall(r"\d+", release)[:2])
    return FlashStatus(True, bottom_right=parts >= (2, 1), why=f"flash-attn {release}")


@functools.cache
def flash_status() -> FlashStatus:
    """flash-attn on this process's GPU, probed once (the segment path asks at every layer)."""
    if not torch.cuda.is_available():
        return FlashStatus(False, why="no CUDA GPU")
    status = _probe_flash("cuda")
    if not status.usable and "not installed" not in status.why:
        logger.warning("flash-attn left out: %s; attention runs on zerotune_segments/SDPA instead.", status.why)
    return status


def has_flash_attn() -> bool:
    return flash_status().usable


@dataclass(frozen=True)
class VarlenStatus:
    usable: bool
    gqa: bool = False  # takes fewer key/value heads than query heads (enable_gqa)
    causal: tuple = ()  # the keyword that asks this torch's varlen_attn for causal attention, as (name, value) pairs
    why: str = ""


def _probe_varlen(device: str) -> VarlenStatus:
    """Find torch.nn.attention.varlen.varlen_attn, learn how this torch asks it for causal attention (torch 2.13:
    window_size=(-1, 0); earlier: is_causal=True), and run it forward and backward once on `device` against SDPA per
    segment: a torch without it, or a GPU its kernel does not support, fails here with the reason."""
    try:
        fn = _varlen_function()
    except ImportError:
        return VarlenStatus(False, why=f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        causal = (("window_size", (-1, 0)),)
    elif "is_causal" in params:
        causal = (("is_causal", True),)
    else:
        return VarlenStatus(False, why="this torch's varlen_attn takes neither window_size nor is_causal")
    why = ""
    for gqa in ((True, False) if "enable_gqa" in params else (False,)):
        try:
            _smoke_varlen(fn, dict(causal), gqa, device)
            return VarlenStatus(True, gqa=gqa, causal=causal, why=f"torch {torch.__version__}")
        except Exception as err:  # noqa: BLE001 — any failure means: do not use it (this way)
            why = f"varlen_attn failed a smoke call ({type(err).__name__}: {err})"
    return VarlenStatus(False, why=why)


def _smoke_varlen(fn, causal: dict, gqa: bool, device: str) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(5, 4, 64, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    kv = torch.randn(5, 2 if gqa else 4, 64, device=device, dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0, 2, 5], device=device, dtype=torch.int32)
    out = fn(q, kv, kv, cu, cu, 3, 3, **causal, **({"enable_gqa": True} if gqa else {}))
    out.float().sum().backward()
    full = kv.repeat_interleave(4 // kv.shape[1], dim=1)
    want = torch.cat([F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, full, full)),
                                                     is_causal=True).transpose(0, 1) for a, b in ((0, 2), (2, 5))])
    if not (torch.isfinite(q.grad.float()).all() and torch.allclose(out.float(), want.float(), atol=2e-2)):
        raise RuntimeError("its output differs from SDPA's per segment")


@functools.cache
def varlen_status() -> VarlenStatus:
    """PyTorch's varlen flash attention on this process's GPU, probed once; where it fails the log says why."""
    if not torch.cuda.is_available():
        return VarlenStatus(False, why="no CUDA GPU")
    status = _probe_varlen("cuda")
    if not status.usable:
        logger.warning("PyTorch's varlen_attn left out: %s; padding-free batches run SDPA per segment instead.",
                       status.why)
    return status


LIGER_MIN = (0, 8, 5)  # earlier releases scale reduction="none" gradients by the first token's upstream grad


def _probe_liger() -> str:
    """'' when liger-kernel imports and is recent enough, else why not (an import that fails — a broken Triton,
    a wheel for another torch — is a reason, not a crash)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("liger-kernel")
        importlib.import_module("liger_kernel.transformers")  # imports Triton and the kernels
    except (PackageNotFoundError, Exception) as err:  # noqa: BLE001
        return f"liger-kernel does not import ({type(err).__name__}: {err})"
    parts = tuple(int(p) for p in re.findall(r"\d+", release)[:3])
    if parts < LIGER_MIN:
        return f"liger-kernel {release} is older than {'.'.join(map(str, LIGER_MIN))}"
    return ""


@functools.cache
def liger_problem() -> str:
    """Why Liger cannot run in this process ('' when it can), decided once."""
    return "no CUDA GPU" if not torch.cuda.is_available() else _probe_liger()


def liger_available() -> bool:
    return not liger_problem()


def liger_patch_arguments(patch) -> dict:
    """The keyword arguments zerotune wants of a model's Liger patch, those its signature takes (Gemma's patch has
    geglu where Llama's has swiglu): Liger's own fused loss stays off (the wrapper's loss head uses it)."""
    wanted = dict(rope=True, rms_norm=True, swiglu=True, geglu=True, layer_norm=True, cross_entropy=False,
                  fused_linear_cross_entropy=False)
    taken = inspect.signature(patch).parameters
    return {k: v for k, v in wanted.items() if k in taken}


def apply_liger(model_type: str, enabled: bool) -> bool:
    """Patch the model class with Liger's fused kernels (RMSNorm, RoPE, SwiGLU) before it is built.

    Liger's fused linear cross-entropy comes in through the model wrapper's loss head instead (so the
    loss path stays the one every stage uses). Liger needs triton on a CUDA GPU; elsewhere the
    pure-torch path runs and the log says so.
    """
    if not enabled:
        return False
    if not torch.cuda.is_available():
        logger.warning("enable_liger_kernel: true, but there is no CUDA GPU; using the pure-torch kernels.")
        return False
    if not liger_available():
        logger.warning("enable_liger_kernel: true, but %s (pip install 'zerotune[gpu]'); using the pure-torch "
                       "kernels.", liger_problem())
        return False
    from liger_kernel import transformers as liger

    patch = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if patch is None:
        logger.warning("Liger has no kernels for model type %r; using the pure-torch kernels.", model_type)
        return False
    arguments = liger_patch_arguments(patch)
    patch(**arguments)
    logger.info("Liger kernels applied to %s (%s).", model_type, ", ".join(k for k, v in arguments.items() if v))
    return True

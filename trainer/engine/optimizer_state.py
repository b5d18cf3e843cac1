"""Bytes of optimizer state per trained parameter, for `zerotune check`'s memory plan: what each package really keeps
(read from their step functions), counted over the trained tensors' shapes, so no model or optimizer is built.

fp32 AdamW keeps two moments (8 bytes a parameter); bitsandbytes' 8-bit AdamW two uint8 states plus one fp32 absmax
per 256-value block each (2.03 bytes), and 32-bit states for embeddings and tensors under 4096 values; Muon one
fp32 momentum (4); Adam-mini one first moment and one second moment per head / row / tensor (~4); GaLore and APOLLO
their moments on the rank-r projection plus the projection matrix; BAdam Adam's moments and an fp32 copy for the
active block only.
"""

from __future__ import annotations

from trainer.engine.optimizer_options import ADAMW_OPTIMS, OptimizerArguments, chosen_method
from trainer.model.adapters import OUTPUT_LAYERS

Shapes = list[tuple[str, tuple[int, ...]]]  # (name, shape) of each trained tensor

BNB_BLOCK, BNB_MIN_8BIT = 256, 4096  # bitsandbytes' blockwise quantization and min_8bit_size defaults
# `optim` -> (bytes a parameter of its state, what they are). Factored and 8-bit optimizers are computed per tensor.
PLAIN = {"adamw_torch": (8, "two fp32 moments"), "adamw_torch_fused": (8, "two fp32 moments"),
         "adamw_torch_xla": (8, "two fp32 moments"), "adamw_torch_npu_fused": (8, "two fp32 moments"),
         "adamw_anyprecision": (8, "two moments"), "paged_adamw_32bit": (8, "two fp32 moments"),
         "ademamix": (12, "three fp32 moments"), "paged_ademamix_32bit": (12, "three fp32 moments"),
         "sgd": (0, "none (no momentum)"), "adagrad": (4, "a sum of squares"), "rmsprop": (4, "a square average"),
         "rmsprop_bnb": (4, "a square average"), "rmsprop_bnb_32bit": (4, "a square average"),
         "lion_32bit": (4, "one fp32 moment"), "paged_lion_32bit": (4, "one fp32 moment"),
         "stable_adamw": (8, "two fp32 moments"), "schedule_free_adamw": (8, "two fp32 buffers"),
         "schedule_free_radam": (8, "two fp32 buffers"), "schedule_free_sgd": (4, "one fp32 buffer"),
         "grokadamw": (12, "three fp32 buffers")}
EIGHT_BIT = {"adamw_bnb_8bit": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2, "ademamix_8bit": 3,
             "paged_ademamix_8bit": 3, "lion_8bit": 1, "paged_lion_8bit": 1, "rmsprop_bnb_8bit": 1}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _is_embedding(name: str) -> bool:
    return "embed" in name.lower()


def _hidden(name: str, shape) -> bool:
    """A 2-D matrix that is neither an embedding nor an output head (engine/optimizers.py's Muon rule)."""
    return len(shape) == 2 and not _is_embedding(name) and not set(name.split(".")) & set(OUTPUT_LAYERS)


def optim_bytes(optim: str, name: str, shape) -> float:
    """State bytes of one tensor under transformers' `optim` (unknown names count as AdamW's 8 a parameter)."""
    n = _numel(shape)
    if optim in EIGHT_BIT:
        if n < BNB_MIN_8BIT or _is_embedding(name):  # transformers keeps embeddings' states in 32 bits
            return 4.0 * EIGHT_BIT[optim] * n
        blocks = -(-n // BNB_BLOCK)
        return EIGHT_BIT[optim] * (n + 4 * blocks)
    if optim == "adafactor":  # factored second moment (rows + columns), no first moment (transformers' defaults)
        return 4.0 * (shape[0] + _numel(shape[1:])) if len(shape) >= 2 else 4.0 * n
    return float(PLAIN.get(optim, (8, ""))[0] * n)


def optim_described(optim: str) -> str:
    if optim in EIGHT_BIT:
        return f"{optim}: {EIGHT_BIT[optim]} 8-bit states + absmax per {BNB_BLOCK} (embeddings and small tensors fp32)"
    if optim == "adafactor":
        return "adafactor: a factored second moment (rows + columns)"
    if optim in PLAIN:
        return f"{optim}: {PLAIN[optim][0]} B/param, {PLAIN[optim][1]}"
    return f"{optim}: state size not known here, counted as AdamW's 8 B/param"


def _projected_bytes(shape, rank: int, proj_type: str, moment_bytes: float) -> float:
    """GaLore / APOLLO on an m x n weight: the moments live on the rank-r projection of the gradient, plus the
    projection matrix (fp32). std projects the larger side down (moments r x max, projection r x min)."""
    m, n = int(shape[0]), _numel(shape[1:])
    small, large = min(m, n), max(m, n)
    r = min(rank, small)
    if proj_type == "full":
        return 4.0 * r * (m + n) + moment_bytes * r * r
    if proj_type == "reverse_std":
        small, large = large, small
    elif proj_type in ("right", "left"):
        kept = m if proj_type == "right" else n
        return 4.0 * r * (m + n - kept) + moment_bytes * r * kept
    return 4.0 * r * small + moment_bytes * r * large


def state_plan(options: OptimizerArguments, optim: str, shapes: Shapes, block_shapes: Shapes | None = None
               ) -> tuple[float, str]:
    """(bytes of optimizer state, a line saying what holds them) for the trained tensors `shapes`; BAdam counts
    `block_shapes`, its largest block, the only one with state at a time."""
    method = chosen_method(options)
    total_params = sum(_numel(s) for _, s in shapes) or 1
    if method is None or method == "loraplus":
        total = sum(optim_bytes(optim, n, s) for n, s in shapes)
        what = optim_described(optim) + (" (LoRA+ groups)" if method else "")
    elif method == "muon":
        muon = [(n, s) for n, s in shapes if _hidden(n, s)]
        rest = [(n, s) for n, s in shapes if not _hidden(n, s)]
        total = 4.0 * sum(_numel(s) for _, s in muon) + sum(optim_bytes(optim, n, s) for n, s in rest)
        what = (f"Muon (torch.optim.Muon, one fp32 momentum: 4 B/param) on {len(muon)} 2-D hidden matrices, "
                f"{optim_described(optim)} on the other {len(rest)} tensors")
    elif method == "adam_mini":
        total = sum(8.0 * _numel(s) if "bias" in n else 4.0 * _numel(s) + 4.0 * (s[0] if len(s) >= 2 else 1)
                    for n, s in shapes)
        what = "Adam-mini: one fp32 first moment per parameter, one second moment per head, row or tensor"
    elif method in ("galore", "apollo"):
        rank = getattr(options, f"{method}_rank")
        proj = options.apollo_proj_type if method == "apollo" else options.galore_proj_type
        moments = 8.0 if optim in ADAMW_OPTIMS or method == "apollo" else \
            2.0 if "8bit" in optim else 4.0  # 8-bit AdamW; adafactor's factored moment, roughly
        targets = _projected_names(options, method, shapes)
        total = sum(_projected_bytes(s, rank, proj, moments) if n in targets else optim_bytes(optim, n, s)
                    for n, s in shapes)
        what = (f"{'GaLore' if method == 'galore' else 'APOLLO'} rank {rank}: moments on the projected gradient of "
                f"{len(targets)} Linear weights plus the projection, {optim_described(optim)} elsewhere")
    else:  # badam
        block = block_shapes or shapes
        total = 12.0 * sum(_numel(s) for _, s in block)
        what = ("BAdam: AdamW's two moments and an fp32 copy (12 B/param) for the active block only "
                f"({sum(_numel(s) for _, s in block) / 1e6:.2f}M parameters)")
    return total, f"{what}: {total / 2**20:.1f} MiB, {total / total_params:.2f} B per trained parameter"


def _projected_names(options: OptimizerArguments, method: str, shapes: Shapes) -> set[str]:
    """The 2-D weights whose layer's name holds a target (`all`: every 2-D weight but embeddings and heads)."""
    targets = [t.strip() for t in str(getattr(options, f"{method}_target")).split(",") if t.strip()]
    every = targets in (["all"], ["all-linear"])
    return {name for name, shape in shapes if _hidden(name, shape)
            and (every or any(t in name.rsplit(".", 1)[0] for t in targets))}

"""rope_scaling (LLaMA-Factory's key): stretch a RoPE model's context to cutoff_len.

As LLaMA-Factory computes it: the factor is ceil(model_max_length / the model's max_position_embeddings (or its
original one)), model_max_length being cutoff_len in training; at inference (chat, export) with no
model_max_length the factor is 2. Unlike LLaMA-Factory, which sets config.rope_scaling, the scaling is written
into transformers 5's rope_parameters next to what they hold: setting rope_scaling there replaces the dict and
drops rope_theta (measured with transformers 5.24), which would silently change every rotary frequency.
"""

from __future__ import annotations

import logging
import math

from trainer.errors import ConfigError

logger = logging.getLogger(__name__)

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")


def _scaled(params: dict, kind: str, factor: float, original: int) -> dict:
    out = {**params, "rope_type": kind, "factor": factor}
    if kind in ("dynamic", "yarn", "llama3"):
        out["original_max_position_embeddings"] = original
    if kind == "llama3":
        out.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return out


def configure_rope(config, kind: str | None, model_max_length: int | None) -> None:
    """Write the scaling into the model config before the model is built (nothing when kind is None)."""
    if kind is None:
        return
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not hasattr(config, "max_position_embeddings"):
        raise ConfigError(f"rope_scaling: {kind}: this model ({config.model_type}) has no RoPE parameters to scale.")
    nested = bool(params) and all(isinstance(v, dict) for v in params.values())  # per layer type (Gemma 3)
    firsts = list(params.values()) if nested else [params]
    original = next((p["original_max_position_embeddings"] for p in firsts
                     if p.get("original_max_position_embeddings")), config.max_position_embeddings)
    if model_max_length is not None:
        if model_max_length <= original:
            logger.warning("rope_scaling: %s not applied: cutoff_len %d fits the model's %d positions.", kind,
                           model_max_length, original)
            return
        factor = float(math.ceil(model_max_length / original))
    else:
        factor = 2.0
    config.rope_parameters = ({k: _scaled(v, kind, factor, original) for k, v in params.items()} if nested
                              else _scaled(params, kind, factor, original))
    config.max_position_embeddings = int(original * factor)
    logger.info("rope_scaling: %s, factor %g: positions %d -> %d%s.", kind, factor, original,
                config.max_position_embeddings, " (dynamic NTK scaling may not suit fine-tuning)"
                if kind == "dynamic" else "")

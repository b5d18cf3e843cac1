"""rope_scaling as LLaMA-Factory computes it (factor ceil(cutoff_len / positions), 2 at inference), written into
transformers 5's rope_parameters with rope_theta kept; the model trains with the stretched rotary table."""

import pytest
import torch

from tiny import base_config, train_with
from trainer.errors import ConfigError
from trainer.model.rope import configure_rope


def _config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                       **kw)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_factor_and_parameters(kind):
    config = _config()
    configure_rope(config, kind, 3000)
    p = config.rope_parameters
    assert p["rope_type"] == kind and p["factor"] == 3.0 and p["rope_theta"] == 50000.0  # LF's setattr drops theta
    assert config.max_position_embeddings == 3072
    assert ("original_max_position_embeddings" in p) == (kind != "linear")
    if kind == "llama3":
        assert (p["low_freq_factor"], p["high_freq_factor"]) == (1.0, 4.0)


def test_linear_scaling_divides_the_frequencies_by_the_factor():
    """Independent reference: linear (position interpolation) rotary angles are position / factor x inv_freq."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    plain, scaled = _config(hidden_size=64, num_attention_heads=4), _config(hidden_size=64, num_attention_heads=4)
    configure_rope(scaled, "linear", 4096)
    x = torch.zeros(1, 8, 64)
    pos = torch.arange(8)[None] * 4
    cos_scaled, _ = LlamaRotaryEmbedding(scaled)(x, pos)
    cos_plain, _ = LlamaRotaryEmbedding(plain)(x, pos // 4)
    torch.testing.assert_close(cos_scaled, cos_plain)


def test_short_cutoff_and_inference():
    config = _config()
    configure_rope(config, "linear", 512)  # fits: left alone (with a warning)
    assert config.rope_parameters["rope_type"] == "default"
    configure_rope(config, "yarn", None)  # chat / export: factor 2
    assert config.rope_parameters["factor"] == 2.0 and config.max_position_embeddings == 2048


def test_a_model_without_rope_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match="no RoPE parameters"):
        configure_rope(GPT2Config(), "linear", 4096)


def test_training_with_rope_scaling(tiny_model_dir, data_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    _, state = train_with(base_config(tiny_model_dir, data_dir, tmp_path / "o", max_steps=2, cutoff_len=2500,
                                      rope_scaling="linear"))
    assert state["global_step"] == 2
    assert "rope_scaling: linear, factor 3: positions 1024 -> 3072" in caplog.text

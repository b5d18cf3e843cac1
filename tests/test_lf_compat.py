"""LLaMA-Factory keys zerotune does not take as they are: every refused feature is named in its message, ignored keys
say so, and no refused key shadows a key zerotune does support."""

import pytest

from tiny import base_config
from trainer import lf_compat
from trainer.config import owners
from trainer.run import build_config
from trainer.errors import ConfigError

CASES = [(keys[0], feature) for feature, (keys, _) in lf_compat.REFUSED.items()]


@pytest.mark.parametrize("key,feature", CASES)
def test_each_refused_feature_is_named(key, feature, tmp_path):
    with pytest.raises(ConfigError) as err:
        build_config(base_config(tmp_path, tmp_path, tmp_path / "o", **{key: 1}))
    message = str(err.value)
    assert message.startswith(f"{key}: ") and f"(LLaMA-Factory feature: {feature})" in message
    assert "Unknown key" not in message


def test_the_messages_users_meet_most(tmp_path):
    base = base_config(tmp_path, tmp_path, tmp_path / "o")
    with pytest.raises(ConfigError, match=r"quantization_bit: 4 with finetuning_type: full: quantized models can "
                                          "only be trained with LoRA"):
        build_config({**base, "quantization_bit": 4, "finetuning_type": "full"})
    with pytest.raises(ConfigError, match=r"image_max_pixels: multimodal inputs are not supported"):
        build_config({**base, "image_max_pixels": 262144})
    with pytest.raises(ConfigError, match=r"finetuning_type: oft: OFT is not supported"):
        build_config({**base, "finetuning_type": "oft"})
    with pytest.raises(ConfigError) as err:  # several at once: each on its own line
        build_config({**base, "use_dft_loss": True, "pref_bco_weight": 0.5})
    assert "DFT" in str(err.value) and "pref_bco_weight: BCO, LD-DPO and a quantized" in str(err.value)


def test_ignored_keys_are_logged(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="trainer"):
        build_config(base_config(tmp_path, tmp_path, tmp_path / "o", use_reentrant_gc=False, print_param_status=True))
    assert "Ignoring use_reentrant_gc" in caplog.text and "Ignoring print_param_status" in caplog.text


def test_no_refused_or_ignored_key_is_a_supported_key():
    supported = set(owners())
    refused = {k for keys, _ in lf_compat.REFUSED.values() for k in keys}
    assert not refused & supported, refused & supported
    assert not set(lf_compat.IGNORED) & supported - {"ddp_find_unused_parameters"}

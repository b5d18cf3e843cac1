"""The installed libraries are the ones the engine is written against."""

import torch


def test_trainer_methods_zerotune_overrides_are_unchanged():
    from trainer.engine.trainer import TESTED_TRANSFORMERS, trainer_api_changes

    changes = trainer_api_changes()
    assert not changes, (f"transformers changed Trainer methods that ZeroTrainer overrides (tested with "
                         f"{TESTED_TRANSFORMERS}): " + "; ".join(changes))


def test_the_detector_notices_a_changed_method(monkeypatch):
    from transformers import Trainer

    from trainer.engine.trainer import trainer_api_changes

    monkeypatch.setattr(Trainer, "_save_checkpoint", lambda self, model: None)
    monkeypatch.delattr(Trainer, "_load_best_model")
    changes = trainer_api_changes()
    assert any("Trainer._save_checkpoint('self', 'model')" in c for c in changes)
    assert "Trainer._load_best_model no longer exists" in changes


def test_torch_has_what_the_floor_promises():
    """setup.py asks torch>=2.6: FSDP2's public fully_shard and SDPA's enable_gqa, which the code uses."""
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    assert torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True).shape == q.shape

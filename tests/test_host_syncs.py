"""No device-to-host read per micro-batch in a training step (on a GPU each one stalls the queue of kernels).

Every call that reads a tensor back to the host (item, float, int, bool, tolist, nonzero, cpu, numpy) is counted over
the whole training loop of one optimizer step, once with 4 accumulated micro-batches and once with 8: the counts must
be the same, so none of them is paid per micro-batch. The one exception is transformers' own: masking_utils looks
for packed sequences in position_ids once per forward for any attention path that registers a mask function
(FlashAttention-2's included); it is counted and must be exactly one a micro-batch, so nothing else hides there.
"""

import collections
import traceback

import torch

from tiny import base_config, train_with

READS = ["item", "__float__", "__int__", "__bool__", "tolist", "nonzero", "cpu", "numpy"]
TRANSFORMERS_PER_FORWARD = "transformers/masking_utils.py"


def _counted_step(monkeypatch, cfg) -> collections.Counter:
    import trainer.engine.trainer as engine

    calls, active = collections.Counter(), [False]

    def counting(owner, name):
        original = getattr(owner, name)

        def read(*args, **kwargs):
            if active[0]:
                frame = traceback.extract_stack(limit=2)[0]
                calls[(name, frame.filename.split("site-packages/")[-1].split("/trainer/")[-1])] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, read)

    for name in READS:
        counting(torch.Tensor, name)
    counting(torch, "nonzero")
    loop = engine.ZeroTrainer._inner_training_loop

    def counted_loop(self, *args, **kwargs):
        active[0] = True
        try:
            return loop(self, *args, **kwargs)
        finally:
            active[0] = False

    monkeypatch.setattr(engine.ZeroTrainer, "_inner_training_loop", counted_loop)
    monkeypatch.setattr(engine, "device_peak_flops", lambda dtype, given=None: 1e12)  # its one-off measurement reads back too
    train_with(cfg)
    return calls


def test_host_reads_do_not_grow_with_accumulation(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    counts = {}
    for accumulation in (4, 8):
        cfg = base_config(tiny_model_dir, data_dir, tmp_path / f"o{accumulation}", per_device_train_batch_size=1,
                          gradient_accumulation_steps=accumulation, max_steps=1)
        with monkeypatch.context() as patch:
            counts[accumulation] = _counted_step(patch, cfg)
    per_forward = {n: sum(v for (_, f), v in c.items() if f == TRANSFORMERS_PER_FORWARD) for n, c in counts.items()}
    assert per_forward == {4: 4, 8: 8}
    rest = {n: collections.Counter({k: v for k, v in c.items() if k[1] != TRANSFORMERS_PER_FORWARD})
            for n, c in counts.items()}
    assert rest[4] == rest[8], (rest[4], rest[8])
    # Per step: the non-finite check (one read), the log line's reduced totals (one), and transformers' own loss
    # and grad-norm reads; a handful in all, none of them zerotune's per micro-batch.
    ours = sum(v for (_, f), v in rest[4].items() if f.startswith("engine/") or f.startswith("model/"))
    assert 1 <= ours <= 3, rest[4]


def test_a_nonfinite_micro_batch_still_stops_the_run_at_its_step(tiny_model_dir, data_dir, tmp_path):
    """Checked once a step now: a nan in the first of 4 accumulated micro-batches stops the run at step 1, before
    any optimizer step, with the value and the step named as before."""
    import pytest

    from test_reliability import _nan_model
    from trainer.errors import TrainingHalted

    cfg = base_config(_nan_model(tmp_path, tiny_model_dir), data_dir, tmp_path / "o", per_device_train_batch_size=1,
                      gradient_accumulation_steps=4, max_steps=2)
    with pytest.raises(TrainingHalted, match=r"non-finite loss \(nan\) at step 1 .*skip_nonfinite_batches"):
        train_with(cfg)

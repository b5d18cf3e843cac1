"""The examples' first steps, pinned: a refactor that changes what a stage computes shows up here.

Each example YAML runs unchanged (the tiny model swapped in, fp32, 3 steps) and its logged loss and gradient norm
of every step must equal the figures recorded at commit 579bb7a, before the house was reordered (issue 24). The
numbers are what that code computed, not a formula: if a deliberate change of the math moves them, record the new
ones here and say why in the commit.
"""

import json

import pytest

from tiny import run_example

# example -> [(loss, grad_norm) of steps 1, 2, 3]
PINNED = {
    "sft_lora.yaml": [(6.001607418060303, 0.13179686665534973), (6.002983093261719, 0.1426190733909607),
                      (6.0012078285217285, 0.1398404836654663)],
    "dpo_lora.yaml": [(0.6931471824645996, 0.1889811009168625), (0.6931471824645996, 0.175558939576149),
                      (0.6930754780769348, 0.29388025403022766)],
    "ppo_lora.yaml": [(0.017742682248353958, 0.0736178383231163), (0.017742693424224854, 0.0736178383231163),
                      (0.017724033445119858, 0.07358867675065994)],
    # kto step 3 moved at kto-batch1: z is the whole step's mean over each example's fixed dataset-neighbour pair
    # (0.001244) where it was each micro-batch's own (logged mean 0.003609, one micro-batch clamped at 0).
    "kto_lora.yaml": [(0.5, 0.08820518851280212), (0.5, 0.05181083828210831),
                      (0.49994078278541565, 0.12743884325027466)],
    "rm_lora.yaml": [(0.7002596259117126, 0.4014439880847931), (0.680692195892334, 0.3806678056716919),
                     (0.6672235131263733, 0.7307233810424805)],
}


@pytest.mark.parametrize("example", sorted(PINNED))
def test_example_first_steps_are_unchanged(example, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_example(example, tiny_model_dir, out, steps=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [(h["loss"], h["grad_norm"]) for h in history if "loss" in h and "grad_norm" in h]
    assert len(logged) == 3, history
    for step, ((loss, norm), (want_loss, want_norm)) in enumerate(zip(logged, PINNED[example]), start=1):
        assert loss == pytest.approx(want_loss, rel=2e-4, abs=1e-6), (example, step, "loss")
        assert norm == pytest.approx(want_norm, rel=2e-4, abs=1e-6), (example, step, "grad_norm")

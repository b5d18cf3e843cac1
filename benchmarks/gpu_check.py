"""GPU readiness: a random-init Llama-shaped model, a few packed steps with FlashAttention-2, Liger and the
chunked loss, then tokens/s, MFU and peak memory. Needs no internet (model and data are made here).

    benchmarks/gpu_check.sh --size 1b --steps 20
    python -m benchmarks.gpu_check --size tiny --steps 2      # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "tiny": (64, 2, 4, 2, 128),
    "1b": (2048, 16, 32, 8, 8192),
    "3b": (3072, 28, 24, 8, 8192),
    "8b": (4096, 32, 32, 8, 14336),
}


def build(size: str, folder: Path, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tokenizer

    hidden, layers, heads, kv, inter = SIZES[size]
    tok = build_tokenizer(folder)
    config = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cutoff", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--finetuning_type", default="full")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="zerotune-gpu-check-"))
    model_dir = build(a.size, work / "model", a.vocab)
    out = work / "out"
    cmd = [sys.executable, "-m", "trainer.cli", "train", str(ROOT / "examples/sft_lora.yaml"),
           f"model_name_or_path={model_dir}", f"output_dir={out}", "dataset=alpaca_en_demo,chat_demo",
           f"dataset_dir={ROOT / 'examples/data'}", "template=chatml", f"cutoff_len={a.cutoff}", "max_samples=100000",
           f"finetuning_type={a.finetuning_type}", f"max_steps={a.steps}", "logging_steps=1", "save_strategy=no",
           "val_size=0", "eval_strategy=no", "plot_loss=false", f"per_device_train_batch_size={a.batch}",
           "gradient_accumulation_steps=1", "enable_liger_kernel=true", "flash_attn=auto", "bf16=true",
           "overwrite_cache=true", "disable_tqdm=true", "report_to=none", "num_train_epochs=1000"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    paths = [line for line in proc.stderr.splitlines()
             if any(k in line for k in ("attention", "Liger", "Loss:", "flash", "Packed"))]
    print("\n".join(paths))
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [e for e in state["log_history"] if "tokens_per_second" in e][1:]  # drop the warm-up step
    if not logs:
        logs = [e for e in state["log_history"] if "tokens_per_second" in e]
    tps = sum(e["tokens_per_second"] for e in logs) / len(logs)
    mfu = sum(e["mfu"] for e in logs) / len(logs)
    peak = max(e["peak_memory_gb"] for e in logs)
    print(f"size {a.size}, cutoff {a.cutoff}, batch {a.batch}, {a.finetuning_type}: {tps:.0f} real tokens/s, "
          f"MFU {100 * mfu:.1f}%, peak memory {peak:.1f} GB (mean over {len(logs)} steps after the first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# GPU readiness check (no internet needed). First correctness: every gpu-marked test (real flash-attn keeping padding-free
# packed batches apart, Liger's fused loss against the chunked loss, batched generation, QLoRA under ZeRO-3 with the
# 4-bit weights stored in bf16: needs bitsandbytes and deepspeed) and the layout tests with
# every attention path; then speed: a random-init Llama-shaped model, packed steps with FlashAttention-2 + Liger +
# chunked loss; prints tokens/s, MFU and peak memory.
#   benchmarks/gpu_check.sh --size 1b --steps 20 [--cutoff 4096 --batch 2 --finetuning_type full|lora]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -m pytest -q -rs -m gpu tests  # every gpu-marked test, whichever file holds it
"$PY" -m pytest -q tests/test_layout.py
exec "$PY" -m benchmarks.gpu_check "$@"

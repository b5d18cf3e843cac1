#!/usr/bin/env bash
# GPU readiness check (no internet needed): random-init Llama-shaped model, packed steps with
# FlashAttention-2 + Liger + chunked loss; prints tokens/s, MFU and peak memory.
#   benchmarks/gpu_check.sh --size 1b --steps 20 [--cutoff 4096 --batch 2 --finetuning_type full|lora]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m benchmarks.gpu_check "$@"

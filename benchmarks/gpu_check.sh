#!/usr/bin/env bash
# The GPU check, one command, within 9 minutes on one H100/H200 (no internet needed):
# 0. the wheels benchmarks/gpu_wheels.sh brought (benchmarks/wheels/: DeepSpeed, datasets, Liger and what they
#    need) installed with --no-index --no-deps into a folder of their own, before anything else; the versions it
#    runs with printed;
# 1. correctness: every gpu-marked test (real flash-attn / varlen_attn keeping padding-free batches apart, Liger's
#    fused loss against the chunked loss, batched generation, QLoRA under ZeRO-3 where bitsandbytes is present);
# 2. speed: the throughput table of benchmarks/gpu_check.py (Llama-3.2-1B- and Qwen3-shaped random models, cutoff
#    4096, LoRA and full, packed vs padding-free, each attention path, Liger on/off, DPO, ZeRO-3), written to
#    benchmarks/results/gpu-check-<time>/.
#   benchmarks/gpu_check.sh [gpu_check.py options, e.g. --budget 300 --rows "llama full packed auto"]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WHEELS=benchmarks/wheels
SITE=${ZEROTUNE_GPU_SITE:-/tmp/zerotune-gpu-site}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS (run benchmarks/gpu_wheels.sh where there is internet): rows needing them are skipped"
fi
"$PY" - <<'PYEOF'
from importlib.metadata import PackageNotFoundError, version
names = ["torch", "transformers", "peft", "accelerate", "triton", "flash-attn", "bitsandbytes"]
names += [line.split("==")[0].strip() for line in open("benchmarks/gpu_wheels.txt")
          if line.strip() and not line.lstrip().startswith("#")]
def found(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"
print("versions:", ", ".join(f"{n} {found(n)}" for n in names))
PYEOF
start=$SECONDS
"$PY" -m pytest -q -rs -m gpu tests  # every gpu-marked test, whichever file holds it
left=$((9 * 60 - 30 - (SECONDS - start)))  # what remains of the 9 minutes (30 s kept for setup and writing)
exec "$PY" -m benchmarks.gpu_check --budget "$((left > 60 ? left - 60 : 0))" "$@"

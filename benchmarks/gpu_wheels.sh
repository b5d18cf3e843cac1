#!/usr/bin/env bash
# Run on a machine WITH registry access: downloads into benchmarks/wheels/ (git-ignored) the wheels that
# benchmarks/gpu_check.sh installs on a GPU machine without internet (benchmarks/gpu_wheels.txt says which), for
# CPython 3.12 on x86-64 Linux, without their dependencies (the list names every one the GPU machine lacks).
# DeepSpeed has only a source release on PyPI: it is built here into a wheel without compiled ops (they build
# just in time on first use). Prints the total size and fails above 60 MB.
#   benchmarks/gpu_wheels.sh            (PIP=... for another pip, PYTHON_VERSION=3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"
DEST=benchmarks/wheels
LIMIT=$((60 * 1024 * 1024))
mkdir -p "$DEST"
mapfile -t WANTED < <(grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$')
BINARY=() SOURCE=()
for req in "${WANTED[@]}"; do
  case "$req" in deepspeed==*) SOURCE+=("$req") ;; *) BINARY+=("$req") ;; esac
done
$PIP download --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform linux_x86_64 --platform any -d "$DEST" "${BINARY[@]}"
for req in "${SOURCE[@]}"; do  # a pure-Python wheel: no ops compiled, so no CUDA needed to build it
  DS_BUILD_OPS=0 $PIP wheel --no-deps --no-build-isolation -w "$DEST" "$req"
done
total=$(cat "$DEST"/*.whl | wc -c)
ls -l "$DEST"/*.whl
echo "total: $((total / 1024 / 1024)) MB in $(ls "$DEST"/*.whl | wc -l) wheels ($DEST)"
if [ "$total" -gt "$LIMIT" ]; then
  echo "over the 60 MB the GPU check may carry" >&2
  exit 1
fi

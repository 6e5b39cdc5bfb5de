#!/usr/bin/env bash
# Every GPU check in one run, sized for a lent H100 / H200 (6 minutes with start-up):
# benchmarks/gpu_checks.py records the environment, the engine's CUDA checks (no sync, graph
# == eager, each switch fits), the level-0 merge conv microbenchmark,
# the speed ladder at 512 px, packing at 256 px, a full-length fp32 vs bf16 fit at 512 px,
# then 256 px rows if time is left. Every row lands in $OUT the moment it is measured
# (rows.jsonl, table.md; log.txt is the console). Needs only the checkout (test images come
# from scikit-image) and torch (CUDA), numpy, scikit-image.
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh             # BUDGET: whole seconds, 330
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh --smoke     # tiny CPU run, as CI does
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
BUDGET=${BUDGET:-330}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH=.
# The driver keeps to its budget by itself; the timeout is only a backstop, and the rows
# written before it stay.
timeout -k 10 $((BUDGET + 60)) "$PYTHON" -m benchmarks.gpu_checks --out "$OUT" \
  --budget "$BUDGET" "$@" 2>&1 | tee "$OUT/log.txt"

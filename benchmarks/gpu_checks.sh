#!/usr/bin/env bash
# Every GPU check in one run, sized for the lent H200 (about 8 minutes): the speed table at
# 256 and 512 px, then the quality table at full size on a subset of cases. Results land in
# $OUT (default ./bench-out). Needs only torch (CUDA), numpy, Pillow and scikit-image.
#   OUT=/tmp/out DATA=../shared/data/dip-reference bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
DATA=${DATA:-../shared/data/dip-reference}
mkdir -p "$OUT"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt"
timeout 240 python -m benchmarks.speed --sizes 256,512 --steps 200 --warmup 30 --seeds 1 \
  --slots 1,2,4,8,16 --json "$OUT/speed_gpu.json" > "$OUT/speed_gpu.txt" 2>&1
timeout 240 python -m benchmarks.quality --data "$DATA" --size 0 --sr-size 0 \
  --cases denoise-F16,sr4-zebra,jpeg \
  --seeds 2 --device cuda --json "$OUT/quality_gpu.json" > "$OUT/quality_gpu.txt" 2>&1
tail -n 30 "$OUT"/*.txt

#!/usr/bin/env bash
# One visit to the GPU machine, after ../shared/gpu/stage and .gpu/install/device-install.sh:
#   bash bench/gpu_run.sh tests    # tests/gpu, log under $OUT
#   bash bench/gpu_run.sh bench    # benchmarks, JSON under $OUT
set -uo pipefail
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
case "${1:-tests}" in
  tests)
    timeout "${TESTS_TIMEOUT:-450}" python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rA --durations=0 \
      2>&1 | tee "$OUT/gpu_tests.log" | grep -vE "^(INFO|WARNING|DEBUG)" | tail -80 ;;
  bench)
    timeout 150 python3 bench/bench_precision.py --out "$OUT/precision.json" 2>&1 | tail -20
    timeout 330 python3 bench/bench_rollout.py --steps 4 --out "$OUT/rollout.json" 2>&1 \
      | grep -vE "^(INFO|WARNING|DEBUG)" | tail -30 ;;
esac

#!/usr/bin/env bash
# One visit to the GPU machine, after ../shared/gpu/stage and .gpu/install/device-install.sh:
#   bash bench/gpu_run.sh tests    # tests/gpu (vLLM tests one process each), logs under $OUT
#   bash bench/gpu_run.sh bench    # benchmarks, JSON under $OUT
set -uo pipefail
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
quiet() { grep -vE "^(INFO|WARNING|DEBUG)|^\S+ \S+ - (INFO|WARNING)| INFO | WARNING "; }
case "${1:-tests}" in
  tests)
    timeout 300 python3 -m pytest -m "gpu and not vllm" tests/gpu -q -p no:cacheprovider -rA 2>&1 \
      | tee "$OUT/gpu_tests.log" | quiet | tail -30
    # vLLM's sleep-mode allocator allows one engine per process
    for t in $(python3 -m pytest -m "gpu and vllm" tests/gpu -q --collect-only -p no:cacheprovider 2>/dev/null \
               | grep "::"); do
      timeout 150 python3 -m pytest "$t" -q -p no:cacheprovider -rA 2>&1 | quiet >> "$OUT/gpu_tests_vllm.log"
      grep -E "^(PASSED|FAILED|ERROR)" "$OUT/gpu_tests_vllm.log" | tail -1
    done ;;
  bench)
    timeout 150 python3 bench/bench_precision.py --out "$OUT/precision.json" 2>&1 | quiet | tail -20
    timeout 330 python3 bench/bench_rollout.py --steps 4 --out "$OUT/rollout.json" 2>&1 | quiet | tail -30 ;;
esac

#!/usr/bin/env bash
# One visit to the GPU machine, after ../shared/gpu/stage and .gpu/install/device-install.sh:
#   bash bench/gpu_run.sh tests        # tests/gpu: non-vLLM ones together, vLLM ones one process each
#   bash bench/gpu_run.sh vllm [-k X]  # only the vLLM tests (optionally those matching X)
#   bash bench/gpu_run.sh vllm-parallel [N]  # the vLLM tests N processes at a time (default 4); the ones that
#                                            # measure the device's free memory run alone afterwards
#   bash bench/gpu_run.sh vllm-shared [N]    # only the first half of vllm-parallel (safe beside other GPU work)
#   bash bench/gpu_run.sh vllm-exclusive     # only its second half (nothing else may use the GPU meanwhile)
#   bash bench/gpu_run.sh kernel-tests     # only the kernel tests (tests/gpu/test_kernel*.py)
#   bash bench/gpu_run.sh kernel|precision|rollout [MODE]|rollout-kv|knobs|bench   # a benchmark, or the first three
#   bash bench/gpu_run.sh rollout-qwen05   # rollout tokens/s on a Qwen2.5-0.5B shape: callback, generate, standalone vLLM
#   bash bench/gpu_run.sh long [PART]  # bench_long_run.py: engine-full|engine-lora|grpo|fail-reward|fail-engine
#   bash bench/gpu_run.sh long-parallel [PART...]  # all five parts (or those named) at once, one process each
#                                                  # (memory is per process)
# Logs and results go under $OUT (default /tmp/out).
set -uo pipefail
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
quiet() { grep -vE "^(INFO|WARNING|DEBUG)|^\S+ \S+ - (INFO|WARNING)| INFO | WARNING "; }
stamp() { echo "[$(date +%T)] $*"; }
warm_smollm2() {  # convert the embedded GGUF once, before processes that load it start together
  python3 -c "from lightning_rl.models import load_policy; load_policy('smollm2-135m-instruct')" > /dev/null 2>&1
}

vllm_tests() {
  # vLLM's sleep-mode allocator allows one engine per process
  local filter=${1:-}
  for t in $(python3 -m pytest -m "gpu and vllm" tests/gpu -q --collect-only -p no:cacheprovider ${filter:+-k "$filter"} \
             2>/dev/null | grep "::"); do
    local name=${t##*::}
    stamp "start $name"
    timeout 240 python3 -m pytest "$t" -q -s -p no:cacheprovider -rA > "$OUT/vllm_$name.log" 2>&1
    local rc=$?
    quiet < "$OUT/vllm_$name.log" | grep -E "^(PASSED|FAILED|ERROR)|Error|error:|assert|^(greedy|sleep|mean|lora|shared|kv-only|grpo)" \
      | tail -8
    stamp "end $name rc=$rc"
  done
}

EXCLUSIVE="sleep_frees_memory or base_weights_shared"  # they read the device-wide free memory

vllm_tests_shared() {  # the vLLM tests that do not read the device's free memory, N at a time
  local n=${1:-4}
  warm_smollm2
  local tests
  tests=$(python3 -m pytest -m "gpu and vllm" tests/gpu -q --collect-only -p no:cacheprovider -k "not ($EXCLUSIVE)" \
          2>/dev/null | grep "::")
  for t in $tests; do
    while [ "$(jobs -rp | wc -l)" -ge "$n" ]; do sleep 1; done
    local name=${t##*::}
    ( timeout 300 python3 -m pytest "$t" -q -s -p no:cacheprovider -rA > "$OUT/vllm_$name.log" 2>&1
      rc=$?; echo "[$(date +%T)] end $name rc=$rc" ) &
  done
  wait
  for f in "$OUT"/vllm_*.log; do
    quiet < "$f" | grep -E "^(PASSED|FAILED|ERROR)|Error|error:|assert|^(greedy|sleep|mean|lora|shared|kv-only|grpo|readme)" \
      | tail -6
  done
}

vllm_tests_parallel() {
  vllm_tests_shared "${1:-4}"
  vllm_tests "$EXCLUSIVE"
}

case "${1:-tests}" in
  tests)
    stamp "non-vLLM GPU tests"
    timeout 560 python3 -m pytest -m "gpu and not vllm" tests/gpu -q -p no:cacheprovider -rA 2>&1 \
      | tee "$OUT/gpu_tests.log" | quiet | grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error" | tail -40
    vllm_tests ;;
  vllm)
    vllm_tests "${3:-}" ;;
  vllm-parallel)
    vllm_tests_parallel "${2:-4}" ;;
  vllm-shared)
    vllm_tests_shared "${2:-4}" ;;
  vllm-exclusive)
    vllm_tests "$EXCLUSIVE" ;;
  kernel-tests)
    timeout 300 python3 -m pytest tests/gpu/test_kernels_gpu.py tests/gpu/test_kernel_grpo_e2e.py -q \
      -p no:cacheprovider -rA 2>&1 | tee "$OUT/gpu_kernel_tests.log" | quiet \
      | grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error" | tail -50 ;;
  knobs)  # engine settings, each in its own process: tokens/s, a profile, the log-prob mismatch
    timeout 420 python3 bench/bench_rollout_knobs.py --out "$OUT/rollout_knobs.json" "${@:2}" 2>&1 | quiet | tail -60 ;;
  kernel)
    timeout "${KERNEL_TIMEOUT:-400}" python3 bench/bench_logprob_kernel.py --out "$OUT/logprob_kernel.json" --budget-s "${KERNEL_BUDGET:-360}" 2>&1 \
      | quiet | tail -40 ;;
  precision)
    timeout 200 python3 bench/bench_precision.py --out "$OUT/precision.json" 2>&1 | quiet | tail -25 ;;
  rollout)
    timeout 500 python3 bench/bench_rollout.py --steps 6 --execution "${2:-cuda_graphs}" \
      --out "$OUT/rollout_${2:-cuda_graphs}.json" 2>&1 | quiet | tail -30 ;;
  rollout-qwen05)  # the throughput case: Qwen2.5-0.5B shape, 256 sequences x 256 new tokens
    timeout 560 python3 bench/bench_rollout.py --model qwen05 --prompts 32 --G 8 --max-new-tokens 256 --steps 3 \
      --out "$OUT/rollout_qwen05.json" 2>&1 | quiet | tail -20 ;;
  rollout-kv)  # the same with the KV-only sleep (weights stay resident), no standalone rerun
    timeout 400 python3 bench/bench_rollout.py --steps 6 --sleep-level 0 --skip-standalone \
      --out "$OUT/rollout_cuda_graphs_sleep0.json" 2>&1 | quiet | tail -12 ;;
  long)  # one part per call: each runs under the 10-minute limit of a GPU command
    timeout 580 python3 bench/bench_long_run.py --part "${2:-engine-full}" --out "$OUT/long_run_${2:-engine-full}.json" \
      2>&1 | quiet | tail -20 ;;
  long-parallel)
    parts=("${@:2}"); [ ${#parts[@]} -gt 0 ] || parts=(engine-full engine-lora grpo fail-reward fail-engine)
    warm_smollm2
    for part in "${parts[@]}"; do
      ( timeout 580 python3 bench/bench_long_run.py --part "$part" --out "$OUT/long_run_$part.json" \
          > "$OUT/long_$part.log" 2>&1; stamp "end long $part rc=$?" ) &
    done
    wait
    for part in "${parts[@]}"; do quiet < "$OUT/long_$part.log" | tail -3; done ;;
  bench)
    for b in kernel precision rollout; do stamp "bench $b"; bash "$0" "$b"; done ;;
esac

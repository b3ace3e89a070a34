#!/usr/bin/env bash
# One GPU visit as a few back-to-back device calls, each under the 10-minute limit. Every call packs its logs
# and results into $OUT/<stage>.tar.gz (the device returns a few files only), even when its work times out.
#   bash bench/gpu_visit.sh install          # after the staged parts: install vLLM, TRL, the project
#   bash bench/gpu_visit.sh long+vllm        # bench_long_run.py's five parts beside the vLLM tests that share the GPU
#   bash bench/gpu_visit.sh rest             # the vLLM tests that need the GPU alone, then the other GPU tests
#   bash bench/gpu_visit.sh rerun TEST_FILE...  # the 200-step GRPO long run beside those GPU tests
#   PAR=N bash bench/gpu_visit.sh tests TEST...  # GPU test files or test ids, each test in its own process, N at once
#   bash bench/gpu_visit.sh memory           # TRL beside SmolLM2 full under 2.25 and 2.5 GiB budgets (~300 s)
#   bash bench/gpu_visit.sh memory15         # the Qwen2.5-1.5B LoRA shape at 5 GiB, CUDA graphs and eager (~540 s)
#   STEPS=N bash bench/gpu_visit.sh bench CASES RUNNERS [EXTRA...]  # bench_vs_trl.py (EXTRA: LABEL=JSON variants);
#                                                            # PROFILE=1 adds a profile of one step per run
set -uo pipefail
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
FINAL=${OUT:-/tmp/out}
stage=${1:?stage}
WORK=/tmp/visit_$stage; rm -rf "$WORK"; mkdir -p "$WORK"
export OUT=$WORK
budget=${BUDGET_S:-560}
pack() { tar czf "$FINAL/${stage//+/_}.tar.gz" -C "$WORK" . ; }
trap pack EXIT
one_test() {
  timeout 300 python3 -m pytest "$1" -q -s -p no:cacheprovider -rA > "$WORK/test_${1##*::}.log" 2>&1
  echo "[$(date +%T)] rc=$? $1"
}
export -f one_test; export WORK
each_test() {  # every test of the named files or ids in its own process (one vLLM sleep-mode engine per process),
               # PAR of them at a time (default 1)
  python3 -m pytest "$@" -q --collect-only -p no:cacheprovider 2>/dev/null | grep "::" \
    | xargs -P "${PAR:-1}" -I{} bash -c 'one_test "$1"' _ {}
}
case "$stage" in
  install)
    mkdir -p /tmp/parts; cp .gpu/part_07/* /tmp/parts/ 2>/dev/null
    bash .gpu/install/device-install.sh > "$WORK/install.log" 2>&1; tail -8 "$WORK/install.log" ;;
  long+vllm)
    timeout "$budget" bash bench/gpu_run.sh long-parallel > "$WORK/long.txt" 2>&1 &
    long=$!
    timeout "$budget" bash bench/gpu_run.sh vllm-shared "${2:-3}" > "$WORK/vllm_shared.txt" 2>&1
    wait $long
    cat "$WORK/long.txt" "$WORK/vllm_shared.txt" | grep -E "PASSED|FAILED|ERROR|rc=|growth|ok" | tail -60 ;;
  rest)
    timeout 240 bash bench/gpu_run.sh vllm-exclusive > "$WORK/vllm_exclusive.txt" 2>&1
    timeout $((budget - 250)) python3 -m pytest -m "gpu and not vllm" tests/gpu -q -p no:cacheprovider -rA \
      > "$WORK/gpu_non_vllm.log" 2>&1
    cat "$WORK/vllm_exclusive.txt"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$WORK/gpu_non_vllm.log" | tail -40 ;;
  rerun)  # the 200-step GRPO long run beside the named GPU test files, each test in its own process
    timeout "$budget" bash bench/gpu_run.sh long grpo > "$WORK/long.txt" 2>&1 &
    long=$!
    each_test "${@:2}"
    wait $long
    grep -hE "^(PASSED|FAILED|ERROR)|Error:|assert |compiled graphs" "$WORK"/test_*.log | tail -30
    tail -5 "$WORK/long.txt" ;;
  tests)
    each_test "${@:2}"
    grep -hE "^(PASSED|FAILED|ERROR)|Error:|assert |^(process engine|overlapped|readme|engine process|grpo)" "$WORK"/test_*.log | tail -40 ;;
  bench)
    extras=(); for e in "${@:4}"; do extras+=(--extra "$e"); done
    timeout "$budget" python3 bench/bench_vs_trl.py --out "$WORK/vs_trl.json" --cases "${2:?cases}" \
      --runners "${3:?runners}" "${extras[@]}" --steps "${STEPS:-12}" --timeout 300 ${PROFILE:+--profile-dir "$WORK"} 2>&1 | grep -vE "^(INFO|WARNING|DEBUG)" \
      | tee "$WORK/bench.log" | grep -E "^\[|s/step|FAILED|speedup|peak_vs|reward_last" | tail -40 ;;
  memory|memory15)  # budgeted runs: fp8 KV cache and vLLM's profile run capped at 2,048 tokens
    kw='"engine_kwargs":{"kv_cache_dtype":"fp8","max_num_batched_tokens":2048}'
    small="\"rollout\":{$kw}"
    if [ "$stage" = memory ]; then  # alone on the GPU: vLLM sizes TRL's KV cache from the free memory
      run_s=170 steps=10
      args=(--cases smollm2-full --runners trl
            --extra "b225={\"plugin\":{\"memory_budget\":2415919104,\"engine_overhead_bytes\":402653184},$small}"
            --extra "b250={\"plugin\":{\"memory_budget\":2684354560,\"engine_overhead_bytes\":402653184},$small}")
    else  # the first step compiles the LoRA layers (90 s for this shape): 6 steps, 270 s a run; the eager variant
          # tells how much of the memory outside PyTorch's figures vLLM's CUDA graphs take
      run_s=270 steps=6
      eager="\"rollout\":{\"execution\":\"eager\",$kw}"
      args=(--cases qwen15-lora --runners ,
            --extra "b500={\"plugin\":{\"memory_budget\":5368709120,\"engine_overhead_bytes\":536870912},$small}"
            --extra "b500e={\"plugin\":{\"memory_budget\":5368709120,\"engine_overhead_bytes\":536870912},$eager}")
    fi
    timeout "$budget" python3 bench/bench_vs_trl.py --out "$WORK/vs_trl.json" "${args[@]}" --steps "${STEPS:-$steps}" \
      --timeout "$run_s" 2>&1 | grep -vE "^(INFO|DEBUG)" | tee "$WORK/bench.log" \
      | grep -E "^\[|s/step|FAILED|speedup|peak_vs|Error" | cut -c1-600 | tail -30 ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
